"""Config dataclasses for the training stages. Each params.yaml section holds the common values plus
`presets: {<preset>: {overrides}}`; the top-level `preset` chooses which overrides apply."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flexolmo_core.errors import InputError
from flexolmo_core.io.dtypes import DEVICES
from flexolmo_core.io.params import NO_FLAG, ParamsError, at_least, check_ranges, from_dict, read_params
from flexolmo_core.training.privacy import DPConfig

DTYPE_NAMES = ("auto", "bfloat16", "float32", "float16")  # compute dtypes the loop accepts (torch names, or auto)


@dataclass
class LoopConfig:
    """One training run's hyper-parameters (the same loop for every stage)."""

    steps: int = 100  # optimiser steps
    global_batch: int = 8  # sequences per optimiser step, summed over ranks and micro-batches
    micro_batch: int = 8  # sequences per forward/backward on one rank (accumulation fills the rest)
    seq_len: int = 256  # tokens per sequence (inputs; each window also carries its next token)
    lr: float = 1e-3  # peak learning rate
    warmup: int = 10  # linear warmup steps
    final_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak (METHOD.md 3)
    weight_decay: float = 0.0  # AdamW decay on matrices and router rows (never on norms or biases)
    router_lr_scale: float = 1.0  # router rows and biases train at lr x this (1 = the paper: one lr for all)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # global gradient-norm clip
    router_z_loss: float = 1e-3  # x mean logsumexp(router logits)^2, summed over layers
    # x cross-entropy of each layer's routing (softmax over experts) against the label of the window's proxy set,
    # averaged over layers (router tuning only; 0 = the paper's LM loss alone; issue 29's lever, not in the paper)
    router_aux_ce: float = 0.0
    logit_z_loss: float = 1e-5  # x mean logsumexp(output logits)^2
    seed: int = 0  # data order (and fresh init where there is one)
    # matmul compute dtype; master weights and optimiser state stay fp32. auto (params.yaml's sections): bf16 on a
    # GPU, and on a CPU the faster of bf16 and fp32 there, resolved once per machine by the pipeline's numerics
    # stage, or measured when a run outside the pipeline starts (flexolmo_core/io/dtypes.py, rule 2). Made in code,
    # a run computes in fp32 unless told otherwise: exact, and the same on every machine (no timing decides).
    dtype: str = "float32"
    compile: bool = False  # torch.compile the model (pays on GPUs; on 2 CPU cores it costs a minute up front)
    checkpoint_every: int = 50  # optimiser steps between atomic checkpoints (and always at the end)
    keep_checkpoints: int = 2  # the last K are kept
    eval_batches: int = 8  # validation batches (micro_batch sequences each, fixed, in file order)
    eval_every: int = 0  # validation every N steps during training (0: only at the end)
    distributed: str = "ddp"  # under torchrun: ddp | fsdp (fsdp shards params, grads and optimiser state)
    device: str = "auto"  # auto | cpu | cuda: auto is the GPU when torch sees one (batches and reductions follow)
    threads: int = 0  # torch intra-op threads (0: torch's default)
    progress: bool = True  # rank 0 shows progress: a tqdm bar on a terminal, else a `[k/N]` line 20 times per run

    def __post_init__(self) -> None:
        """Refuse values that would train on nothing or write NaN (checked wherever a LoopConfig is made: params
        files and command-line flags alike)."""
        at_least = {"steps": 1, "global_batch": 1, "micro_batch": 1, "seq_len": 1, "checkpoint_every": 1,
                    "keep_checkpoints": 1, "warmup": 0, "eval_batches": 0, "eval_every": 0, "threads": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise InputError(f"loop.{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise InputError(f"loop.lr must be a positive number, got {self.lr}")
        if not 0 <= self.router_aux_ce < float("inf"):
            raise InputError(f"loop.router_aux_ce must be a number >= 0, got {self.router_aux_ce}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise InputError(f"loop.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.dtype not in DTYPE_NAMES:
            raise InputError(f"loop.dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

        if self.device not in DEVICES:
            raise InputError(f"loop.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise InputError(f"loop.distributed must be ddp or fsdp, got {self.distributed!r}")


@dataclass
class NumericsConfig:
    """`numerics` stage: `loop.dtype: auto` resolved once for this machine, before any training stage."""

    bf16_margin: float = 1.1  # on a CPU, auto takes bf16 only where its matmul rate is at least this x fp32's

    def __post_init__(self) -> None:
        if not 0 < self.bf16_margin < float("inf"):
            raise InputError(f"numerics.bf16_margin must be a positive number, got {self.bf16_margin}")


@dataclass
class AnchorConfig:
    """`anchor` stage: a dense model pretrained on public data only; also fixes the router projection."""

    # train (pretrain here), or a published dense checkpoint to import: a folder, a GGUF file,
    # pkg:<python package>/<file> (offline model packages) or a hub id. Imported, the tokenizer stage packs with
    # the checkpoint's tokenizer and the anchor stage imports instead of pretraining.
    source: str = "train"
    gguf_file: str | None = None  # with a folder source: the GGUF file in it
    data_domain: str = "public"  # the anchor's only data
    init_seed: int = 0  # weight init
    projection_dim: int = 384  # encoder width the router projection accepts (all-MiniLM-L6-v2: 384)
    projection_seed: int = 0  # the projection is a fixed random map; it belongs to the anchor
    replay_tokens: int = 0  # public tokens shipped with the anchor for owners' public mix (0: none)
    loop: dict = field(default_factory=dict, metadata=NO_FLAG)  # LoopConfig values (flags: LoopConfig's)
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}


@dataclass
class DomainEmbeddingConfig:
    """`domain_embedding` stage: one router row (or one per layer) from a domain's documents."""

    mode: str = "encoder"  # encoder | anchor-hidden | random
    encoder: str = "all-MiniLM-L6-v2"  # sentence-transformers name or path; the default ships offline
    documents: int = at_least(1, 1000)  # documents sampled from the domain's train split
    max_chars: int = at_least(1, 4000)  # each document is cut to this many characters before encoding
    seed: int = 0  # document sample (and the random mode's vector)
    center: bool = False  # subtract the public mean first (the public row becomes 0): rows encode differences
    unit_norm: bool = False  # L2-normalise each row (per layer) before `scale` (anchor-hidden means are ~|h| large)
    scale: float = 1.0  # multiplies the final vector (router logit scale; METHOD.md 4: norms ~0.4-0.55)
    random_std: float = 0.02  # random mode: normal(0, std) per coordinate (the paper's ablation)
    batch_size: int = at_least(1, 32)  # documents per encoder forward pass (anchor-hidden runs one at a time)
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}

    def __post_init__(self) -> None:
        check_ranges(self, "domain_embedding")


@dataclass
class ExpertConfig:
    """`expert` stage: expert 1 of a 2-expert model, trained against the frozen anchor."""

    use_bias: bool = False  # learn a non-positive router logit bias (the paper's "learnbias")
    public_mix: float = 0.0  # fraction of training windows drawn from the anchor's public replay sample
    # Experts per token in the owner's 2-expert model: 2 = the paper's soft mixture; 1 routes each token to one
    # FFN, weighted by its raw probability (a lever; with Mixtral's renormalised weights the router gets no gradient).
    top_k: int = 2
    dp: DPConfig = field(default_factory=DPConfig)  # DP-SGD on the expert's tensors (training/privacy.py); off
    loop: dict = field(default_factory=dict, metadata=NO_FLAG)  # LoopConfig values (flags: LoopConfig's)
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}

    def __post_init__(self) -> None:
        if self.top_k not in (1, 2):
            raise InputError(f"expert.top_k must be 1 or 2 (the owner model has 2 experts), got {self.top_k}")


@dataclass
class RouterTuneConfig:
    """`router_tune`: only router rows (and biases) of a merged model, all experts active, on proxy data."""

    public_windows: int = 64  # windows sampled from public data for the proxy mix
    proxy_windows: int = 64  # windows per owner proxy set (what owners chose to share)
    top_k: int | None = None  # experts per token while tuning; null = all (the paper), k = the merged model's
    # gradient: the paper's router tuning (the loop below); ridge: a closed-form router from the same proxy sets,
    # no gradient steps (training/ridge_router.py; issue 29's lever, not in the paper)
    method: str = "gradient"
    ridge_alpha: float = 1e-2  # ridge penalty, as a fraction of the mean diagonal of X^T X
    ridge_public_target: float = 1.0  # target of the public expert on owners' tokens (1: beside each owner; 0: one-hot)
    ridge_scale: float = 1.0  # router temperature: multiplies the fitted rows (scores near 0..1)
    loop: dict = field(default_factory=dict, metadata=NO_FLAG)  # LoopConfig values (flags: LoopConfig's)
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}

    def __post_init__(self) -> None:
        if self.method not in ("gradient", "ridge"):
            raise ParamsError(f"router_tune.method must be gradient or ridge (--method), got {self.method!r}")
        for name in ("ridge_alpha", "ridge_scale"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ParamsError(f"router_tune.{name} must be a positive number (--{name.replace('_', '-')}), "
                                  f"got {getattr(self, name)!r}")


@dataclass
class BTXConfig:
    """`btx`: the BTX baseline: the merged experts with a router learned from scratch on all training data,
    with router tuning's loop and budget (read from the `router_tune` section, so the two stay equal)."""

    enabled: bool = True  # false: the stage records `not run` (at tiny it would push the run past 30 minutes)
    init_std: float = 0.02  # router rows start as normal(0, init_std), as a freshly initialised MoE router
    init_seed: int = 0  # that draw
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}


@dataclass
class UnrestrictedConfig:
    """The unrestricted-MoE baseline: the merged model's shape trained jointly on all data from scratch,
    with the training FLOPs of anchor + every expert."""

    enabled: bool = True  # false: the stage records `not run` (it costs as much as anchor + all experts)
    top_k: int | None = None  # null = the merged model's default (half the experts, rounded up)
    init_seed: int = 0  # weight init of the jointly trained model
    loop: dict = field(default_factory=dict, metadata=NO_FLAG)  # LoopConfig values (flags: LoopConfig's)
    presets: dict = field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}


def resolve(section_cfg, preset: str, domain_overrides: dict | None = None, where: str = "params.yaml"):
    """(stage config with the preset's overrides applied, LoopConfig or None)."""
    overrides = dict((getattr(section_cfg, "presets", None) or {}).get(preset, {}) or {})
    overrides.update(domain_overrides or {})
    own = {f.name for f in dataclasses.fields(section_cfg)} - {"loop", "presets"}
    stage_over = {k: v for k, v in overrides.items() if k in own}
    loop_over = {k: v for k, v in overrides.items() if k not in own}
    merged = from_dict(type(section_cfg), {**_plain(section_cfg), **stage_over}, where)
    if not hasattr(section_cfg, "loop"):
        if loop_over:
            raise ParamsError(f"{where}: unknown field(s) {sorted(loop_over)}")
        return merged, None
    loop = from_dict(LoopConfig, {**(section_cfg.loop or {}), **loop_over}, f"{where}.loop")
    return merged, loop


def _plain(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def load_stage(cls, section: str, path="params.yaml", domain: str | None = None, preset: str | None = None):
    """Read one section, apply the preset's and (for per-domain stages) the domain's overrides."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path}: missing section '{section}'")
    cfg = from_dict(cls, data[section] or {}, f"{path}:{section}")
    preset = preset or data.get("preset", "tiny")
    domain_over = {}
    if domain is not None:
        raw = ((data.get("domains") or {}).get(domain) or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        if "loop" in fields:
            fields |= {f.name for f in dataclasses.fields(LoopConfig)}
        domain_over = {k: v for k, v in raw.items() if k in fields}
    stage, loop = resolve(cfg, preset, domain_over, f"{path}:{section}")
    return preset, stage, loop
