"""Export folders back into checkpoints: the inverse of engine/hf_export.py.

`import_folder` reads a folder the exporter wrote (from here or from another nanochat-site),
checks it against the model its config describes, and writes an ordinary checkpoint directory
(`model_NNNNNN.pt`, `meta_NNNNNN.json` and `tokenizer/`) that the engine, the chat and
training load like any other.

A folder is untrusted input, so nothing in it runs or unpickles: the weights are safetensors,
the tokenizer is rebuilt from `nanochat_tokenizer.json` (plain JSON ranks), and the config is
validated by the family's own config class before any tensor is read. Every tensor must be
one the model has, with its exact shape and a floating dtype; a missing, extra or misshapen
tensor is refused with its name. Sizes are bounded by the config (shapes are checked on the
meta device, where nothing is allocated) and the JSON files by byte limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import list_steps, save_checkpoint, tokenizer_dir
from engine.hf_export import (
    CONFIG_FILE,
    FORMAT_VERSION,
    GPT2_CONV1D,
    TOKENIZER_COPY_FILE,
    TOKENIZER_COPY_FORMAT,
    WEIGHTS_FILE,
    ExportError,
    gpt2_bias_shapes,
)
from engine.models.registry import config_from_dict, family

MAX_CONFIG_BYTES = 1 << 20
MAX_TOKENIZER_BYTES = 64 << 20
MAX_VOCAB = 1 << 20
MAX_STEP = 10**9
# How many names an error lists before "and N more".
_SHOWN = 8
# The model_type config.json must carry for each family (what the exporter writes).
MODEL_TYPES = {"gpt": "nanochat_site_gpt", "gpt2": "gpt2", "hybrid": "nanochat_site_hybrid"}


@dataclass
class ImportResult:
    checkpoint_dir: Path
    step: int
    model_config: dict[str, Any]
    has_tokenizer: bool
    size_bytes: int


def read_export_config(folder: str | Path) -> tuple[dict[str, Any], Any]:
    """(config.json's `nanochat` entry, the model config it describes), or ExportError saying
    why the folder is not an export this code can import."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    data = _read_json(folder / CONFIG_FILE, MAX_CONFIG_BYTES)
    nanochat = data.get("nanochat")
    if not isinstance(nanochat, dict):
        raise ExportError(
            f"{CONFIG_FILE} has no 'nanochat' entry: only folders exported by nanochat-site "
            "(python -m engine.export) can be imported"
        )
    version = nanochat.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"export format version {version!r} is not one this code reads ({FORMAT_VERSION})"
        )
    fields = nanochat.get("model_config")
    if not isinstance(fields, dict):
        raise ExportError(f"{CONFIG_FILE}: nanochat.model_config must be an object")
    try:
        config = config_from_dict(fields)
    except (TypeError, ValueError) as error:
        raise ExportError(
            f"{CONFIG_FILE}: nanochat.model_config is not a model config: {error}"
        ) from None
    name = family(config.model).name
    if nanochat.get("family") != name or data.get("model_type") != MODEL_TYPES[name]:
        raise ExportError(
            f"{CONFIG_FILE} says family {nanochat.get('family')!r} / model_type "
            f"{data.get('model_type')!r} but its model_config is a {name!r} model"
        )
    return nanochat, config


def import_folder(
    folder: str | Path, out_dir: str | Path, *, step: int | None = None
) -> ImportResult:
    """Write the export in `folder` as a checkpoint into `out_dir` at `step` (default: the step
    it was exported from). Refuses to replace a step `out_dir` already has."""
    folder, out = Path(folder), Path(out_dir)
    nanochat, config = read_export_config(folder)
    if step is None:
        step = nanochat.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
        raise ExportError(f"step must be an integer in [0, {MAX_STEP}), got {step!r}")
    if out.is_dir() and step in list_steps(out):
        raise ExportError(f"{out} already has a checkpoint at step {step}; choose another --out")
    state = _read_weights(folder / WEIGHTS_FILE, config)
    tokenizer = read_tokenizer_copy(folder, config.vocab_size)
    if tokenizer is not None:
        tokenizer.save(tokenizer_dir(out))
    meta = {"imported_from": "hf_export", "val_bpb": _number(nanochat.get("val_bpb"))}
    source = nanochat.get("source")
    if isinstance(source, str) and source:
        meta["source"] = source[:300]
    save_checkpoint(out, step, model_state=state, model_config=config, meta=meta)
    size = sum(t.numel() * t.element_size() for t in state.values())
    return ImportResult(out, step, config.to_dict(), tokenizer is not None, size)


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor an export of `config` holds, with its shape (the model is built on the
    meta device: no memory, whatever the config says)."""
    fam = family(config.model)
    with torch.device("meta"):
        model = fam.model_cls(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if fam.name != "gpt2":
        return shapes
    hf = {k: (v[::-1] if k.endswith(GPT2_CONV1D) else v) for k, v in shapes.items()}
    if not config.bias:
        hf.update({name: (size,) for name, size in gpt2_bias_shapes(config).items()})
    return hf


def read_tokenizer_copy(folder: str | Path, vocab_size: int) -> Any:
    """The tokenizer rebuilt from `nanochat_tokenizer.json`, or None when the export has none.
    Its ids must fit the model's vocabulary."""
    path = Path(folder) / TOKENIZER_COPY_FILE
    if not path.exists():
        return None
    data = _read_json(path, MAX_TOKENIZER_BYTES)
    if data.get("format") != TOKENIZER_COPY_FORMAT or data.get("version") != FORMAT_VERSION:
        raise ExportError(f"{TOKENIZER_COPY_FILE} is not a nanochat-site tokenizer (version 1)")
    pattern, specials, ranks = (
        data.get("pattern"),
        data.get("special_tokens"),
        data.get("mergeable_ranks"),
    )
    if (
        not isinstance(pattern, str)
        or not isinstance(specials, dict)
        or not isinstance(ranks, list)
    ):
        raise ExportError(f"{TOKENIZER_COPY_FILE} needs pattern, special_tokens, mergeable_ranks")
    if len(ranks) > MAX_VOCAB or len(specials) > 1024:
        raise ExportError(f"{TOKENIZER_COPY_FILE} has more tokens than any vocabulary here")
    mergeable: dict[bytes, int] = {}
    for entry in ranks:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and _is_id(entry[1])):  # fmt: skip
            raise ExportError(f"{TOKENIZER_COPY_FILE}: each rank must be [base64 bytes, id]")
        try:
            token = base64.b64decode(entry[0], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ExportError(f"{TOKENIZER_COPY_FILE}: bad base64 token: {error}") from None
        mergeable[token] = entry[1]
    if not all(isinstance(k, str) and _is_id(v) for k, v in specials.items()):
        raise ExportError(f"{TOKENIZER_COPY_FILE}: special_tokens must map names to ids")
    ids = list(mergeable.values()) + list(specials.values())
    if len(set(ids)) != len(ids) or len(mergeable) != len(ranks):
        raise ExportError(f"{TOKENIZER_COPY_FILE}: token ids and tokens must be unique")
    if max(ids, default=-1) >= vocab_size:
        raise ExportError(
            f"{TOKENIZER_COPY_FILE}: token id {max(ids)} is outside the model's vocabulary "
            f"of {vocab_size}"
        )
    import tiktoken

    from engine.tokenizer import Tokenizer

    name = data.get("name") if isinstance(data.get("name"), str) else "imported"
    try:
        encoding = tiktoken.Encoding(
            name=name[:100], pat_str=pattern, mergeable_ranks=mergeable, special_tokens=specials
        )
    except ValueError as error:  # tiktoken refuses e.g. a pattern it cannot compile
        raise ExportError(f"{TOKENIZER_COPY_FILE}: not a usable tokenizer: {error}") from None
    return Tokenizer(encoding)


def _read_weights(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict from the export's safetensors file, checked name by name
    and shape by shape against the model before anything is loaded."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"{path.name} is missing")
    expected = expected_shapes(config)
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            _check_names(names, set(expected))
            for name in sorted(names):
                info = handle.get_slice(name)
                shape, dtype = tuple(info.get_shape()), info.get_dtype()
                if shape != expected[name]:
                    raise ExportError(
                        f"tensor {name} has shape {list(shape)}, the model needs "
                        f"{list(expected[name])}"
                    )
                if dtype not in ("F32", "BF16", "F16", "F64"):
                    raise ExportError(f"tensor {name} is {dtype}; weights must be floating point")
            tensors = {name: handle.get_tensor(name) for name in sorted(names)}
    except SafetensorError as error:
        raise ExportError(f"{path.name} is not a readable safetensors file: {error}") from None
    if family(config.model).name == "gpt2":
        return _gpt2_from_hf(tensors, config)
    return tensors


def _gpt2_from_hf(tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """transformers' GPT-2 layout back to ours: Conv1D weights transposed back, and the zero
    biases of a bias-free model dropped (refused if they are not zero: the model has none)."""
    state = {}
    biases = set(gpt2_bias_shapes(config)) if not config.bias else set()
    for name, value in tensors.items():
        if name in biases:
            if torch.count_nonzero(value):
                raise ExportError(f"tensor {name} is not zero but the model has no biases")
            continue
        state[name] = value.t().contiguous() if name.endswith(GPT2_CONV1D) else value
    return state


def _check_names(found: set[str], expected: set[str]) -> None:
    unknown, missing = sorted(found - expected), sorted(expected - found)
    problems = []
    if unknown:
        problems.append(f"unknown tensors {_listed(unknown)}")
    if missing:
        problems.append(f"missing tensors {_listed(missing)}")
    if problems:
        raise ExportError(f"{WEIGHTS_FILE} does not match the config: " + "; ".join(problems))


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _read_json(path: Path, limit: int) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path.name} is missing")
    if path.stat().st_size > limit:
        raise ExportError(f"{path.name} is larger than {limit} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path.name} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path.name} must hold a JSON object")
    return data


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_VOCAB


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
