"""Opening the checkpoint a program starts from or evaluates, with the tokenizer it was trained on.

Fine-tuning, RL and the evaluations all need the same few things from a saved model: its
directory (a flag, or else the largest `d<N>` model of a stage), the tokenizer saved beside it,
proof that the two share one vocabulary -- a mismatched tokenizer does not crash, its ids just
mean other tokens, so everything downstream would silently be garbage -- and, for a program
that writes checkpoints of its own, the flags and default folder for them (`checkpoint_flags`,
`resolve_output`) and a copy of that tokenizer beside them. Errors are one line naming
the flag at fault (`source_dir`, `checkpoint_dir`). Fine-tuning, which may be given another
tokenizer, checks it before loading any weights (training/finetune.py `find_source`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine import checkpoint as ckpt
from engine.models.gpt import GPT
from engine.paths import data_home
from engine.tokenizer import Tokenizer
from training.flags import Flag, join_inside
from training.runtime import Runtime


def resolve_source_dir(source_dir: str | Path, source_stages: Sequence[str]) -> Path:
    """The checkpoint directory to start from: the one given, else the largest model found.

    `source_stages` are folders under the data home (e.g. "mid_checkpoints"), in order of
    preference.
    """
    if source_dir:
        directory = Path(source_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"source_dir: checkpoint directory {directory} does not exist")
        return directory
    home = data_home()
    for stage in source_stages:
        try:
            return home / stage / ckpt.find_largest_model_tag(home / stage)
        except FileNotFoundError:
            continue
    looked = " or ".join(str(home / stage) for stage in source_stages)
    raise FileNotFoundError(f"source_dir: no model (d<N> folder) in {looked}; pass --source-dir")


def load_checked(
    directory: Path, step: int, runtime: Runtime, flag: str
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """(model, tokenizer, meta) of the checkpoint in `directory` (step -1: the latest).

    The model is in eval mode on the run's device, fp32; the tokenizer is the one saved with
    it, checked against the model's vocabulary. Errors start with `flag`, the option that
    named the directory.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag}: {directory} does not exist")
    if not ckpt.list_steps(directory):
        raise FileNotFoundError(f"{flag}: {directory} holds no complete checkpoint (meta_*.json)")
    model, meta = ckpt.load_model(directory, None if step < 0 else step, device=runtime.device)
    tokenizer = ckpt.load_tokenizer_for(directory)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"{flag}: {directory}: the model's vocabulary ({model.config.vocab_size}) does not "
            f"match its tokenizer's ({tokenizer.vocab_size})"
        )
    return model, tokenizer, meta


def load_evaluated(
    config: Mapping[str, Any], runtime: Runtime
) -> tuple[GPT, Tokenizer, dict[str, Any], Path]:
    """The checkpoint an evaluation names with `--checkpoint-dir` (required) and `--step`.

    (model, tokenizer, meta, directory), as `load_checked` gives them.
    """
    if not config["checkpoint_dir"]:
        raise ValueError(
            "checkpoint_dir: required: give --checkpoint-dir (the checkpoint folder to evaluate)"
        )
    directory = Path(config["checkpoint_dir"])
    model, tokenizer, meta = load_checked(directory, config["step"], runtime, "checkpoint_dir")
    return model, tokenizer, meta, directory


def checkpoint_flags(folder: str) -> list[Flag]:
    """`model_tag` and `checkpoint_dir` of a program that writes what it makes of a source.

    `folder` is where its checkpoints go under the data home (e.g. "sft_checkpoints").
    """
    return [
        Flag("model_tag", str, "", "checkpoint subfolder (default: the source's)", component=True),
        Flag(
            "checkpoint_dir",
            str,
            "",
            f"where checkpoints go (default <NANOCHAT_HOME>/{folder}/<model_tag>)",
            path=True,
        ),
    ]


def resolve_output(config: Mapping[str, Any], folder: str, source_dir: Path) -> tuple[str, Path]:
    """(model tag, checkpoint directory) from `checkpoint_flags`: by default the source's tag.

    Without `checkpoint_dir` the tag becomes a folder under `<data home>/<folder>`; it must be
    one safe folder name that stays there (a tag such as `../../x` would write anywhere).
    """
    tag = config["model_tag"] or source_dir.name
    if config["checkpoint_dir"]:
        return tag, Path(config["checkpoint_dir"])
    try:
        return tag, join_inside(data_home() / folder, tag)
    except ValueError as exc:
        raise ValueError(f"model_tag: {exc}; pass --model-tag or --checkpoint-dir") from None


def save_tokenizer_copy(tokenizer: Tokenizer, checkpoint_dir: str | Path) -> None:
    """Write the tokenizer beside the new checkpoints, so the directory is self-contained.

    A chat worker then needs only the directory. Always rewritten (each file atomically): an
    older run in the same folder may have left a tokenizer of another vocabulary there.
    """
    tokenizer.save(ckpt.tokenizer_dir(checkpoint_dir))
