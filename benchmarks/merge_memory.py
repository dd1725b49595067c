"""Peak memory of `flexolmo merge` on synthetic inputs of several GB, against the largest tensor, the largest
shard and the total, and the arithmetic that carries it to the paper's 8x7B.

Inputs are written one tensor at a time (random bf16 weights: memory does not depend on values): an OLMo-2
anchor and N expert packages at a shape chosen to reach --gb gigabytes in total. The merge runs in a fresh
process that reports its peak RSS (VmHWM, which counts mapped file pages too).

    python benchmarks/merge_memory.py [--gb 4.5] [--experts 4] [--shard-size 1GB] [--code DIR]
    python benchmarks/merge_memory.py --layers 4 --experts 8      # the same shape, more experts

--code DIR runs the merge with the code of another checkout (e.g. `git worktree add /tmp/before HEAD~1`) on the
same inputs: the before/after comparison."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import machine  # noqa: E402

# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries ru_maxrss across fork+exec.
CHILD = """
import inspect, json, sys, time
sys.path.insert(0, sys.argv[1])  # the checkout whose merge is measured (--code DIR), not necessarily this one
import torch, transformers, safetensors  # imports count as the baseline
from flexolmo_core.merge.merging import merge
def hwm_kb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = hwm_kb()
t = time.time()
kwargs = {"shard_bytes": int(sys.argv[4])} if "shard_bytes" in inspect.signature(merge).parameters else {}
merge(sys.argv[2], sys.argv[5:], sys.argv[3], **kwargs)
print(json.dumps({"baseline_kb": base, "peak_kb": hwm_kb(), "seconds": time.time() - t}))
"""

GB = 10**9


def shape_for(total_gb: float, experts: int, layers: int | None = None) -> dict:
    """An OLMo-2 shape whose anchor + `experts` packages (bf16) come to about `total_gb` GB (or `layers` layers)."""
    d, inter, vocab = 2048, 8192, 32000
    per_layer_anchor = 2 * (4 * d * d + 3 * d * inter + 4 * d)
    per_layer_package = 2 * (3 * d * inter + 2 * d)
    layers = layers or max(1, round((total_gb * GB - 2 * 2 * vocab * d) / (per_layer_anchor + experts * per_layer_package)))
    return {"d_model": d, "ffn_hidden": inter, "vocab_size": vocab, "n_layers": layers, "n_heads": 16}


def make_inputs(root: Path, shape: dict, n_experts: int) -> tuple[Path, list[Path]]:
    import torch
    from transformers import Olmo2Config

    from flexolmo_core.anchor.model import ANCHOR_MANIFEST, anchor_fingerprint
    from flexolmo_core.data.tokenizer import train_tokenizer
    from flexolmo_core.expert.package import save_package
    from flexolmo_core.io.atomic import write_json
    from flexolmo_core.io.stream_safetensors import write_model

    d, inter, L, vocab = shape["d_model"], shape["ffn_hidden"], shape["n_layers"], shape["vocab_size"]
    bf16 = torch.bfloat16
    train_tokenizer(["memory benchmark text"] * 10, 300, root / "tok")
    anchor = root / "anchor"
    anchor.mkdir()
    config = Olmo2Config(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=L,
                         num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_heads"],
                         tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    config.architectures = ["Olmo2ForCausalLM"]
    config.save_pretrained(anchor)
    shapes = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"})
        shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                       p + "mlp.down_proj.weight": (d, inter)})

    def random(shape):
        return (torch.randn(shape) * 0.02 + (1.0 if len(shape) == 1 else 0.0)).to(bf16)

    write_model(anchor, [(n, bf16, s, lambda s=s: random(s)) for n, s in shapes.items()], shard_bytes=GB)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / "tok" / name).exists():
            (anchor / name).write_bytes((root / "tok" / name).read_bytes())
    fingerprint = anchor_fingerprint(anchor)
    write_json(anchor / ANCHOR_MANIFEST, {"fingerprint": fingerprint})
    packages = []
    public = [random((d,)) - 1.0 for _ in range(L)]
    for j in range(n_experts):
        tensors = {}
        for i in range(L):
            tensors.update({f"layers.{i}.gate_up_proj": random((2 * inter, d)), f"layers.{i}.down_proj": random((d, inter)),
                            f"layers.{i}.router": random((d,)) - 1.0, f"layers.{i}.public_router": public[i]})
        packages.append(root / f"pkg{j}")
        save_package(tensors, packages[-1], f"domain{j}", fingerprint, anchor_dir=anchor)
        del tensors
        print(f"merge_memory: inputs [{j + 1}/{n_experts}] packages written", file=sys.stderr, flush=True)
    return anchor, packages


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def paper_arithmetic(measured_over_imports_gb: float, bench_layer_gb: float) -> list[str]:
    """The 8x7B merge (OLMo-2 7B: d 4096, I 11008, 32 layers, vocab 100,352) from the measured peak."""
    d, inter, L, vocab, experts = 4096, 11008, 32, 100352, 8
    total_params = L * (4 * d * d + experts * 3 * d * inter + experts * d + 4 * d) + 2 * vocab * d + d
    layer_gb = 4 * 2 * 3 * d * inter / GB  # the canary's one-layer owner FFNs (2 experts) in fp32: the largest term
    piece_gb = 2 * inter * d / GB  # one expert's gate, up or down matrix (bf16): the largest tensor written
    scaled = measured_over_imports_gb * layer_gb / bench_layer_gb
    return [f"8x7B: {total_params / 1e9:.1f}B parameters, {2 * total_params / GB:.1f} GB in bf16; written in the "
            f"released per-expert layout, one expert matrix ({piece_gb:.2f} GB) at a time",
            f"measured here: {measured_over_imports_gb:.2f} GB over the imports, with a {bench_layer_gb:.2f} GB canary "
            f"layer (2 experts' FFNs in fp32); the 7B layer is {layer_gb:.2f} GB",
            f"scaled by the layer ratio: about {scaled:.2f} GB over the imports for the 8x7B merge, independent of the "
            f"expert count and of the 75 GB total, so a 32 GB machine has {32 - scaled - 1:.0f} GB to spare (1 GB for "
            "Python and torch)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.5, help="anchor + packages, in GB (at least 4 for the issue's check)")
    parser.add_argument("--experts", type=int, default=4, help="expert packages to merge")
    parser.add_argument("--layers", type=int, default=None, help="fix the layer count (instead of --gb): the same "
                        "shape with more or fewer experts")
    parser.add_argument("--shard-size", default="1GB", help="shard size of the merged output")
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                        help="checkout whose flexolmo_core runs the merge (default: this one)")
    parser.add_argument("--keep", default=None, help="build the inputs here and keep them (reused if present)")
    args = parser.parse_args()
    from flexolmo_core.io.stream_safetensors import parse_size

    m = machine()
    shape = shape_for(args.gb, args.experts, args.layers)
    with tempfile.TemporaryDirectory(dir=args.keep and Path(args.keep).parent) as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.time()
        if (root / "done.json").exists():
            anchor, packages = root / "anchor", sorted(root.glob("pkg*"))
        else:
            anchor, packages = make_inputs(root, shape, args.experts)
            (root / "done.json").write_text(json.dumps(shape))
        built = time.time() - start
        inputs = folder_bytes(anchor) + sum((p / "expert.safetensors").stat().st_size for p in packages)
        out = root / "merged"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        proc = subprocess.run([sys.executable, "-c", CHILD, args.code, str(anchor), str(out),
                               str(parse_size(args.shard_size)), *map(str, packages)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"merge failed:\n{proc.stderr[-3000:]}")
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        from flexolmo_core.io.checkpoint import checkpoint_meta
        from flexolmo_core.io.stream_safetensors import nbytes

        meta = checkpoint_meta(out)
        largest_tensor = max(nbytes(dt, s) for dt, s in meta.values())
        shards = [f.stat().st_size for f in out.glob("*.safetensors")]
        merged = sum(shards)
    peak, base = stats["peak_kb"] * 1024, stats["baseline_kb"] * 1024
    bench_layer = 4 * 2 * 3 * shape["d_model"] * shape["ffn_hidden"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']}, load {m['loadavg'][0]:.2f}")
    print(f"code: {args.code}")
    print(f"inputs: anchor + {args.experts} packages = {inputs / GB:.2f} GB (built in {built:.0f} s); shape {shape}")
    print(f"merged: {merged / GB:.2f} GB in {len(shards)} file(s) (shard size {args.shard_size}); "
          f"merge took {stats['seconds']:.1f} s")
    print(f"{'peak RSS':<28} {peak / GB:8.2f} GB")
    print(f"{'RSS after imports':<28} {base / GB:8.2f} GB")
    print(f"{'peak over imports':<28} {(peak - base) / GB:8.2f} GB")
    print(f"{'largest tensor':<28} {largest_tensor / GB:8.2f} GB   peak / largest tensor {peak / largest_tensor:.2f}")
    print(f"{'largest shard':<28} {max(shards) / GB:8.2f} GB   target: peak <= largest shard + 1 GB = "
          f"{(max(shards) + GB) / GB:.2f} GB: {'met' if peak <= max(shards) + GB else 'NOT met'}")
    print(f"{'total (inputs)':<28} {inputs / GB:8.2f} GB   peak / inputs {peak / inputs:.2f}")
    for line in paper_arithmetic((peak - base) / GB, bench_layer / GB):
        print(line)
    print(json.dumps({"machine": m, "code": args.code, "shape": shape, "experts": args.experts, "inputs_bytes": inputs,
                      "merged_bytes": merged, "shards": len(shards), "largest_tensor_bytes": largest_tensor,
                      "largest_shard_bytes": max(shards), "peak_rss_bytes": peak, "imports_rss_bytes": base,
                      "merge_seconds": round(stats["seconds"], 2)}))


if __name__ == "__main__":
    main()
