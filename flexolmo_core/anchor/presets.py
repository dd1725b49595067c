"""Model shapes as presets. A config reports parameters and FLOPs without allocating weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flexolmo_core.errors import InputError

FAMILIES = {"olmo2": "post", "llama": "pre"}  # architecture family -> where the RMSNorms sit


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of one of two families, one code path: `olmo2` (the paper's: norm after each sublayer,
    QK-norm, untied LM head) or `llama` (Llama / Mistral / SmolLM2: norm before each sublayer, no QK-norm,
    grouped-query attention and tied embeddings allowed). With `num_experts > 1` the FFN becomes experts
    (FlexOlmo for olmo2, Mixtral for llama)."""

    vocab_size: int  # embedding rows (>= the tokenizer's size; padded for fast matmuls)
    d_model: int  # hidden width
    n_layers: int  # decoder blocks
    n_heads: int  # attention heads
    ffn_hidden: int  # SwiGLU intermediate width of one FFN / one expert
    max_seq_len: int = 4096  # RoPE positions the model is configured for
    rope_theta: float = 500000.0  # RoPE base (OLMo-2: 500000)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # weight init for a freshly initialised anchor
    family: str = "olmo2"  # olmo2 | llama (see the class docstring)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads (OLMo-2 7B)
    tie_embeddings: bool = False  # the LM head is the input embedding (SmolLM2); OLMo-2 unties them

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise InputError(f"unknown architecture family {self.family!r}; supported: {sorted(FAMILIES)}")
        if self.n_heads % self.kv_heads or self.d_model % self.n_heads:
            raise InputError(f"n_heads {self.n_heads} must divide d_model {self.d_model} and be a multiple of "
                             f"n_kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def pre_norm(self) -> bool:
        return FAMILIES[self.family] == "pre"

    @property
    def qk_norm(self) -> bool:
        return self.family == "olmo2"

    # Parameter counts, by part (no allocation).
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model  # input embeddings; an untied LM head is the same size

    def attention_params_per_layer(self) -> int:
        # q, o (d x d) and k, v (d x kv_dim) projections + QK-norm over the whole q and k (olmo2) + 2 norms
        qk_norm = self.d_model + self.kv_dim if self.qk_norm else 0
        return 2 * self.d_model * self.d_model + 2 * self.d_model * self.kv_dim + qk_norm + 2 * self.d_model

    def ffn_params_per_layer(self) -> int:
        return 3 * self.d_model * self.ffn_hidden

    def shared_params(self) -> int:
        """Everything every expert shares: embeddings, attention, norms, final norm, LM head."""
        heads = 1 if self.tie_embeddings else 2
        return heads * self.embedding_params() + self.n_layers * self.attention_params_per_layer() + self.d_model

    def expert_params(self) -> int:
        """One expert = the FFN of every layer."""
        return self.n_layers * self.ffn_params_per_layer()

    def counts(self, num_experts: int = 1, top_k: int = 1) -> dict[str, int]:
        if not 1 <= top_k <= num_experts:
            raise InputError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        router = self.n_layers * num_experts * self.d_model if num_experts > 1 else 0
        total = self.shared_params() + num_experts * self.expert_params() + router
        active = self.shared_params() + top_k * self.expert_params() + router
        return {"total_params": total, "active_params": active, "shared_params": self.shared_params(),
                "expert_params": self.expert_params(), "router_params": router}

    def flops_per_token(self, num_experts: int = 1, top_k: int = 1, seq_len: int | None = None) -> dict[str, int]:
        """Forward matmul FLOPs per token (2 per multiply-add); training = 3x forward when all weights train."""
        seq_len = seq_len or self.max_seq_len
        attn_proj = 2 * self.d_model * self.d_model + 2 * self.d_model * self.kv_dim
        # causal attention scores and weighted sum: 2 matmuls of width d_model over (on average) seq_len/2 keys
        attn_mix = 2 * self.d_model * seq_len
        router = self.d_model * num_experts if num_experts > 1 else 0
        per_layer = 2 * (attn_proj + top_k * self.ffn_params_per_layer() + router) + attn_mix
        lm_head = 2 * self.vocab_size * self.d_model
        forward = self.n_layers * per_layer + lm_head
        return {"forward": forward, "train_all_weights": 3 * forward, "seq_len": seq_len}

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: seconds on one core
    "smoke": ModelConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, ffn_hidden=256, max_seq_len=256),
    # the default run on 2 CPU cores: minutes
    "tiny": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024, max_seq_len=512),
    # tiny's shape, trained and evaluated longer (params.yaml's `quality` overrides): about 40 minutes here
    "quality": ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, ffn_hidden=1024, max_seq_len=512),
    # a workstation or a single GPU
    "small": ModelConfig(vocab_size=16384, d_model=768, n_layers=12, n_heads=12, ffn_hidden=3072, max_seq_len=1024),
    # a 1B-class shape (OLMo-2 1B): one GPU (benchmarks/gpu_check.sh times an owner-expert step here)
    "olmo2-1b": ModelConfig(vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, ffn_hidden=8192,
                            max_seq_len=4096),
    # the paper's shapes (OLMo-2 7B): GPUs with torchrun/FSDP
    "olmo2-7b": ModelConfig(vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, ffn_hidden=11008,
                            max_seq_len=4096),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}") from None
