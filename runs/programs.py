"""Which training program each run kind launches, with which flags and which inputs.

One entry per kind: the FlagSet the user's config is checked against (the same one the
program's argparse reads, so the web form and the shell agree), the inputs it needs, whether it
runs under torchrun with several processes, and how a run's rows become command lines. Kinds
of the later pipeline stages register here when their programs exist.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

from training import (
    base_eval,
    base_train,
    chat_eval,
    chat_rl,
    chat_sft,
    dataset,
    finetune,
    mid_train,
    pipeline,
    tok_train,
)
from training.fetch_policy import FetchRefused, check_url
from training.flags import ConfigError, FlagSet
from training.tasks.registry import mixture_files

if TYPE_CHECKING:
    from runs.models import Run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# Non-path flags the app sets itself: where to resume, which step of the parent to start from.
APP_SET_FLAGS = ("resume_from_step", "source_step", "step")
# Flags holding task mixture specs, whose customjson entries name files.
MIXTURE_FLAGS = ("mixture", "val_mixture")


@dataclass(frozen=True)
class Program:
    kind: str
    flags: FlagSet
    # Inputs a submission must name: "dataset", "tokenizer", "parent_checkpoint".
    inputs: tuple[str, ...]
    commands: Callable[[Run], list[list[str]]]
    distributed: bool = False  # launched under torchrun; nproc_per_node may be > 1
    resumable: bool = False  # continues from its last checkpoint with --resume-from-step
    stage: str | None = None  # checkpoint stage it produces
    # Extra checks across fields and inputs: (config, inputs) -> raise ConfigError.
    check: Callable[[dict[str, Any], Mapping[str, Any]], None] | None = None
    submit_via: str = "/api/runs/"
    description: str = field(default="")

    def user_flags(self) -> list:
        """The flags a user may set (paths are filled in by the app from the inputs)."""
        return [f for f in self.flags.flags if not f.path and f.name not in APP_SET_FLAGS]

    def validate(self, preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """defaults < preset < overrides, every value checked; ConfigError names the field."""
        errors: dict[str, str] = {}
        merged: dict[str, Any] = {}
        if preset:
            if preset not in self.flags.presets():
                known = ", ".join(self.flags.presets()) or "none"
                errors["preset"] = f"unknown preset {preset!r} for {self.kind} (known: {known})"
            else:
                merged.update(self.flags.load_config_file(preset))
        if not isinstance(overrides, Mapping):
            raise ConfigError({"config": "must be an object of setting names to values"})
        settable = {f.name for f in self.user_flags()}
        for key in overrides:
            name = str(key).replace("-", "_")
            if name in self.flags and name not in settable:
                errors[f"config.{name}"] = "is set by the app from the run's inputs"
        errors.update(url_errors(self.flags, overrides, "config."))
        try:
            merged.update(self.flags.validate(overrides, partial=True))
        except ConfigError as exc:
            errors.update({f"config.{k}": v for k, v in exc.errors.items()})
        if errors:
            raise ConfigError(errors)
        return self.flags.validate(merged)


def url_errors(flags: FlagSet, values: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """Field errors for given URL values (flags named `url` or `*_url`) that the download
    policy refuses: a user's URL must not make the server fetch from its own network or files.

    The programs check again when they fetch (the flag's own default too, which needs no
    lookup here); the allow-list is FETCH_ALLOWED_HOSTS.
    """
    errors = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in flags or not (name == "url" or name.endswith("_url")):
            continue
        if isinstance(value, str) and value != flags[name].default:
            try:
                check_url(value, settings.FETCH_ALLOWED_HOSTS)
            except FetchRefused as exc:
                errors[f"{prefix}{name}"] = str(exc)
    return errors


def cli_args(flags: FlagSet, values: Mapping[str, Any]) -> list[str]:
    """`--name value` for every given value (bools as --name / --no-name)."""
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        option = flags[name].option
        if flags[name].type is bool:
            args.append(option if value else "--no-" + option[2:])
        else:
            args += [option, str(value)]
    return args


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _torchrun(run: Run, module: str) -> list[str]:
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={run.nproc_per_node}", "-m", module]


# ---- dataset ------------------------------------------------------------------------------


def dataset_commands(run: Run) -> list[list[str]]:
    command = run.config["command"]
    flags = dataset.COMMANDS[command]
    values = {k: v for k, v in run.config.items() if k in flags and not flags[k].path}
    argv = [*_module("training.dataset"), command, *cli_args(flags, values)]
    argv += ["--run-dir", run.run_dir]
    if command == "stats":  # an existing directory: just check and count it
        return [[*argv, run.dataset.path]]
    argv += ["--out", run.dataset.path]
    if command == "import":
        argv += [str(p) for p in run.config["files"]]
    return [argv]


# ---- tokenizer ----------------------------------------------------------------------------


def tokenizer_commands(run: Run) -> list[list[str]]:
    values = {k: v for k, v in run.config.items() if not tok_train.FLAGS[k].path}
    train = [
        *_module("training.tok_train"), *cli_args(tok_train.FLAGS, values),
        "--data-dir", run.dataset.path, "--out", run.tokenizer.path, "--run-dir", run.run_dir,
    ]  # fmt: skip
    evaluate = [
        *_module("training.tok_eval"), "--tokenizer", run.tokenizer.path,
        "--data-dir", run.dataset.path, "--run-dir", run.run_dir,
    ]  # fmt: skip
    return [train, evaluate]


# ---- base pretraining ---------------------------------------------------------------------


def checkpoint_dir(run: Run) -> Path:
    return Path(run.run_dir) / "checkpoints"


def base_commands(run: Run) -> list[list[str]]:
    values = {k: v for k, v in run.config.items() if not base_train.FLAGS[k].path}
    values["resume_from_step"] = -1 if run.resume_step is None else run.resume_step
    return [[
        *_torchrun(run, "training.base_train"), *cli_args(base_train.FLAGS, values),
        "--data-dir", run.dataset.path, "--tokenizer-dir", run.tokenizer.path,
        "--checkpoint-dir", str(checkpoint_dir(run)), "--run-dir", run.run_dir,
    ]]  # fmt: skip


def _field_of(message: str, flags: FlagSet) -> str:
    """The flag a scaling error is about (its message starts with or names the flag)."""
    for flag in flags.flags:
        if message.startswith(flag.name):
            return flag.name
    return "num_iterations" if "horizon" in message else "config"


def check_base(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
    """The batch arithmetic must work out for this tokenizer and process count."""
    tokenizer = inputs.get("tokenizer")
    if tokenizer is None:
        return
    try:
        base_train.plan(config, tokenizer.vocab_size, inputs.get("nproc_per_node", 1))
    except ValueError as exc:
        raise ConfigError({f"config.{_field_of(str(exc), base_train.FLAGS)}": str(exc)}) from None


# ---- stages that start from a checkpoint ---------------------------------------------------


def _values(run: Run, flags: FlagSet) -> dict[str, Any]:
    """The run's settings for the command line, minus what the app sets from the inputs."""
    return {
        k: v
        for k, v in run.config.items()
        if k in flags and not flags[k].path and k not in APP_SET_FLAGS
    }


def finetune_commands(module: str, flags: FlagSet) -> Callable[[Run], list[list[str]]]:
    """mid / sft / rl: train from the parent checkpoint into the run's own directory."""

    def commands(run: Run) -> list[list[str]]:
        parent = run.parent_checkpoint
        return [[
            *_torchrun(run, module), *cli_args(flags, _values(run, flags)),
            "--source-dir", parent.path, "--source-step", str(parent.step),
            "--checkpoint-dir", str(checkpoint_dir(run)), "--run-dir", run.run_dir,
        ]]  # fmt: skip

    return commands


def base_eval_commands(run: Run) -> list[list[str]]:
    parent = run.parent_checkpoint
    argv = [
        *_torchrun(run, "training.base_eval"), *cli_args(base_eval.FLAGS, _values(run, base_eval.FLAGS)),
        "--checkpoint-dir", parent.path, "--step", str(parent.step), "--run-dir", run.run_dir,
    ]  # fmt: skip
    source = parent.run.dataset if parent.run_id else None
    if source is not None:  # bits per byte on the data the model was trained on
        argv += ["--data-dir", source.path]
    return [argv]


def chat_eval_commands(run: Run) -> list[list[str]]:
    parent = run.parent_checkpoint
    return [[
        *_torchrun(run, "training.chat_eval"), *cli_args(chat_eval.FLAGS, _values(run, chat_eval.FLAGS)),
        "--checkpoint-dir", parent.path, "--step", str(parent.step), "--run-dir", run.run_dir,
    ]]  # fmt: skip


def parent_stages(*stages: str) -> Callable[[dict[str, Any], Mapping[str, Any]], None]:
    """A check that the parent checkpoint is of a stage this kind can start from."""

    def check(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
        parent = inputs.get("parent_checkpoint")
        if parent is not None and parent.stage not in stages:
            raise ConfigError({"parent_checkpoint": (
                f"is a {parent.stage} checkpoint; this run starts from {' or '.join(stages)}"
            )})  # fmt: skip

    return check


def check_finetune_memory(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
    """mid / sft: a GPU run whose parent model cannot fit one row per pass is refused now, with
    the numbers, rather than dying out of memory on the worker."""
    parent = inputs.get("parent_checkpoint")
    if parent is None or not parent.model_config:
        return
    try:
        finetune.memory_choice(config, parent.model_config, inputs.get("nproc_per_node", 1))
    except ValueError as exc:
        raise ConfigError({"config.device_batch_size": str(exc)}) from None
    except (TypeError, KeyError):
        return  # a checkpoint row without a full model config: the stage itself will say


# ---- the whole pipeline -------------------------------------------------------------------


def check_pipeline(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
    """Extra stage options may tune a stage, never say where it reads or writes."""
    try:
        options = pipeline.stage_options(config)
    except ConfigError as exc:
        raise ConfigError({f"config.{k}": v for k, v in exc.errors.items()}) from None
    errors = {}
    for kind, values in options.items():
        for name, why in task_file_errors(values).items():
            errors[f"config.{kind}_args"] = f"{name}: {why}"
    if errors:
        raise ConfigError(errors)


def task_file_errors(values: Mapping[str, Any]) -> dict[str, str]:
    """Task mixtures may read JSONL files (`customjson:/path`) only inside the data home.

    A mixture is a user string that names files; from the web app it must not become a way to
    read the server's other files (the run's log would quote their lines in its errors).
    """
    errors = {}
    home = Path(settings.NANOCHAT_HOME).resolve()
    for name in MIXTURE_FLAGS:
        spec = values.get(name)
        if not isinstance(spec, str) or not spec.strip():
            continue
        try:
            files = mixture_files(spec)
        except ValueError as exc:
            errors[name] = str(exc)
            continue
        for path in files:
            if path.suffix != ".jsonl" or home not in path.resolve().parents:
                errors[name] = f"customjson files must be .jsonl files inside {home}, not {path}"
                break
    return errors


def check_mixtures(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
    """mid / sft: the task mixtures are well formed and read only files they may."""
    errors = task_file_errors(config)
    if errors:
        raise ConfigError({f"config.{k}": v for k, v in errors.items()})


def checks(*parts: Callable[[dict[str, Any], Mapping[str, Any]], None]):
    """One Program.check made of several."""

    def check(config: dict[str, Any], inputs: Mapping[str, Any]) -> None:
        errors: dict[str, str] = {}
        for part in parts:
            try:
                part(config, inputs)
            except ConfigError as exc:
                errors.update(exc.errors)
        if errors:
            raise ConfigError(errors)

    return check


def pipeline_commands(run: Run) -> list[list[str]]:
    """One process that runs every stage; runs/pipeline_stages.py shows each as a run."""
    return [[
        *_module("training.pipeline"), *cli_args(pipeline.FLAGS, _values(run, pipeline.FLAGS)),
        "--out-dir", str(Path(run.run_dir) / "out"), "--run-dir", run.run_dir,
    ]]  # fmt: skip


PROGRAMS: dict[str, Program] = {
    "dataset": Program(
        "dataset", dataset.COMMANDS["builtin"], (), dataset_commands,
        submit_via="/api/datasets/", description="Build a dataset of parquet shards.",
    ),
    "tokenizer": Program(
        "tokenizer", tok_train.FLAGS, ("dataset",), tokenizer_commands,
        description="Train a BPE tokenizer on a dataset, then measure its compression.",
    ),
    "base": Program(
        "base", base_train.FLAGS, ("dataset", "tokenizer"), base_commands, distributed=True,
        resumable=True, stage="base", check=check_base,
        description="Pretrain a base model (GPT, GPT-2 or hybrid) from scratch on a dataset.",
    ),
    "base_eval": Program(
        "base_eval", base_eval.FLAGS, ("parent_checkpoint",), base_eval_commands,
        distributed=True, check=parent_stages("base", "mid"),
        description="Measure a base checkpoint: CORE, bits per byte, samples.",
    ),
    "mid": Program(
        "mid", mid_train.FLAGS, ("parent_checkpoint",),
        finetune_commands("training.mid_train", mid_train.FLAGS), distributed=True,
        stage="mid", check=checks(parent_stages("base"), check_mixtures, check_finetune_memory),
        description="Mid-train a base model on conversations (chat format, tools).",
    ),
    "sft": Program(
        "sft", chat_sft.FLAGS, ("parent_checkpoint",),
        finetune_commands("training.chat_sft", chat_sft.FLAGS), distributed=True,
        # From sft too: fine-tuning a chat model further on its users' corrections (chat/corrections.py).
        stage="sft", check=checks(parent_stages("base", "mid", "sft"), check_mixtures, check_finetune_memory),
        description="Fine-tune a base or mid model into a chat model (SFT), or a chat model further.",
    ),
    "rl": Program(
        "rl", chat_rl.FLAGS, ("parent_checkpoint",),
        finetune_commands("training.chat_rl", chat_rl.FLAGS), distributed=True,
        stage="rl", check=parent_stages("sft", "rl"),
        description="Reinforcement learning (REINFORCE) on GSM8K from an SFT model.",
    ),
    "chat_eval": Program(
        "chat_eval", chat_eval.FLAGS, ("parent_checkpoint",), chat_eval_commands,
        distributed=True,
        description="Evaluate a chat model: ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE.",
    ),
    "pipeline": Program(
        "pipeline", pipeline.FLAGS, (), pipeline_commands, check=check_pipeline,
        description="Everything from the built-in data to an evaluated chat model, each stage "
        "a run of its own.",
    ),
}  # fmt: skip


def program_for(kind: str) -> Program:
    try:
        return PROGRAMS[kind]
    except KeyError:
        available = [k for k, p in PROGRAMS.items() if p.submit_via == "/api/runs/"]
        raise ConfigError(
            {"kind": f"{kind!r} is not available (available: {', '.join(available)})"}
        ) from None
