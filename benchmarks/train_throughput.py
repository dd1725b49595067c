"""Training throughput and MFU at the `tiny` preset: our loop (anchor, expert) next to transformers'
FlexOlmoForCausalLM trained the same way with gradient masking (the reference code's approach).

MFU = achieved matmul FLOPs/s (only the work a step must do: forward, input gradients down to the lowest
trainable tensor, weight gradients of trainable tensors) / the matmul peak of the same dtype, measured
in this process. Random tokens (throughput does not depend on the text).

    python benchmarks/train_throughput.py [--steps 6] [--batch 8] [--seq-len 256] [--threads 2] [--kernels]
    python benchmarks/train_throughput.py --device cuda --preset small --seq-len 1024   # on a GPU
    python benchmarks/train_throughput.py --device cuda --preset olmo2-1b --only expert  # bf16 1B-class owner step

--kernels also times, forward + backward at the same shapes, the two hand-written pieces of the fast path
against what they replace: causal attention vs torch's scaled_dot_product_attention, and the chunked fused
loss vs the plain fp32 cross-entropy + z-loss."""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from benchmarks.machine import machine, recorded_stamp  # noqa: E402


def fake_anchor(cfg):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    c = Olmo2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return Olmo2ForCausalLM(c)


def ours(kind: str, anchor, cfg, args, dp: bool = False) -> dict:
    """Our loop's anchor or owner-expert steps; `dp`: the owner's DP-SGD step (vectorised per-example gradients,
    clipping, noise once per step: training/privacy.py), at the same shape."""
    from flexolmo_core.io.layout import from_hf_dense
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.data import TokenWindows
    from flexolmo_core.training.loop import train
    from flexolmo_core.training.model import MoEShape, build
    from flexolmo_core.training.privacy import DPConfig, PrivateGradients
    from flexolmo_core.training.stages import owner_fast_model

    if kind == "anchor":
        model = build(cfg, MoEShape(), from_hf_dense(anchor.state_dict(), cfg.n_layers, tied=cfg.tie_embeddings), lambda n: True, torch.float32)
    else:
        model, _ = owner_fast_model(anchor, torch.randn(cfg.d_model) * 0.3, torch.randn(cfg.d_model) * 0.3, False)
    tokens = torch.randint(0, cfg.vocab_size, ((args.steps + 1) * args.batch * (args.seq_len + 1) + 1,))
    loop = LoopConfig(steps=args.steps + 1, global_batch=args.batch, micro_batch=args.micro_batch or args.batch,
                      seq_len=args.seq_len, dtype=args.dtype, checkpoint_every=10 ** 9, progress=False, eval_batches=0,
                      compile=args.compile, device=args.device)
    # sigma 1 and a large owner set: the step's cost does not depend on them (accounting is once, at the end)
    private = PrivateGradients(DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0), 10**6, args.batch,
                               args.steps + 1) if dp else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        s = train(model, TokenWindows(tokens, args.seq_len), loop, tmp, label=kind, private=private)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and args.device != "cpu" else None
    del model
    return {"tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "flops_per_token": s["train_flops_per_token"],
            "peak_gflops": s["matmul_peak_flops"] / 1e9, "dtype": args.dtype, "peak_gpu_memory_gib": peak_mem}


def reference(anchor, cfg, args, autocast: bool) -> dict:
    """transformers FlexOlmo (fused experts), experts + router trainable, expert 0 / row 0 gradients zeroed."""
    from transformers import FlexOlmoForCausalLM

    from flexolmo_core.anchor.families import moe_config
    from flexolmo_core.io.dtypes import resolve_device
    from flexolmo_core.training.loop import measure_matmul_peak
    from flexolmo_core.training.model import MoEShape, count_matmul_flops
    from flexolmo_core.training.objective import objective

    device = resolve_device(args.device)
    model = FlexOlmoForCausalLM(moe_config(anchor.config, num_experts=2, top_k=2)).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in model.model.layers:
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
            p.requires_grad_(True)
            p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:1]), g[1:]]))  # freeze expert 0 / row 0
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    times = []
    for step in range(args.steps + 1):
        rows = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=rows[:, :-1]).logits
        loss, _ = objective(logits, rows[:, 1:], logits.new_zeros((), dtype=torch.float32), 0.0, 1e-5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tps = args.batch * args.seq_len * args.steps / sum(times[1:])
    dtype = torch.bfloat16 if autocast else torch.float32
    flops = count_matmul_flops(cfg, MoEShape(2, 2), args.seq_len, lambda n: n.endswith("_1"))["train_step"]
    peak = measure_matmul_peak(dtype, device)
    return {"tokens_per_s": tps, "mfu": flops * tps / peak, "peak_gflops": peak / 1e9,
            "dtype": "bfloat16 autocast" if autocast else "float32"}


def time_fwd_bwd(make_inputs, fn, reps: int = 6) -> float:
    """Median milliseconds of forward + backward of fn(*inputs) (one warm-up call first)."""
    times = []
    for i in range(reps + 1):
        inputs = make_inputs()
        start = time.perf_counter()
        out = fn(*inputs)
        (out if out.dim() == 0 else out.float().sum()).backward()
        if i:
            times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def kernels(cfg, args) -> dict:
    from flexolmo_core.training.model import causal_attention
    from flexolmo_core.training.objective import objective, reference_objective

    dt = torch.bfloat16
    B, H, T, hd = args.batch, cfg.n_heads, args.seq_len, cfg.head_dim

    def qkv():
        return [torch.randn(B, H, T, hd, dtype=dt, requires_grad=True) for _ in range(3)]

    def logits_targets():
        return (torch.randn(B * T, cfg.vocab_size, dtype=dt, requires_grad=True),
                torch.randint(0, cfg.vocab_size, (B * T,)))

    zero = torch.zeros(())
    return {
        "attention, torch sdpa (ms)": time_fwd_bwd(
            qkv, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "attention, ours (ms)": time_fwd_bwd(qkv, causal_attention),
        "loss, plain fp32 (ms)": time_fwd_bwd(
            logits_targets, lambda x, t: reference_objective(x, t, zero, 0.0, 1e-5)[0]),
        "loss, chunked fused (ms)": time_fwd_bwd(logits_targets, lambda x, t: objective(x, t, zero, 0.0, 1e-5)[0]),
    }


def main() -> None:
    from flexolmo_core.anchor.presets import get_preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=6, help="timed steps (one more runs first as warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="also time attention and loss, ours vs plain torch")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where the steps run")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward (default: --batch)")
    ap.add_argument("--only", choices=["anchor", "expert"], default=None,
                    help="time only this run of ours (no reference): the GPU check's 1B-class expert step")
    ap.add_argument("--dp", action="store_true",
                    help="also time the owner's DP-SGD step at the same shape (expert.dp: per-example clipping "
                         "and noise); its MFU counts the plain step's matmul work, so it reads as DP's cost")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    anchor = fake_anchor(cfg)
    m = machine()  # load average before this benchmark's own work
    if args.only:
        results = {f"{args.only} (ours)": ours(args.only, anchor, cfg, args)}
    else:
        results = {"anchor (ours)": ours("anchor", anchor, cfg, args), "expert (ours)": ours("expert", anchor, cfg, args),
                   "expert (transformers, fp32)": reference(anchor, cfg, args, False),
                   "expert (transformers, bf16 autocast)": reference(anchor, cfg, args, True)}
    if args.dp and args.only != "anchor":
        results["expert (ours, DP-SGD)"] = ours("expert", anchor, cfg, args, dp=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "none"
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {args.threads} threads, load "
          f"{m['loadavg'][0]:.2f}; GPU: {gpu}; preset {args.preset}, batch {args.batch} x {args.seq_len}")
    print(f"{'run':38s} {'tokens/s':>9s} {'MFU':>6s}  dtype (peak GFLOP/s)  peak GPU memory")
    for name, r in results.items():
        mem = f"{r['peak_gpu_memory_gib']:.1f} GiB" if r.get("peak_gpu_memory_gib") is not None else "-"
        print(f"{name:38s} {r['tokens_per_s']:9.0f} {100 * r['mfu']:5.1f}%  {r['dtype']} ({r['peak_gflops']:.0f})  {mem}")
    if "expert (ours, DP-SGD)" in results:
        print(f"DP-SGD step over the plain owner step: "
              f"{results['expert (ours, DP-SGD)']['tokens_per_s'] / results['expert (ours)']['tokens_per_s']:.2f}x "
              f"the tokens/s")
    ratio = None
    if not args.only:
        best_ref = max(results["expert (transformers, fp32)"]["tokens_per_s"],
                       results["expert (transformers, bf16 autocast)"]["tokens_per_s"])
        ratio = results["expert (ours)"]["tokens_per_s"] / best_ref
        print(f"expert training speed-up over the best reference: {ratio:.2f}x")
    timings = kernels(cfg, args) if args.kernels else {}
    for name, ms in timings.items():
        print(f"{name:38s} {ms:9.1f}")
    print(json.dumps({"results": results, "expert_speedup": ratio, "kernels_ms": timings, "args": vars(args), "machine": m,
                      "recorded": recorded_stamp()}))


if __name__ == "__main__":
    main()
