"""DVC stage `prepare`: params `prepare` + `domains` -> outputs/prepare/<domain>/{train,validation,test}/ + cards."""
from __future__ import annotations

import json
import time

from flexolmo_core.data.config import PrepareConfig, flexmix_domains
from flexolmo_core.data.prepare import build_flexmix
from flexolmo_core.io.params import load_section, read_params
from tasks import run, say

OUT = "outputs/prepare"


def main(params: str = "params.yaml") -> None:
    config = load_section(PrepareConfig, "prepare", params)
    start = time.perf_counter()
    card = build_flexmix(config, flexmix_domains(read_params(params).get("domains")), OUT, progress=say)
    print(json.dumps({"tier": card["tier"], "seconds": round(time.perf_counter() - start, 1),
                      "tokens": {d: c["tokens"] for d, c in card["domains"].items()}}, indent=2))


if __name__ == "__main__":
    run(main)
