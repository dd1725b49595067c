"""Read a domain's documents from any source: the built-in mix, local jsonl / parquet / .txt folders, or a
`datasets` name. Every reader fails loudly (file and line, field names) rather than skipping bad input."""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from flexolmo_core.data.builtin_sources import BUILTINS, read_utf8
from flexolmo_core.data.config import SourceSpec
from flexolmo_core.data.text import normalize_paragraphs
from flexolmo_core.errors import InputError, MissingInput


@dataclass(frozen=True)
class Document:
    id: str  # "<source>/<key>", unique within a domain
    text: str
    source: str


def source_label(spec: SourceSpec) -> str:
    if spec.kind == "builtin":
        return spec.name
    return f"{spec.kind}:{spec.name or spec.path}"


def _files(path: str | None, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    if not path:
        raise InputError(f"source kind {kind!r} needs a `path`")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True))
    elif p.exists():
        files = [p]
    else:
        raise MissingInput(f"{path}: no such file or directory")
    if not files:
        raise MissingInput(f"{path}: no {'/'.join(suffixes)} files found")
    return files


def _field(row: dict, spec: SourceSpec, where: str) -> tuple[str | None, str]:
    if spec.text_field not in row:
        raise InputError(f"{where}: unknown text field {spec.text_field!r}; fields are {sorted(row)}")
    text = row[spec.text_field]
    if text is not None and not isinstance(text, str):
        raise InputError(f"{where}: field {spec.text_field!r} is {type(text).__name__}, expected a string")
    if spec.id_field is not None and spec.id_field not in row:
        raise InputError(f"{where}: unknown id field {spec.id_field!r}; fields are {sorted(row)}")
    return (str(row[spec.id_field]) if spec.id_field else None), text or ""


def read_jsonl(spec: SourceSpec) -> list[tuple[str, str]]:
    docs = []
    for path in _files(spec.path, (".jsonl", ".jsonl.gz"), "jsonl"):
        for number, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{number}: malformed JSON line ({err.msg})") from err
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            key, text = _field(row, spec, f"{path}:{number}")
            docs.append((key or f"{path.name}:{number}", text))
    return docs


def read_parquet(spec: SourceSpec) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    docs = []
    for path in _files(spec.path, (".parquet",), "parquet"):
        table = pq.read_table(path)
        rows = table.to_pylist()
        if not rows and spec.text_field not in table.column_names:
            raise InputError(f"{path}: unknown text field {spec.text_field!r}; fields are {table.column_names}")
        for i, row in enumerate(rows):
            key, text = _field(row, spec, f"{path}: row {i}")
            docs.append((key or f"{path.name}:{i}", text))
    return docs


def read_txt_folder(spec: SourceSpec) -> list[tuple[str, str]]:
    root = Path(spec.path or "")
    if not spec.path or not root.is_dir():
        raise MissingInput(f"{spec.path}: not a folder of .txt files")
    return [(p.relative_to(root).as_posix(), read_utf8(p)) for p in _files(spec.path, (".txt",), "txt")]


def read_hf(spec: SourceSpec) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a pinned requirement
        raise MissingInput("the `datasets` package is not installed") from err
    if not spec.name:
        raise InputError("source kind 'hf' needs a `name` (a datasets name or a save_to_disk folder)")
    if Path(spec.name).is_dir():
        data = datasets.load_from_disk(spec.name)
        if isinstance(data, datasets.DatasetDict):
            data = data[spec.split]
    else:
        try:
            data = datasets.load_dataset(spec.name, spec.config, split=spec.split)
        except Exception as err:  # hub lookups raise many types; name the dataset either way
            raise MissingInput(f"datasets could not load {spec.name!r} (config {spec.config!r}, split {spec.split!r}): {err}") from err
    if spec.text_field not in data.column_names:
        raise InputError(f"{spec.name}: unknown text field {spec.text_field!r}; fields are {data.column_names}")
    docs = []
    for i, row in enumerate(data):
        key, text = _field(row, spec, f"{spec.name}: row {i}")
        docs.append((key or str(i), text))
    return docs


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "txt": read_txt_folder, "hf": read_hf}


def read_source(spec: SourceSpec) -> list[Document]:
    """All documents of one source, cleaned to normalized paragraphs, ids unique and sorted."""
    if spec.kind == "builtin":
        if spec.name not in BUILTINS:
            raise InputError(f"unknown built-in source {spec.name!r}; known: {sorted(BUILTINS)}")
        pairs = BUILTINS[spec.name].reader(spec)
    elif spec.kind in READERS:
        pairs = READERS[spec.kind](spec)
    else:
        raise InputError(f"unknown source kind {spec.kind!r}; expected builtin, {', '.join(READERS)}")
    label = source_label(spec)
    docs, seen = [], set()
    for key, text in pairs:
        doc_id = f"{label}/{key}"
        if doc_id in seen:
            raise InputError(f"source {label}: duplicate document id {key!r}")
        seen.add(doc_id)
        docs.append(Document(doc_id, normalize_paragraphs(text), label))
    return docs


# ---- plain document texts for training, embeddings and tokenizers -----------------------------------------

TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def is_datasets_folder(path: Path) -> bool:
    """A `datasets` save_to_disk folder: one split (state.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def read_texts(paths, text_field: str = "text", split: str = "train") -> list[str]:
    """Document texts from `datasets` folders (what the prepare stage writes), .parquet, .jsonl(.gz) and
    .txt files (one document each), or folders of those. Empty documents are dropped; finding no text,
    a missing path or a file of another type is an error naming the path."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    texts: list[str] = []
    for path in paths:
        texts += [t for _, t in _text_pairs(path, text_field, split) if t and t.strip()]
    if not texts:
        raise InputError(f"no text found in {[str(p) for p in paths]}")
    return texts


def _text_pairs(path: Path, text_field: str, split: str) -> list[tuple[str, str]]:
    if is_datasets_folder(path):
        return read_hf(SourceSpec(kind="hf", name=str(path), text_field=text_field, split=split))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(TEXT_FILE_SUFFIXES))
        if not files:
            raise MissingInput(f"{path}: no {'/'.join(TEXT_FILE_SUFFIXES)} files found")
        return [pair for f in files for pair in _text_pairs(f, text_field, split)]
    if not path.exists():
        raise MissingInput(f"{path}: no such file or directory")
    spec = SourceSpec(path=str(path), text_field=text_field)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(spec)
    if path.suffix == ".parquet":
        return read_parquet(spec)
    if path.suffix == ".txt":
        return [(path.name, read_utf8(path))]
    raise InputError(f"{path}: unsupported file type (use a `datasets` folder, .parquet, .jsonl or .txt)")
