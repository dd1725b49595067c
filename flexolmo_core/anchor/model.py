"""The anchor: a dense OLMo-2-style model (`Olmo2ForCausalLM`) that every owner trains against.

Its fingerprint is a hash of the weights every expert shares (embeddings, attention, norms, LM head,
public FFN) and of the tokenizer. It travels in every expert package and every merged model."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

import flexolmo_core.io.layout as layout
from flexolmo_core.anchor.families import DENSE_TYPE, FAMILY_OF, family_of_type, write_config
from flexolmo_core.anchor.presets import ModelConfig, get_preset
from flexolmo_core.data.tokenizer import make_tokenizer_portable
from flexolmo_core.errors import InputError, MissingInput, read_json, require
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.checkpoint import check_checkpoint, checkpoint_getter

ANCHOR_MANIFEST = "flexolmo_anchor.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def olmo2_config(cfg: ModelConfig, tokenizer):
    from transformers import Olmo2Config

    if len(tokenizer) > cfg.vocab_size:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but the model preset's vocab_size is {cfg.vocab_size}: "
                         "set tokenizer.vocab_size in params.yaml to null (follow the preset) or to at most "
                         f"{cfg.vocab_size}, or choose a preset with a larger vocabulary")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; documents are separated by EOS in training")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Olmo2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=False,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
    )


def model_config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig that an HF Olmo2 / FlexOlmo / Llama / Mistral / Mixtral config describes; anything
    else is refused, naming the supported types."""
    family = family_of_type(hf_config.model_type)  # refuses anything else, naming the supported types
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"unsupported RoPE scaling {rope.get('rope_type')!r} (only the default RoPE is implemented)")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise InputError(f"head_dim {head_dim} x {hf_config.num_attention_heads} heads != hidden_size "
                         f"{hf_config.hidden_size}: decoupled head widths are not supported")
    if family == "llama" and (getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)
                              or getattr(hf_config, "sliding_window", None)):
        raise InputError("unsupported Llama-family options: attention/MLP biases or sliding-window attention")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return ModelConfig(
        vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, ffn_hidden=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=hf_config.rms_norm_eps, init_std=hf_config.initializer_range, family=family,
        n_kv_heads=None if kv_heads == hf_config.num_attention_heads else kv_heads,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files byte for byte (re-saving could reformat them and change the fingerprint)."""
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").exists():
        raise MissingInput(f"{src}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    make_tokenizer_portable(dst)  # a folder written by transformers 5 (data/tokenizer.py)


def save_anchor(model, tokenizer_dir: str | os.PathLike, out: str | os.PathLike, preset: str | None = None,
                extra: dict | None = None) -> str:
    """Save an Olmo2ForCausalLM anchor with its tokenizer atomically; returns the fingerprint."""
    with atomic_dir(out, signature=("config.json", ANCHOR_MANIFEST)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_config(tmp, model.config)  # portable to transformers 4.x (families.portable_config)
        copy_tokenizer(tokenizer_dir, tmp)
        fingerprint = anchor_fingerprint(tmp)
        write_json(tmp / ANCHOR_MANIFEST, {"fingerprint": fingerprint, "preset": preset, **(extra or {})})
    return fingerprint


def init_anchor(preset: str | ModelConfig, tokenizer_dir: str | os.PathLike, out: str | os.PathLike,
                seed: int = 0) -> str:
    """A randomly initialised anchor (pretraining happens in the training stage); returns the fingerprint."""
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise MissingInput(f"{tokenizer_dir}: no tokenizer.json (expected a Hugging Face tokenizer directory)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(olmo2_config(cfg, tokenizer))
    return save_anchor(model, tokenizer_dir, out, preset=preset if isinstance(preset, str) else None,
                       extra={"seed": seed})


def check_anchor(path: str | os.PathLike) -> dict:
    """config.json of a dense anchor checkpoint folder (Olmo2, Llama, Mistral), after checking its files."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise MissingInput(f"{path}: not an anchor checkpoint (no config.json)")
    config = check_checkpoint(path)
    dense = sorted(t for t in FAMILY_OF if t not in DENSE_TYPE)
    if config.get("model_type") not in dense:
        raise InputError(f"{path / 'config.json'}: model_type {config.get('model_type')!r}; an anchor is a dense "
                         f"model of type {', '.join(dense)}")
    return config


def load_anchor(path: str | os.PathLike):
    """The dense anchor (Olmo2ForCausalLM, or LlamaForCausalLM / MistralForCausalLM) in its own dtype."""
    from transformers import AutoModelForCausalLM

    check_anchor(path)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype="auto")


# ---- fingerprint -------------------------------------------------------------------------------------------

def _hash_tensor(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu().reshape(-1)  # 0-d tensors cannot be viewed as bytes
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tokenizer_hash(model_dir: str | os.PathLike) -> str:
    data = read_json(Path(model_dir) / "tokenizer.json", what="tokenizer")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def shared_tensors(names, get):
    """Yield (anchor-style name, tensor) for every shared weight and the public FFN, in sorted order.

    `get(name, expert)` is a checkpoint getter. Works on an anchor (dense) and on a MoE model in either form
    (expert 0 is the public FFN), so a merged or owner model can be checked against the anchor it claims."""
    names = list(names)
    sources = {n: (lambda n=n: get(n, None)) for n in names if not layout.is_moe_tensor(n)}
    if len(sources) < len(names):  # a MoE model: its expert 0 in the anchor's dense names
        reader = layout.MoEReader(names, get)
        for i in range(layout.n_layers_of(dict.fromkeys(names))):
            for part, name in zip(layout.PARTS, layout.dense_ffn_names(i)):
                sources[name] = lambda i=i, part=part: reader.part(i, 0, part)
    for name in sorted(sources):
        yield name, sources[name]()


def fingerprint_from(names, get, tokenizer_sha: str) -> str:
    h = hashlib.sha256()
    for name, tensor in shared_tensors(names, get):
        _hash_tensor(h, name, tensor)
    h.update(b"tokenizer|" + tokenizer_sha.encode())
    return "anchor-" + h.hexdigest()[:32]


def anchor_fingerprint(model_dir: str | os.PathLike) -> str:
    """Fingerprint computed from the weights and tokenizer on disk (anchor or FlexOlmo checkpoint)."""
    names, get = checkpoint_getter(model_dir)
    return fingerprint_from(names, get, tokenizer_hash(model_dir))


def read_fingerprint(model_dir: str | os.PathLike) -> str:
    """The recorded fingerprint if present (cheap), else computed from the weights."""
    manifest = Path(model_dir) / ANCHOR_MANIFEST
    if manifest.exists():
        return require(read_json(manifest, what="anchor manifest"), "fingerprint", str, manifest)
    return anchor_fingerprint(model_dir)
