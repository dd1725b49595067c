"""The `serve` section of params.yaml (also the `flexolmo serve` options)."""
from __future__ import annotations

import dataclasses

from flexolmo_core.io.params import at_least, between, check_ranges


@dataclasses.dataclass
class ServeConfig:
    """`serve` stage: the policy-aware server over a merged model."""
    host: str = "127.0.0.1"  # interface to listen on (127.0.0.1: this machine only)
    port: int = at_least(1, 8000)  # TCP port
    max_batch: int = at_least(1, 16)  # sequences decoded together in one forward pass
    batch_wait_ms: float = at_least(0, 50.0)  # how long a batch waits for more requests (clients resubmit ms later)
    queue_depth: int = at_least(1, 64)  # requests waiting beyond the running batch; more get 429
    max_tokens_cap: int = at_least(1, 256)  # the largest max_tokens a request may ask for (more: 400)
    default_max_tokens: int = at_least(1, 16)  # when a request gives no max_tokens
    max_n: int = at_least(1, 4)  # the most choices (n) one request may ask for; each is one sequence in the batch
    max_prompt_tokens: int = at_least(1, 1024)  # longer prompts get 400 (by characters first, before tokenizing)
    max_body_bytes: int = at_least(1, 1_048_576)  # a larger request body gets 413, before it is read whole or parsed
    max_json_depth: int = at_least(1, 32)  # deeper nesting of arrays and objects gets 400, before parsing
    top_k: int | None = at_least(1, None)  # experts per token (None = the checkpoint's)
    # prefix-pooled routing weight (0: off, the paper's routing): each token's router logits mixed with the
    # running mean over its sequence, carried through the KV cache (flexolmo_core/inference/moe.py, FlexRouter.pool)
    prefix_pool: float = between(0.0, 1.0, 0.0)
    audit_log: str = "runs/serve/audit.jsonl"  # one JSON line per request (appended, flushed, fsynced)
    log_text: bool = False  # also record prompts and completions in the audit log
    poll_seconds: float = at_least(0.1, 2.0)  # how often the policy file and the release are checked
    threads: int = at_least(0, 0)  # torch intra-op threads (0 = torch's default)
    device: str = "auto"  # auto | cpu | cuda: where the model runs (fp32 on the CPU, its own dtype on a GPU)

    def __post_init__(self):
        check_ranges(self, "serve")
