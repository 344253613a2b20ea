"""Model checkpoints on disk, in the layout of SPEC §1.

A checkpoint directory (`<stage>_checkpoints/<model_tag>/`) holds, per saved step N:
`model_{N:06d}.pt` (the state dict), `optim_{N:06d}_rank{r}.pt` (one optimizer shard per rank,
optional) and `meta_{N:06d}.json` (the model config, the step and whatever the caller records:
val_bpb, user config, loader and loop state). The tokenizer the model was trained with lives
beside them in `tokenizer/`.

Crash safety comes from two rules. Every file is written to a hidden temp file in the same
directory and renamed into place, so no reader ever sees half a file. And the meta file is
written last and is the only thing that makes a step exist: `list_steps` reads meta files, so
a save that dies midway leaves at most orphan `.pt` files that no loader will pick up, and the
temp files of a killed writer are removed the next time the directory is saved to or loaded
from (`engine.fileio.remove_stale_temps`, which leaves a live writer's alone).
In distributed training every rank first saves its optimizer shard, then (after a barrier)
rank 0 saves the model and meta.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.fileio import atomic_write, remove_stale_temps
from engine.models.registry import build_empty, config_from_dict

if TYPE_CHECKING:
    import torch.nn as nn

    from engine.tokenizer import Tokenizer

TOKENIZER_SUBDIR = "tokenizer"
_META_NAME = re.compile(r"^meta_(\d{6,})\.json$")
_MODEL_TAG = re.compile(r"^d(\d+)$")
# torch.compile wraps the model and prefixes every state-dict key with this.
_COMPILE_PREFIX = "_orig_mod."


def model_path(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir: str | Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir: str | Path, step: int, rank: int) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank}.pt"


def tokenizer_dir(checkpoint_dir: str | Path) -> Path:
    """Where the tokenizer of the checkpoints in `checkpoint_dir` is saved."""
    return Path(checkpoint_dir) / TOKENIZER_SUBDIR


def list_steps(checkpoint_dir: str | Path) -> list[int]:
    """The complete (meta file present) steps in `checkpoint_dir`, ascending."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    steps = []
    for entry in directory.iterdir():
        match = _META_NAME.match(entry.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(checkpoint_dir: str | Path) -> int:
    """The highest complete step in `checkpoint_dir`."""
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model_tag(stage_dir: str | Path) -> str:
    """The `d<N>` subdirectory of `stage_dir` with the highest N (the deepest model)."""
    directory = Path(stage_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint stage directory {directory} does not exist")
    depths = {}
    for entry in directory.iterdir():
        match = _MODEL_TAG.match(entry.name)
        if match and entry.is_dir():
            depths[int(match.group(1))] = entry.name
    if not depths:
        raise FileNotFoundError(f"no model tag directory (d<depth>) in {directory}")
    return depths[max(depths)]


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    model_config: Any = None,
    meta: dict[str, Any] | None = None,
    optim_state: dict[str, Any] | None = None,
    rank: int = 0,
) -> None:
    """Save what is given for `step`: optimizer shard, then model, then meta (which commits it).

    model_state requires model_config; meta (JSON-serialisable, without 'step' or
    'model_config', which are added here) is written only together with the model.
    A call with only optim_state writes just this rank's shard.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if model_state is None and optim_state is None:
        raise ValueError("save_checkpoint needs model_state, optim_state or both")
    if model_state is None and (meta is not None or model_config is not None):
        raise ValueError("meta and model_config are saved only together with model_state")
    meta_text = None
    if model_state is not None:
        if model_config is None:
            raise ValueError("model_state needs its model_config, to rebuild the model on load")
        meta_text = _meta_json(step, model_config, meta or {})
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    if optim_state is not None:
        atomic_write(optim_path(directory, step, rank), lambda f: torch.save(optim_state, f))
    if model_state is not None:
        atomic_write(model_path(directory, step), lambda f: torch.save(model_state, f))
        atomic_write(meta_path(directory, step), lambda f: f.write(meta_text.encode("utf-8")))


def load_checkpoint(
    checkpoint_dir: str | Path,
    step: int | None = None,
    *,
    device: torch.device | str = "cpu",
    load_optimizer: bool = False,
    rank: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(model_state, optim_state or None, meta) of `step` (default: the latest)."""
    step = _resolve_step(checkpoint_dir, step)
    _remove_stale_temps(checkpoint_dir)
    meta = json.loads(meta_path(checkpoint_dir, step).read_text(encoding="utf-8"))
    model_state = torch.load(
        model_path(checkpoint_dir, step), map_location=device, weights_only=True
    )
    optim_state = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not path.is_file():
            raise FileNotFoundError(f"no optimizer state for step {step}, rank {rank}: {path}")
        optim_state = torch.load(path, map_location=device, weights_only=True)
    return model_state, optim_state, meta


def load_model(
    checkpoint_dir: str | Path,
    step: int | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at `step` (default: latest) on `device`, weights in `dtype`, eval
    mode. The meta's `model_config` names the family (engine/models/registry.py).

    Weights saved in another dtype (e.g. bf16) are converted, so fp32 is what a CPU gets.
    """
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device=device)
    try:
        config = config_from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"meta of step {meta.get('step')} in {checkpoint_dir} has no usable model_config: {error}"
        ) from error
    state = {
        key.removeprefix(_COMPILE_PREFIX): value.to(dtype) if value.is_floating_point() else value
        for key, value in model_state.items()
    }
    # Build without allocating twice: shapes on the meta device, real memory on `device`,
    # then the loaded tensors take the parameters' places (assign=True keeps their dtype).
    model = build_empty(config, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model, meta


def load_tokenizer_for(checkpoint_dir: str | Path) -> Tokenizer:
    """The tokenizer saved beside the checkpoints in `<checkpoint_dir>/tokenizer/`."""
    directory = tokenizer_dir(checkpoint_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no tokenizer saved with the checkpoints: {directory} is missing")
    # Imported here so loading a model does not pull in tiktoken and friends.
    from engine.tokenizer import Tokenizer

    return Tokenizer.load(directory)


def _remove_stale_temps(checkpoint_dir: str | Path) -> None:
    """Leftovers of interrupted writes, beside the checkpoints and in their tokenizer folder."""
    remove_stale_temps(checkpoint_dir)
    remove_stale_temps(tokenizer_dir(checkpoint_dir))


def _resolve_step(checkpoint_dir: str | Path, step: int | None) -> int:
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json) in {checkpoint_dir}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"no complete checkpoint for step {step} in {checkpoint_dir} (available: {steps})"
        )
    return step


def _meta_json(step: int, model_config: Any, meta: dict[str, Any]) -> str:
    config = dict(model_config) if isinstance(model_config, dict) else model_config.to_dict()
    # Validate the config now: a checkpoint whose model cannot be rebuilt is useless.
    try:
        config = config_from_dict(config).to_dict()
    except (TypeError, ValueError) as error:
        raise ValueError(f"model_config is not a model config: {error}") from error
    for key, ours in (("step", step), ("model_config", config)):
        if key in meta and meta[key] != ours:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} contradicts the saved {key} {ours!r}")
    try:
        return json.dumps({**meta, "step": step, "model_config": config}, indent=2)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {error}") from error
