"""Stage `numerics`: `loop.dtype: auto` resolved once for this machine, before any training stage.
`python -m tasks.numerics`

in:  nothing but the machine (the CPU, the GPU torch sees) and params `numerics`
out: outputs/numerics/numerics.json: per device type, the dtype `auto` means here and the matmul rates that
     chose it, with the machine they were measured on. Every training stage depends on this file and reads its
     `auto` from it (tasks.pin_dtype), so a timing never decides one stage's numerics, and a different choice
     reruns the stages. A record made on this same machine is kept, not measured again."""
from __future__ import annotations

import json

from flexolmo_core.io.atomic import write_json
from flexolmo_core.io.dtypes import resolve_numerics
from flexolmo_core.io.params import load_section
from flexolmo_core.training.config import NumericsConfig
from flexolmo_core.training.loop import measure_matmul_peak
from tasks import NUMERICS, run, say


def main(params: str = "params.yaml") -> dict:
    cfg = load_section(NumericsConfig, "numerics", params)
    previous = json.loads(NUMERICS.read_text()) if NUMERICS.exists() else None
    record = resolve_numerics(previous, measure_matmul_peak, cfg.bf16_margin)
    if record is not previous:
        write_json(NUMERICS, record)
    for kind, choice in record["auto"].items():
        rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in choice["matmul_flops"].items()) or "not measured"
        say(f"numerics: loop.dtype auto -> {choice['dtype']} on {kind} ({rates} GFLOP/s; "
            f"{'kept from ' if record is previous else 'measured on '}{record['machine']['cpu']})")
    return record


if __name__ == "__main__":
    run(main)
