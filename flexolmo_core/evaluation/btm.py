"""BTM (branch-train-merge) baseline as an lm-eval model: an ensemble of dense experts' next-token
distributions weighted by the posterior over experts given the prefix, top-k kept and renormalised.

For the token at position t+1 the weight of expert e is
    w_e(t) ∝ prior_e * p_e(x_1..x_t)   (prefix likelihood; the first token has no probability, so it is skipped)
the k largest weights are kept and renormalised, and p(x_{t+1}) = sum_e w_e(t) p_e(x_{t+1} | x_<=t).
Differs from Li et al. 2022 in one way: the posterior is updated at every position (their eval updates it
from the context only); for a pure ranking eval of short continuations the two are nearly the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from flexolmo_core.errors import InputError
from flexolmo_core.io.dtypes import inference_dtype, resolve_device


def btm_log_probs(expert_log_probs: torch.Tensor, input_ids: torch.Tensor, top_k: int = 2,
                  log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """expert_log_probs [E, B, T, V] (log-softmax at each position), input_ids [B, T] -> [B, T, V]: the
    mixture's log-distribution of the token after each position."""
    n_experts = expert_log_probs.shape[0]
    # log p_e(x_s | x_<s) for s = 1..T-1, read off the distribution at position s-1.
    token_lp = expert_log_probs[:, :, :-1, :].gather(
        -1, input_ids[None, :, 1:, None].expand(n_experts, -1, -1, 1)).squeeze(-1)  # [E, B, T-1]
    prefix = torch.cat([torch.zeros_like(token_lp[:, :, :1]), token_lp.cumsum(-1)], dim=-1)  # [E, B, T]
    if log_prior is None:
        log_prior = torch.full((n_experts,), -torch.log(torch.tensor(float(n_experts))))
    log_w = prefix + log_prior.to(prefix)[:, None, None]
    k = min(top_k, n_experts)
    keep = torch.zeros_like(log_w, dtype=torch.bool).scatter_(0, log_w.topk(k, dim=0).indices, True)
    log_w = torch.log_softmax(log_w.masked_fill(~keep, float("-inf")), dim=0)  # renormalise over the top-k
    return torch.logsumexp(log_w[..., None] + expert_log_probs, dim=0)


@register_model("flexolmo_btm")
class BTMLM(HFLM):
    """`experts`: dense HF checkpoint dirs (a list, or one string separated by '|') or loaded models; they
    must share the tokenizer (they do: it belongs to the anchor)."""

    def __init__(self, experts, top_k: int = 2, tokenizer=None, batch_size: int = 8, max_length=None,
                 device: str = "auto", **kwargs):
        import transformers

        where = resolve_device(device)

        if isinstance(experts, str):
            experts = [e for e in experts.split("|") if e]
        models = []
        for e in experts:
            if isinstance(e, (str, bytes)) or hasattr(e, "__fspath__"):
                tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(str(e))
                e = transformers.AutoModelForCausalLM.from_pretrained(str(e), use_safetensors=True,
                                                                      dtype=inference_dtype(where, e))
            models.append(e.to(where).eval())
        vocab = {m.config.vocab_size for m in models}
        if len(vocab) != 1:
            raise InputError(f"BTM experts must share one vocabulary, got sizes {sorted(vocab)}")
        super().__init__(pretrained=models[0], tokenizer=tokenizer, device=str(where), batch_size=batch_size,
                         max_length=max_length, dtype=models[0].dtype, **kwargs)
        self.experts = models
        self.top_k = int(top_k)

    def _model_call(self, inps, attn_mask=None, labels=None):
        # Returns log-probabilities; HFLM's log_softmax on them is the identity. Right padding only follows
        # the real tokens, so it never enters a real position's prefix posterior.
        with torch.no_grad():
            lps = torch.stack([F.log_softmax(m(inps).logits.float(), dim=-1) for m in self.experts])
        return btm_log_probs(lps, inps, self.top_k)

    @torch.no_grad()
    def _greedy_one(self, prompt: torch.Tensor, max_new: int, stop: list[str]) -> torch.Tensor:
        """Greedy decoding from the mixture with each expert's KV cache; the posterior is carried forward
        exactly as `btm_log_probs` computes it over the whole sequence."""
        n = len(self.experts)
        log_prior = torch.full((n,), -torch.log(torch.tensor(float(n))), device=prompt.device)
        outs = [m(prompt[None], use_cache=True) for m in self.experts]
        caches = [o.past_key_values for o in outs]
        lps = [F.log_softmax(o.logits[0].float(), -1) for o in outs]
        cum = torch.stack([lp[:-1].gather(-1, prompt[1:, None]).sum() for lp in lps])  # log p_e(x_2..x_T)
        last = torch.stack([lp[-1] for lp in lps])  # [E, V]
        new: list[int] = []
        for _ in range(max_new):
            log_w = cum + log_prior
            keep = log_w.topk(min(self.top_k, n)).indices
            w = torch.full_like(log_w, float("-inf"))
            w[keep] = torch.log_softmax(log_w[keep], 0)
            nxt = int(torch.logsumexp(w[:, None] + last, 0).argmax())
            new.append(nxt)
            if nxt == self.eot_token_id or any(s and s in self.tok_decode(new) for s in stop):
                break
            cum = cum + last[:, nxt]
            step = torch.tensor([[nxt]], device=prompt.device)
            outs = [m(step, past_key_values=c, use_cache=True) for m, c in zip(self.experts, caches)]
            caches = [o.past_key_values for o in outs]
            last = torch.stack([F.log_softmax(o.logits[0, -1].float(), -1) for o in outs])
        return torch.tensor(new, dtype=prompt.dtype, device=prompt.device)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """One row at a time (left padding removed), so positions match the scoring path."""
        mask = generation_kwargs.pop("attention_mask", None)
        rows = []
        for b in range(context.shape[0]):
            row = context[b]
            real = row[mask[b].bool()] if mask is not None else row
            rows.append(torch.cat([row, self._greedy_one(real, max_length - row.shape[0], stop)]))
        width = max(r.shape[0] for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        return torch.stack([F.pad(r, (0, width - r.shape[0]), value=pad) for r in rows])
