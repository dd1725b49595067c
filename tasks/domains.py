"""DVC stage `domains`: the sorted list of domain names from params.yaml -> outputs/domains/domains.json.

`domains` maps each domain to its own overrides. Stages that need only the *names* (prepare, tokenizer)
depend on this file instead of on the `domains` params, so editing one domain's overrides does not rerun
the data stages: this stage reruns (milliseconds), writes the same bytes, and DVC skips what follows."""
from __future__ import annotations

from flexolmo_core.data.config import check_domain_name
from flexolmo_core.io.atomic import write_json
from flexolmo_core.io.params import ParamsError, read_params
from tasks import run

OUT = "outputs/domains/domains.json"


def main(params: str = "params.yaml") -> int:
    raw = read_params(params).get("domains")
    if not isinstance(raw, (dict, list)) or not raw:
        raise ParamsError(f"{params}: `domains` must be a non-empty mapping (domain -> overrides), got {raw!r}")
    names = sorted(check_domain_name(d, expert=True) for d in raw)
    write_json(OUT, {"domains": names})
    print(f"domains: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    run(main)
