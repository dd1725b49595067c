"""The one dtype rule, for every model this project reads, trains or writes.

1. On disk, everything made from an anchor keeps the anchor's dtype: owner packages, merged models, opt-outs,
   dense experts, soups, router-tuned models. A bf16 anchor (SmolLM2, OLMo-2 as published) gives bf16 files;
   the fp32 anchor pretrained here gives fp32 files. One file set, one floating dtype: loaders refuse a
   package whose dtype differs from its anchor's (merge.load_packages), and a model file is never mixed.
2. In training, trainable tensors are fp32 master weights with fp32 AdamW state; frozen tensors stay in the
   dtype they were read in, held once (training.model.Slots). Matmuls run in `loop.dtype`; norms, softmax,
   router logits and the loss run in fp32. `auto` is bf16 on a GPU, and on a CPU whichever of bf16 and fp32
   multiplies faster there (`compute_dtype`). The pipeline resolves `auto` once per machine, in its `numerics`
   stage, and every training stage reads that record (`resolve_numerics`, `pinned_dtype`): a timing can then
   never flip the numerics of one stage, and a different choice reruns the stages that depend on it. A run
   outside the pipeline (`flexolmo expert train`, the owner flow) resolves `auto` at its start and records
   the choice and the rates in its summary.
3. When a trained tensor is written, it is rounded to the storage dtype (round to nearest even: torch's cast).
   Router rows are rounded too: a bf16 merge's router is bf16, as in the released FlexOlmo checkpoints.
4. Models trained from scratch (the anchor pretrained here, the unrestricted-MoE baseline) have no anchor to
   follow and are written from their fp32 masters, in fp32.
5. Evaluation, generation and serving run a checkpoint in its own dtype on a GPU, and upcast to fp32 on the
   CPU (exact for bf16, and CPUs without bf16 matmul units are slower in bf16): `inference_dtype`.

Devices follow one rule too: `device: auto` is CUDA when torch sees a GPU, else the CPU; `cuda` without a
GPU is refused with what it needs (`resolve_device`)."""
from __future__ import annotations

import os
import platform

import torch

from flexolmo_core.errors import InputError
from flexolmo_core.io.checkpoint import checkpoint_dtype


def storage_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rule 3: floating tensors rounded to the storage dtype (others, such as token ids, unchanged)."""
    return {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda (| cuda:N) -> a torch device; refuses cuda where torch sees no GPU."""
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise InputError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"device {name!r} needs a CUDA GPU, and torch sees none (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# `auto` takes bf16 on a CPU only when it is clearly faster: a near tie keeps fp32 (exact, the numerics evaluation
# uses on the CPU). The pipeline's `numerics.bf16_margin` overrides it.
AUTO_BF16_MARGIN = 1.1


def compute_dtype(name: str, device: torch.device, measure,
                  margin: float = AUTO_BF16_MARGIN) -> tuple[torch.dtype, dict[str, float]]:
    """Rule 2: `loop.dtype` as a torch dtype, and the matmul rates measured to choose it (FLOP/s by dtype name).
    `auto` is bf16 on a GPU that has it (fp32 on older ones: fp16 would need loss scaling); on the CPU it is
    bf16 only where `measure(dtype, device)` finds bf16 at least `margin` x fp32 (an AMD EPYC here trained the
    tiny anchor 1.868x faster in bf16; an Intel Xeon without AMX measured bf16 at 62.2 vs fp32 at 123.5 GFLOP/s on
    one thread and trained 1.40x faster in fp32), else fp32."""
    if name != "auto":
        return getattr(torch, name), {}
    if device.type != "cpu":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32), {}
    rates = {dtype_name(dt): measure(dt, device) for dt in (torch.bfloat16, torch.float32)}
    faster = rates["bfloat16"] >= margin * rates["float32"]
    return (torch.bfloat16 if faster else torch.float32), rates


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            found = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        found = None
    return found or platform.processor() or platform.machine()


def machine_description() -> dict:
    """What a resolved `auto` is valid for: the CPU model and cores, the GPU if torch sees one, torch's version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def resolve_numerics(previous: dict | None, measure, margin: float = AUTO_BF16_MARGIN) -> dict:
    """`auto` resolved once for this machine: per device type torch sees, the dtype chosen and the matmul rates
    that chose it. A previous record made on the same machine with the same margin is returned as it is, not
    measured again, so that noise in a timing cannot flip a choice already made."""
    machine = machine_description()
    if previous and previous.get("machine") == machine and previous.get("bf16_margin") == margin:
        return previous
    auto = {}
    for kind in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        dtype, rates = compute_dtype("auto", torch.device(kind), measure, margin)
        auto[kind] = {"dtype": dtype_name(dtype), "matmul_flops": rates}
    return {"machine": machine, "bf16_margin": margin, "auto": auto}


def pinned_dtype(name: str, device: str, numerics: dict, where: str = "numerics") -> str:
    """`loop.dtype` with `auto` replaced by the choice `resolve_numerics` recorded for the device this run uses."""
    if name != "auto":
        return name
    kind = resolve_device(device).type
    try:
        return numerics["auto"][kind]["dtype"]
    except (KeyError, TypeError):
        raise InputError(f"{where}: holds no `auto` choice for device {kind!r} (made on {numerics.get('machine')}); "
                         "rerun the numerics stage on this machine (dvc repro -f numerics)") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name params.yaml and the records use)."""
    return str(dtype).removeprefix("torch.")


def inference_dtype(device: torch.device, model_dir: str | os.PathLike | None = None) -> torch.dtype:
    """Rule 5: the checkpoint's own dtype on a GPU, fp32 on the CPU."""
    if device.type == "cpu" or model_dir is None:
        return torch.float32
    return checkpoint_dtype(model_dir)
