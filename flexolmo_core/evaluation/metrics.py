"""Per-doc metrics for the suite: gold bits per byte, QA F1 / exact match, math answers, code pass@1."""
from __future__ import annotations

import math
import os
import re
import string
import subprocess
import sys
import tempfile
from collections import Counter

LN2 = math.log(2)


def bits_per_byte(loglikelihood: float, text: str) -> float:
    """OLMo's gold bpb: -log p(gold continuation | context) in bits, over the continuation's UTF-8 bytes."""
    n_bytes = max(1, len(text.encode("utf-8")))
    return -loglikelihood / LN2 / n_bytes


# ---- QA (SQuAD-style normalisation) ---------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if not pred or not ref:
        return float(pred == ref)
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


def max_f1(prediction: str, references: list[str]) -> float:
    return max((f1(prediction, r) for r in references), default=0.0)


def exact_match(prediction: str, references: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


# ---- math -----------------------------------------------------------------------------------------------------

def extract_math_answer(generation: str) -> str:
    """The few-shot formats end with "So the answer is X." (GSM8K) or "The final answer is X." (Minerva).
    Fallbacks: the last \\boxed{...}, then the last number."""
    for pattern in (r"final answer is\s*\$?(.+?)\$?\s*\.?\s*(?:I hope|$)", r"answer is\s*\$?(.+?)\$?\s*\.?\s*$"):
        found = re.findall(pattern, generation.strip(), flags=re.IGNORECASE | re.DOTALL)
        if found:
            return found[-1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", generation)
    if boxed:
        return boxed[-1]
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", generation)
    return numbers[-1] if numbers else generation.strip()


def normalize_math(s: str) -> str:
    # Differs from Minerva's sympy equivalence: string match after light normalisation.
    s = s.strip().strip("$").strip().rstrip(".").replace(",", "").replace(" ", "")
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac").replace("\\left", "").replace("\\right", "")
    try:
        value = float(s)
        return str(int(value)) if value == int(value) else str(value)
    except ValueError:
        return s


def math_correct(generation: str, references: list[str]) -> float:
    pred = normalize_math(extract_math_answer(generation))
    return float(any(pred == normalize_math(r) for r in references))


# ---- code execution -------------------------------------------------------------------------------------------

def run_program(program: str, timeout: float = 10.0) -> bool:
    """Run untrusted generated code in a separate Python process with a wall-clock timeout. This is isolation
    from our process, not a sandbox: it only runs when the user allowed code execution explicitly."""
    with tempfile.TemporaryDirectory(prefix="flexolmo-code-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(program)
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout,
                                  env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def _code(completion: str) -> str:
    return completion.split("```")[0]  # the prompts open a ```python fence; the code ends where it closes


def humaneval_program(extra: dict, completion: str) -> str:
    return f"{extra['prompt']}{_code(completion)}\n\n{extra['test']}\n\ncheck({extra['entry_point']})\n"


def mbpp_program(extra: dict, completion: str) -> str:
    tests = "\n".join(extra.get("test_list", []))
    return f"{extra.get('test_setup_code', '')}\n{_code(completion)}\n\n{tests}\n"
