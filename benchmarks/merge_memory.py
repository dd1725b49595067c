"""Peak memory of `flexolmo merge` against the size of the merged weights.

Builds a random anchor at a preset and N expert packages (random perturbations of the anchor FFN: memory
does not depend on training), then merges in a fresh process and reads its peak RSS.
Usage: python benchmarks/merge_memory.py [--preset small] [--experts 3]"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries ru_maxrss across fork+exec.
CHILD = """
import json, sys, time
import torch, transformers, safetensors  # imports count as the baseline
from flexolmo_core.merge import merge
def hwm_kb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = hwm_kb()
t = time.time()
merge(sys.argv[1], sys.argv[3:], sys.argv[2])
print(json.dumps({"baseline_kb": base, "peak_kb": hwm_kb(), "seconds": time.time() - t}))
"""


def make_inputs(root: Path, preset: str, n_experts: int) -> tuple[Path, list[Path]]:
    import torch
    from flexolmo_core.anchor import init_anchor, load_anchor, read_fingerprint
    from flexolmo_core.data.tokenizer import train_tokenizer
    from flexolmo_core.owner import upcycle
    from flexolmo_core.package import package_tensors, save_package

    train_tokenizer(["memory benchmark text"] * 10, 300, root / "tok")
    init_anchor(preset, root / "tok", root / "anchor")
    anchor = load_anchor(root / "anchor")
    fingerprint = read_fingerprint(root / "anchor")
    packages = []
    for j in range(n_experts):
        owner = upcycle(anchor, domain_rows=torch.randn(anchor.config.hidden_size))
        with torch.no_grad():
            for layer in owner.model.layers:
                layer.mlp.experts.trainable_gate_up_proj.add_(torch.randn_like(layer.mlp.experts.trainable_gate_up_proj) * 1e-3)
        packages.append(root / f"pkg{j}")
        save_package(package_tensors(owner), packages[-1], f"domain{j}", fingerprint, anchor_dir=root / "anchor")
        del owner
    return root / "anchor", packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--experts", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        anchor, packages = make_inputs(root, args.preset, args.experts)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(anchor), str(root / "merged"), *map(str, packages)],
                              capture_output=True, text=True, check=True)
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        merged_mb = sum(f.stat().st_size for f in (root / "merged").glob("*.safetensors")) / 2**20
    peak_mb, base_mb = stats["peak_kb"] / 1024, stats["baseline_kb"] / 1024
    print(json.dumps({
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "preset": args.preset,
        "experts": 1 + args.experts, "merged_weights_mb": round(merged_mb, 1), "merge_seconds": round(stats["seconds"], 2),
        "rss_after_imports_mb": round(base_mb, 1), "peak_rss_mb": round(peak_mb, 1),
        "peak_over_imports_mb": round(peak_mb - base_mb, 1),
        "peak_rss / merged": round(peak_mb / merged_mb, 2),
        "(peak - imports) / merged": round((peak_mb - base_mb) / merged_mb, 2)}, indent=2))


if __name__ == "__main__":
    main()
