"""What a benchmark ran on: printed next to every figure (this machine is shared and noisy)."""
from __future__ import annotations

import os
import platform


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


def recorded_stamp() -> dict:
    """Where a result was measured, for its JSON record (the results pages print it beside each table): the
    commit of the code that ran (None outside a git checkout) and the machine."""
    import subprocess
    from pathlib import Path

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    m = machine()
    return {"commit": head.stdout.strip() or None, "machine": f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"}
