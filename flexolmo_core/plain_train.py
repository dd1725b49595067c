"""A plain owner-training loop: the minimum that trains an expert against the frozen anchor and
publishes a package. The full loop (schedules, z-losses, resume, DDP) lives in the training module;
this one exists so the core can be exercised end to end with nothing else."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .anchor import load_anchor, read_fingerprint
from .owner import frozen_differences, project_after_step, trainable_parameters, upcycle
from .package import check_domain_name, save_package


def read_texts(paths) -> list[str]:
    """Documents from .txt files (one document each), .jsonl files (field `text`), or folders of those."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    texts = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{f}: not UTF-8 text ({err})") from None
        if f.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{f}:{n}: expected a JSON object with a 'text' field ({err})") from None
        else:
            texts.append(raw)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"no text found in {[str(p) for p in paths]}")
    return texts


def pack_tokens(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents with EOS between them and cut into [N, seq_len + 1] windows (inputs + next token)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens of text; need more than seq_len={seq_len}")
    data = torch.tensor(ids[: n * seq_len + 1])
    return torch.stack([data[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])


def train_expert_plain(anchor_dir, domain: str, data_paths, out, steps: int = 20, seq_len: int = 64,
                       batch_size: int = 4, lr: float = 1e-3, seed: int = 0, use_bias: bool = False,
                       public_rows: torch.Tensor | None = None, domain_rows: torch.Tensor | None = None) -> dict:
    from transformers import AutoTokenizer

    check_domain_name(domain)
    texts = read_texts(data_paths)
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    windows = pack_tokens(texts, tokenizer, seq_len)
    anchor = load_anchor(anchor_dir)
    fingerprint = read_fingerprint(anchor_dir)
    torch.manual_seed(seed)
    model = upcycle(anchor, public_rows, domain_rows, use_bias=use_bias)
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
        out_ = model(input_ids=batch, labels=batch)  # transformers shifts the labels inside
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        project_after_step(model)
        losses.append(float(out_.loss.detach()))
    changed = frozen_differences(model, anchor, public_rows)
    if changed:  # the contract is structural; this check guards against future regressions
        raise RuntimeError(f"training changed frozen tensors: {changed[:5]}")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    training = {"loop": "plain", "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                "seed": seed, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "wall_seconds": round(time.time() - start, 3)}
    data = {"documents": len(texts), "tokens": int(windows.numel()), "sha256": digest.hexdigest()}
    return save_package(model, out, domain, fingerprint, training=training, data=data)
