"""One typed entry per training step: the CLI command, the DVC stage and the Prefect flow each build the job
and make one call, so what a step reads is said once."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo_core.data.readers import read_texts
from flexolmo_core.errors import read_json
from flexolmo_core.training.config import DomainEmbeddingConfig, ExpertConfig, LoopConfig
from flexolmo_core.training.embeddings import EMBEDDING_META, load_embedding, write_domain_embedding
from flexolmo_core.training.stages import train_expert

PathLike = str | os.PathLike


@dataclass(frozen=True)
class EmbeddingJob:
    """One domain's router embedding (the public one too), from its documents through the anchor."""

    anchor: PathLike
    domain: str
    data: PathLike | list[PathLike]  # the domain's documents (.txt/.jsonl files or folders)
    out: PathLike                    # the embedding folder: embedding.safetensors and its record, embedding.json
    stage: DomainEmbeddingConfig
    public_embedding: PathLike | None = None  # the public folder, whose raw mean a domain centers on (stage.center)


def embed_domain_job(job: EmbeddingJob) -> torch.Tensor:
    """Compute and save the job's rows; the record says the domain and every setting that made them."""
    record = {"domain": job.domain, **{k: v for k, v in dataclasses.asdict(job.stage).items() if k != "presets"}}
    data = [job.data] if isinstance(job.data, (str, os.PathLike)) else job.data
    return write_domain_embedding(job.out, job.domain, read_texts(data), job.anchor, job.stage, record,
                                  job.public_embedding)


@dataclass(frozen=True)
class ExpertJob:
    """One owner's expert: the anchor, this domain's data and router embeddings, and where it all goes."""

    anchor: PathLike                       # the anchor folder the owner received
    domain: str
    data: PathLike | list[PathLike]        # this domain's training data (packed split, .txt/.jsonl files or folders)
    out: PathLike                          # the stage folder: run/, summary.json and (by default) package/
    stage: ExpertConfig
    loop: LoopConfig
    val_data: PathLike | list[PathLike] | None = None
    public_embedding: PathLike | None = None  # router row of the public expert (None: zeros)
    domain_embedding: PathLike | None = None  # this domain's router row; its embedding.json goes into the package
    package_dir: PathLike | None = None       # default: out/package


def train_expert_job(job: ExpertJob) -> dict:
    """Train the job's expert (`training.stages.train_expert`); returns its summary."""
    meta_file = Path(job.domain_embedding) / EMBEDDING_META if job.domain_embedding else None
    meta = read_json(meta_file, what="domain embedding record") if meta_file and meta_file.exists() else None
    rows = {name: load_embedding(path) if path else None
            for name, path in (("public", job.public_embedding), ("domain", job.domain_embedding))}
    return train_expert(job.anchor, job.domain, job.data, job.out, job.loop, val_data=job.val_data,
                        public_rows=rows["public"], domain_rows=rows["domain"], use_bias=job.stage.use_bias,
                        embedding_meta=meta, package_dir=job.package_dir, public_mix=job.stage.public_mix,
                        top_k=job.stage.top_k, dp=job.stage.dp)
