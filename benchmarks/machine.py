"""What a benchmark ran on: printed next to every figure (this machine is shared and noisy)."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    try:
        with open("/proc/meminfo") as f:
            memory_gb = round(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        memory_gb = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
