"""A compact decoder forward in plain torch, for both families: the training fast path.

It computes the same function as transformers' `Olmo2ForCausalLM` / `LlamaForCausalLM` (one expert),
`FlexOlmoForCausalLM` (E experts, top-k of a softmax over all E, raw probabilities as weights) and
`MixtralForCausalLM` (the same, top-k weights renormalised to sum 1), reading and writing their weights through
`flexolmo_core.io.layout`. The readable reference is transformers itself; tests/test_train_model.py checks
agreement for each.

Why a separate path: every tensor is either a trainable Parameter or a frozen buffer, chosen per tensor
(per expert, per router row), so autograd does no weight-gradient work for frozen weights and the public
expert cannot move. Frozen weights stay in the dtype they were given (the anchor's) and keep a cached copy in
the compute dtype when that differs (bf16 on CPUs with AVX-512 BF16), so they are cast once, not on every step. With top_k == num_experts (owner training, router tuning)
the MoE is a dense soft mixture: no gather/scatter."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexolmo_core.anchor.presets import ModelConfig
from flexolmo_core.errors import InputError


@dataclass
class MoEShape:
    num_experts: int = 1  # 1 = dense anchor (no router)
    top_k: int = 1
    use_bias: bool = False  # a non-positive logit bias per expert (only trainable experts' move)
    # FlexOlmo weights the top-k experts by their raw softmax probabilities (norm_topk_prob false, as released);
    # Mixtral always renormalises them to sum 1. Equal when top_k == num_experts (owner training, tuning).
    renormalize: bool = False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, cast_first: bool = False) -> torch.Tensor:
    """Olmo2RMSNorm: normalise in fp32, scale by the weight, return in the input dtype. LlamaRMSNorm
    (`cast_first`) casts back to the input dtype before scaling; the two agree in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype) if cast_first else (weight * xf).to(x.dtype)


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float()
                                         / cfg.head_dim))
    freqs = torch.arange(seq_len, device=device).float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v, as transformers' eager attention computes it under autocast
    (scores in the compute dtype, softmax in fp32). Written out rather than F.scaled_dot_product_attention:
    at tiny shapes (T 256, head_dim 64) torch's CPU flash kernel takes about twice as long for forward +
    backward (`python benchmarks/train_throughput.py --kernels`)."""
    T = q.shape[-2]
    mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Slots(nn.Module):
    """Named tensors, each a Parameter (trainable) or a buffer (frozen), with a cached compute-dtype copy
    of the frozen ones."""

    def __init__(self):
        super().__init__()
        self._cast_cache: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor, trainable: bool) -> None:
        """A trainable tensor becomes an fp32 master copy (its AdamW state is fp32 too); a frozen one is kept
        as given, in its own dtype and storage (frozen tensors are never written in place), so a bf16 anchor's
        weights are held once, in bf16 (flexolmo_core/io/dtypes.py)."""
        if trainable:
            self.register_parameter(name, nn.Parameter(tensor.detach().to(torch.float32, copy=True).contiguous()))
        else:
            self.register_buffer(name, tensor.detach().contiguous())

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = getattr(self, name)
        if t.dtype == dtype:
            return t
        if name in self._parameters:  # (a plain tensor in its place under torch.func.functional_call)
            return t.to(dtype)  # differentiable cast of a trainable weight
        cached = self._cast_cache.get(name)
        if cached is None or cached.device != t.device:
            cached = self._cast_cache[name] = t.to(dtype)
        return cached

    def clear_cache(self) -> None:
        self._cast_cache.clear()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEShape):
        super().__init__()
        self.cfg, self.moe = cfg, moe
        self.w = Slots()
        # Router tuning's auxiliary loss: with targets [B] set (FastOlmo.set_router_targets), the forward leaves
        # this layer's routing cross-entropy against them in `router_ce`.
        self.router_targets: torch.Tensor | None = None
        self.router_ce: torch.Tensor | None = None

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w.get(name, torch.float32), self.cfg.norm_eps, cast_first=self.cfg.pre_norm)

    def attention(self, x: torch.Tensor, cos, sin, dt) -> torch.Tensor:
        B, T, d = x.shape
        H, KV, hd, w = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim, self.w
        xc = x.to(dt)
        q, k, v = (F.linear(xc, w.get(n, dt)) for n in ("q", "k", "v"))
        if self.cfg.qk_norm:  # OLMo-2: RMSNorm over the whole q and k projections
            q, k = self.norm(q, "q_norm"), self.norm(k, "k_norm")
        q = q.view(B, T, H, hd).transpose(1, 2)
        k, v = (t.view(B, T, KV, hd).transpose(1, 2) for t in (k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # in the compute dtype, as HF under autocast
        if KV != H:  # grouped-query attention: each key/value head serves H/KV consecutive query heads
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        out = causal_attention(q, k, v)
        return F.linear(out.transpose(1, 2).reshape(B, T, d), w.get("o", dt))

    def expert(self, e: int, x: torch.Tensor, dt) -> torch.Tensor:
        gate, up = F.linear(x, self.w.get(f"gate_up_{e}", dt)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w.get(f"down_{e}", dt))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (softmax and z-loss are precision-sensitive; the matmul is tiny)."""
        E = self.moe.num_experts
        weight = torch.stack([self.w.get(f"router_{e}", torch.float32) for e in range(E)])
        logits = F.linear(x.float(), weight)
        if self.moe.use_bias:
            logits = logits + torch.stack([self.w.get(f"bias_{e}", torch.float32) for e in range(E)]).clamp(max=0.0)
        return logits

    def ffn(self, x: torch.Tensor, dt, router_z: list) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        xc = flat.to(dt)
        if self.moe.num_experts == 1:
            return self.expert(0, xc, dt).view(B, T, d)
        logits = self.router_logits(flat)
        router_z.append(torch.logsumexp(logits, dim=-1).pow(2).mean())
        if self.router_targets is not None:  # one label per sequence, so every token of row b has label b
            self.router_ce = F.cross_entropy(logits, self.router_targets.repeat_interleave(T))
        probs = torch.softmax(logits, dim=-1)
        E, k = self.moe.num_experts, self.moe.top_k
        if k == E:  # dense soft mixture, as top-k of k with raw (unrenormalised) weights
            out = sum(self.expert(e, xc, dt) * probs[:, e:e + 1].to(dt) for e in range(E))
            return out.view(B, T, d)
        weights, index = torch.topk(probs, k, dim=-1)
        if self.moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(xc)
        for e in range(E):
            token, slot = torch.where(index == e)
            if token.numel():
                y = self.expert(e, xc[token], dt) * weights[token, slot, None].to(dt)
                out = out.index_add(0, token, y)
        return out.view(B, T, d)

    def after_attention(self, x, cos, sin, dt) -> torch.Tensor:
        """The residual stream after the attention sublayer (fp32)."""
        if self.cfg.pre_norm:  # Llama family: x + attn(norm(x))
            return x + self.attention(self.norm(x, "attn_norm"), cos, sin, dt).float()
        return x + self.norm(self.attention(x, cos, sin, dt), "attn_norm").float()  # OLMo-2: x + norm(attn(x))

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the FFN (and so the router) reads: h itself (OLMo-2) or norm(h) (Llama family)."""
        return self.norm(h, "ffn_norm") if self.cfg.pre_norm else h

    def forward(self, x, cos, sin, dt, router_z):
        h = self.after_attention(x, cos, sin, dt)
        out = self.ffn(self.ffn_input(h), dt, router_z)
        return h + (out.float() if self.cfg.pre_norm else self.norm(out, "ffn_norm").float())


class FastOlmo(nn.Module):
    """OLMo-2 decoder with (optionally) FlexOlmo experts; every tensor individually trainable or frozen.

    forward(ids) -> (logits [B, T, V] in the compute dtype, router z-loss summed over layers)."""

    def __init__(self, cfg: ModelConfig, moe: MoEShape, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.moe, self.compute_dtype = cfg, moe, compute_dtype
        self.w = Slots()
        self.layers = nn.ModuleList(Block(cfg, moe) for _ in range(cfg.n_layers))

    def forward(self, ids: torch.Tensor):
        dt = self.compute_dtype
        cos, sin = (t.to(dt) for t in rope_tables(self.cfg, ids.shape[1], ids.device))
        x = F.embedding(ids, self.w.get("embed", torch.float32))
        router_z: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x, cos, sin, dt, router_z)
        x = rms_norm(x, self.w.get("norm", torch.float32), self.cfg.norm_eps, cast_first=self.cfg.pre_norm)
        logits = F.linear(x.to(dt), self.w.get("embed" if self.cfg.tie_embeddings else "lm_head", dt))
        zero = logits.new_zeros((), dtype=torch.float32)
        return logits, (torch.stack(router_z).sum() if router_z else zero)

    def hidden_states(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The router input (post-attention residual) of every layer, fp32: for anchor-hidden embeddings."""
        dt = self.compute_dtype
        cos, sin = (t.to(dt) for t in rope_tables(self.cfg, ids.shape[1], ids.device))
        x = F.embedding(ids, self.w.get("embed", torch.float32))
        out = []
        for layer in self.layers:
            h = layer.after_attention(x, cos, sin, dt)
            out.append(layer.ffn_input(h).float())
            ffn = layer.ffn(out[-1], dt, [])
            x = h + (ffn.float() if self.cfg.pre_norm else layer.norm(ffn, "ffn_norm").float())
        return out

    def set_router_targets(self, targets: torch.Tensor | None) -> None:
        """Expert labels [B] for the next forward's rows (None: off)."""
        for layer in self.layers:
            layer.router_targets, layer.router_ce = targets, None

    def routing_ce(self) -> torch.Tensor:
        """Mean over layers of the last forward's routing cross-entropy against the targets."""
        return torch.stack([layer.router_ce for layer in self.layers]).mean()

    # ---- weights ------------------------------------------------------------------------------------------
    def slots(self):
        """(module, local name, global name) for every tensor."""
        yield from ((self.w, n, n) for n in self._slot_names(self.w))
        for i, layer in enumerate(self.layers):
            yield from ((layer.w, n, f"layers.{i}.{n}") for n in self._slot_names(layer.w))

    @staticmethod
    def _slot_names(slots: Slots) -> list[str]:
        return [n for n, _ in slots.named_parameters(recurse=False)] + [n for n, _ in slots.named_buffers(recurse=False)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {g: getattr(m, n) for m, n, g in self.slots()}

    def clear_cast_cache(self) -> None:
        self.w.clear_cache()
        for layer in self.layers:
            layer.w.clear_cache()

    @torch.no_grad()
    def project_after_step(self) -> None:
        """Keep learned router biases non-positive (the paper's negative bias)."""
        if self.moe.use_bias:
            for layer in self.layers:
                for name, p in layer.w.named_parameters(recurse=False):
                    if name.startswith("bias_"):
                        p.clamp_(max=0.0)


def build(cfg: ModelConfig, moe: MoEShape, tensors: dict[str, torch.Tensor], trainable, compute_dtype) -> FastOlmo:
    """A FastOlmo from internal-name tensors; `trainable(name) -> bool` decides Parameter vs buffer."""
    model = FastOlmo(cfg, moe, compute_dtype)
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, local = name.split(".", 2)
            model.layers[int(i)].w.put(local, t, trainable(name))
        else:
            model.w.put(name, t, trainable(name))
    missing = set(expected_names(cfg, moe)) - set(tensors)
    if missing:
        raise InputError(f"missing tensors for the fast model: {sorted(missing)[:5]}")
    return model


def expected_names(cfg: ModelConfig, moe: MoEShape) -> list[str]:
    names = ["embed", "norm"] + ([] if cfg.tie_embeddings else ["lm_head"])
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        names += [p + n for n in ("q", "k", "v", "o", "attn_norm", "ffn_norm")]
        names += [p + n for n in ("q_norm", "k_norm") if cfg.qk_norm]
        for e in range(moe.num_experts):
            names += [f"{p}gate_up_{e}", f"{p}down_{e}"]
            if moe.num_experts > 1:
                names.append(f"{p}router_{e}")
                if moe.use_bias:
                    names.append(f"{p}bias_{e}")
    return names


def init_tensors(cfg: ModelConfig, moe: MoEShape, seed: int) -> dict[str, torch.Tensor]:
    """Fresh weights like transformers' init (normal(0, init_std), norms 1, router rows 0): for the
    unrestricted-MoE baseline, which starts from scratch like the anchor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"embed": (cfg.vocab_size, cfg.d_model), "lm_head": (cfg.vocab_size, cfg.d_model),
              "q": (cfg.d_model, cfg.d_model), "k": (cfg.kv_dim, cfg.d_model), "v": (cfg.kv_dim, cfg.d_model),
              "o": (cfg.d_model, cfg.d_model), "gate_up": (2 * cfg.ffn_hidden, cfg.d_model),
              "down": (cfg.d_model, cfg.ffn_hidden)}
    for name in expected_names(cfg, moe):
        local = name.rsplit(".", 1)[-1]
        base = local.rsplit("_", 1)[0] if local.startswith(("gate_up_", "down_", "router_", "bias_")) else local
        if base in shapes:
            out[name] = torch.randn(shapes[base], generator=g) * cfg.init_std
        elif base in ("router", "bias"):
            out[name] = torch.zeros(cfg.d_model) if base == "router" else torch.zeros(())
        else:
            out[name] = torch.ones(cfg.kv_dim if local == "k_norm" else cfg.d_model)
    return out


def upcycle_tensors(dense: dict[str, torch.Tensor], n_layers: int, public_rows: torch.Tensor,
                    domain_rows: torch.Tensor, use_bias: bool) -> dict[str, torch.Tensor]:
    """The owner model (METHOD 3) in internal names: expert 1 = copy of the anchor FFN; rows are [L, d]."""
    out = dict(dense)
    for i in range(n_layers):  # not cloned: `build` makes trainable tensors fp32 copies of their own
        out[f"layers.{i}.gate_up_1"] = dense[f"layers.{i}.gate_up_0"]
        out[f"layers.{i}.down_1"] = dense[f"layers.{i}.down_0"]
        out[f"layers.{i}.router_0"] = public_rows[i]
        out[f"layers.{i}.router_1"] = domain_rows[i]
        if use_bias:
            out[f"layers.{i}.bias_0"] = torch.zeros(())
            out[f"layers.{i}.bias_1"] = torch.zeros(())
    return out


def count_matmul_flops(cfg: ModelConfig, moe: MoEShape, seq_len: int, trainable) -> dict[str, float]:
    """Matmul FLOPs per token of one training step, counting only the work a step must do (DESIGN.md):
    forward + input gradients down to the lowest trainable tensor + weight gradients of trainable weights.

    `trainable(name)` as in `build`. Attention mixing is counted causally (seq_len/2 keys on average)."""
    d, I, V, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    E, k = moe.num_experts, moe.top_k
    ffn = 2 * 3 * d * I  # one expert's forward, per token routed to it
    proj = {"q": 2 * d * d, "k": 2 * d * cfg.kv_dim, "v": 2 * d * cfg.kv_dim, "o": 2 * d * d}  # per projection
    attn = sum(proj.values())
    mix = 2 * 2 * d * (seq_len / 2)  # scores + weighted sum
    router = 2 * d * E if E > 1 else 0
    forward = L * (attn + mix + k * ffn + router) + 2 * V * d
    share = k / E  # fraction of tokens each expert sees
    names = expected_names(cfg, moe)
    head = "embed" if cfg.tie_embeddings else "lm_head"
    backward = 2 * V * d if trainable(head) else 0
    # walk from the bottom to find the lowest trainable tensor; backward runs from the top down to it
    lowest = next((i for i in range(L) if any(trainable(n) for n in names if n.startswith(f"layers.{i}."))), None)
    if trainable("embed"):
        lowest = -1
    if lowest is None:
        return {"forward": forward, "backward": backward, "train_step": forward + backward}
    backward += 2 * V * d  # gradient into the final hidden state
    for i in range(max(lowest, 0), L):
        p = f"layers.{i}."
        attn_trainable = [n for n in ("q", "k", "v", "o") if trainable(p + n)]
        expert_trainable = [e for e in range(E) if trainable(f"{p}gate_up_{e}")]
        backward += sum(proj[n] for n in attn_trainable) + len(expert_trainable) * ffn * share  # weight gradients
        below_needs = i > lowest or lowest == -1 or bool(attn_trainable) or trainable(p + "q_norm") \
            or trainable(p + "k_norm")
        if below_needs:  # full input gradient through this block
            backward += k * ffn + router + attn + 2 * mix
        else:  # lowest block, only its experts/router train: reach the expert weights, no further
            backward += len(expert_trainable) * (2 * d * I) * share
    return {"forward": forward, "backward": backward, "train_step": forward + backward}
