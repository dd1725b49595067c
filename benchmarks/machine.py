"""What a benchmark ran on: printed next to every figure (this machine is shared and noisy)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    import torch

    from flexolmo_core.io.dtypes import cpu_name

    cpu = cpu_name()

    try:
        with open("/proc/meminfo") as f:
            memory_gb = round(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        memory_gb = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def source_commit() -> str | None:
    """The commit of the code that runs: the one `git archive` wrote into source_commit.txt (export-subst, see
    .gitattributes) when this is a snapshot, else git's HEAD in a checkout; None when neither says. The snapshot's
    file comes first: a snapshot unpacked inside some other repository must not take that repository's HEAD."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        archived = (here / "source_commit.txt").read_text().strip()
    except OSError:
        archived = ""
    if archived and not archived.startswith("$Format"):  # substituted: this is a git-archive snapshot
        return archived
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here.parent, capture_output=True, text=True)
    return (head.stdout.strip() or None) if head.returncode == 0 else None


def recorded_stamp() -> dict:
    """Where a result was measured, for its JSON record (the results pages print it beside each table): the
    commit of the code that ran and the machine."""
    m = machine()
    return {"commit": source_commit(), "machine": f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"}
