"""Prompt-based routing baseline as an lm-eval model: one expert per input, chosen from the input alone
(the context, never the candidate answers), then that expert runs as a dense model."""
from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from flexolmo_core.anchor.families import dense_config_dict, expert_count, load_weights
from flexolmo_core.io.checkpoint import load_state
from flexolmo_core.io.dtypes import inference_dtype, resolve_device
from flexolmo_core.merge import baselines


def dense_experts_from_merged(merged_dir, device: str = "auto") -> tuple[object, list]:
    """(merged model, [dense model per expert]) built in memory from the safetensors, on `device`."""
    import transformers

    where = resolve_device(device)
    dtype = inference_dtype(where, merged_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), use_safetensors=True,
                                                               dtype=dtype).to(where).eval()
    state = load_state(merged_dir)
    dense = dense_config_dict(merged.config.to_dict())
    cfg = transformers.AutoConfig.for_model(dense.pop("model_type"), **dense)
    experts = []
    for e in range(expert_count(merged.config)):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        load_weights(model, baselines.dense_expert_state(state, e), f"{merged_dir} expert {e}")
        experts.append(model.to(where, dtype).eval())
    return merged, experts


@register_model("flexolmo_prompt_routed")
class PromptRoutedLM(HFLM):
    def __init__(self, merged_dir, tokenizer=None, batch_size: int = 8, max_length=None, route_tokens: int = 256,
                 device: str = "auto", **kwargs):
        import transformers

        tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(str(merged_dir))
        self.router_model, self.expert_models = dense_experts_from_merged(merged_dir, device)
        first = self.expert_models[0]
        super().__init__(pretrained=first, tokenizer=tokenizer, device=str(first.device),
                         batch_size=batch_size, max_length=max_length, dtype=first.dtype, **kwargs)
        self.embeddings = baselines.domain_embeddings(self.router_model)
        self.route_tokens = route_tokens  # route on the last `route_tokens` tokens of the input
        self.route_counts = defaultdict(int)

    def route(self, tokens: list[int]) -> int:
        ids = torch.tensor([tokens[-self.route_tokens:] or [self.eot_token_id]], device=self.router_model.device)
        expert = baselines.prompt_route(self.router_model, ids, self.embeddings)[0]
        self.route_counts[expert] += 1
        return expert

    def _by_expert(self, items, key_tokens, run):
        """Partition items by routed expert, run each part on its expert, put results back in order."""
        parts = defaultdict(list)
        for i, item in enumerate(items):
            parts[self.route(key_tokens(item))].append(i)
        results = [None] * len(items)
        for expert, idx in parts.items():
            self._model = self.expert_models[expert]
            for i, r in zip(idx, run([items[i] for i in idx])):
                results[i] = r
        self._model = self.expert_models[0]
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # Route on the context only, so all choices of a question go to the same expert.
        return self._by_expert(requests, lambda r: self.tok_encode(r.args[0]) or [self.eot_token_id],
                               lambda part: super(PromptRoutedLM, self).loglikelihood(part, disable_tqdm=True))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        # Held-out text has no prompt: route on the document's first tokens.
        return self._by_expert(requests, lambda r: self.tok_encode(r.args[0])[: self.route_tokens],
                               lambda part: super(PromptRoutedLM, self).loglikelihood_rolling(part, disable_tqdm=True))

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_expert(requests, lambda r: self.tok_encode(r.args[0]),
                               lambda part: super(PromptRoutedLM, self).generate_until(part, disable_tqdm=True))
