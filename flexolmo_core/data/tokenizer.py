"""The anchor's tokenizer: byte-level BPE trained on the public train split only (owners never retrain it),
saved as a Hugging Face tokenizer that `AutoTokenizer.from_pretrained(dir)` loads offline."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.io.atomic import atomic_dir


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2,
                    eos_token: str = "<|endoftext|>", pad_token: str = "<|pad|>") -> Path:
    from transformers import PreTrainedTokenizerFast

    if not 256 + 2 <= vocab_size <= 65_536 * 16:
        raise InputError(f"vocab_size {vocab_size} must cover the 256 bytes plus special tokens")
    texts = [t for t in texts if t]
    if not texts:
        raise InputError("no text to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[eos_token, pad_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token,
                                 model_max_length=1_000_000)
    with atomic_dir(out_dir, signature=("tokenizer.json",)) as tmp:
        save_tokenizer(hf, tmp)
    return Path(out_dir)


# transformers 5 writes its fast tokenizer's class as TokenizersBackend, which 4.x cannot load; to 5.x
# PreTrainedTokenizerFast is that same class, and 4.x knows it (benchmarks/interop.py: the same ids in both)
PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """A transformers tokenizer into `folder`, loadable by transformers 4.x and 5.x."""
    tokenizer.save_pretrained(str(folder))
    make_tokenizer_portable(folder)


def make_tokenizer_portable(folder: str | Path) -> None:
    """Rewrite tokenizer_config.json's class to one both transformers 4.x and 5.x load (PORTABLE_CLASS)."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("tokenizer_class") in PORTABLE_CLASS:
        config["tokenizer_class"] = PORTABLE_CLASS[config["tokenizer_class"]]
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path: str | Path):
    """The anchor tokenizer as `transformers` sees it (offline)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise MissingInput(f"{path}: no tokenizer.json (run the tokenizer stage)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()
