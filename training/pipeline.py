"""The whole pipeline, stage after stage: data, tokenizer, base model, evals, SFT, RL, report.

    python -m training.pipeline --config demo-cpu            # everything under <NANOCHAT_HOME>
    python -m training.pipeline --config speedrun --nproc-per-node 8 --out-dir /data/speedrun

Each stage is its own program in its own process (under torchrun when it trains or evaluates,
so `--nproc-per-node` GPUs share it), exactly what a user would type by hand:

    dataset -> tokenizer (train, then eval) -> base -> base eval -> [base chat eval]
            -> [mid] -> SFT -> chat eval -> [RL -> chat eval] -> report

Every output lands under `--out-dir` in nanochat's layout (base_data/, tokenizer/,
base_checkpoints/<tag>/, mid_/sft_/rl_checkpoints/<tag>/, report/), so stages find each
other's outputs by path, and `--skip-existing` re-runs only what is missing. With `--run-dir`
each stage writes its events to `<run-dir>/stages/<NN>-<name>/` (and a copy of its output to
`log.txt` there), and the pipeline's own event file says when each stage starts and ends
(`stage` events), which is how the web app shows every stage as a run of its own.

With a Weights & Biases project (`--wandb-project` or $WANDB_PROJECT) every training and
evaluation stage logs to it, the stages of one pipeline in one W&B group (`wandb_args`).

The pipeline stops at the first stage that fails, naming the stage and its error.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models import registry
from engine.paths import data_home
from training import report
from training.events import EVENTS_FILE, EventWriter, read_events
from training.flags import (
    MAX_SHARDS,
    MAX_TOKENS,
    MAX_VOCAB,
    WANDB_FLAGS,
    ConfigError,
    Flag,
    FlagSet,
    check_component,
    format_config,
    join_inside,
)
from training.loop import format_duration
from training.program import cancel_on_sigterm, run_program
from training.wandb_sink import requested_project

STAGE_PROGRAMS = {  # stage kind -> training module
    "dataset": "training.dataset",
    "tokenizer": "training.tok_train",
    "base": "training.base_train",
    "base_eval": "training.base_eval",
    "mid": "training.mid_train",
    "sft": "training.chat_sft",
    "chat_eval": "training.chat_eval",
    "rl": "training.chat_rl",
}

# Stages that take extra command-line options from the pipeline's `<kind>_args`.
ARGS_KINDS = ("base", "base_eval", "mid", "sft", "chat_eval", "rl")

FLAGS = FlagSet(
    "pipeline",
    configs="pipeline",
    description="Run every stage from raw text to an evaluated chat model, with a report.",
    flags=[
        # data and tokenizer
        Flag(
            "dataset_source",
            str,
            "builtin",
            "builtin (offline corpus) or download (public pretraining shards)",
            choices=("builtin", "download"),
        ),
        Flag(
            "dataset_download_shards",
            int,
            8,
            "shards to download (source download)",
            min=2,
            max=MAX_SHARDS,
        ),
        Flag(
            "dataset_max_chars",
            int,
            -1,
            "characters of the built-in corpus (-1: all)",
            min=-1,
            max=MAX_TOKENS,
        ),
        Flag(
            "dataset_shards",
            int,
            8,
            "parquet shards of the built-in corpus",
            min=2,
            max=MAX_SHARDS,
        ),
        Flag(
            "vocab_size",
            int,
            32768,
            "tokenizer vocabulary incl. 9 special tokens",
            min=265,
            max=MAX_VOCAB,
        ),
        Flag(
            "tokenizer_max_chars",
            int,
            2_000_000_000,
            "characters to train the tokenizer on",
            min=1,
            max=MAX_TOKENS,
        ),  # fmt: skip
        # the stages' own presets (training/configs/<program>/<name>.yaml)
        Flag(
            "model",
            str,
            "",
            "model family of the base model: gpt, gpt2 or hybrid ('' = the base preset's)",
            choices=("", *registry.NAMES),
        ),  # fmt: skip
        Flag("base_preset", str, "d20", "base_train preset", component=True),
        Flag("base_eval_preset", str, "", "base_eval preset ('' = defaults)", component=True),
        Flag(
            "base_chat_eval_tasks",
            str,
            "spelling_bee",
            "chat tasks to run on the base model too, to compare with SFT ('' = none)",
        ),  # fmt: skip
        Flag("mid", bool, False, "run mid-training between base and SFT"),
        Flag("mid_preset", str, "", "mid_train preset", component=True),
        Flag("sft_preset", str, "", "chat_sft preset", component=True),
        Flag("chat_eval_preset", str, "", "chat_eval preset", component=True),
        Flag("rl", bool, False, "run RL on GSM8K after SFT (and evaluate the RL model)"),
        Flag("rl_preset", str, "", "chat_rl preset", component=True),
        Flag(
            "task_source",
            str,
            "builtin",
            "chat data: builtin (offline) or hub (downloaded)",
            choices=("builtin", "hub"),
        ),  # fmt: skip
        # extra command-line settings per program (e.g. "--num-iterations 500")
        *(
            Flag(
                f"{kind}_args",
                str,
                "",
                f"more {STAGE_PROGRAMS[kind]} options, as on its command line",
            )
            for kind in ARGS_KINDS
        ),
        # execution
        Flag(
            "nproc_per_node",
            int,
            1,
            "processes (GPUs) for the training and eval stages",
            min=1,
            max=64,
        ),  # fmt: skip
        Flag("skip_existing", bool, False, "skip stages whose outputs are already there"),
        Flag(
            "model_tag",
            str,
            "",
            "checkpoint subfolder of every stage (default d<depth>)",
            component=True,
        ),  # fmt: skip
        Flag("out_dir", str, "", "where every output goes (default <NANOCHAT_HOME>)", path=True),
        Flag("run_dir", str, "", "write events.jsonl here (and stage events beneath)", path=True),
        *WANDB_FLAGS,
    ],
)


@dataclass
class Stage:
    """One program run of the pipeline (a tokenizer stage is two: train, then eval)."""

    name: str  # unique in the pipeline, e.g. "chat_eval_sft"
    kind: str  # the web app's run kind (runs/programs.py)
    commands: list[list[str]]
    # Outputs that must exist for --skip-existing to skip the stage.
    done: Callable[[], bool] = lambda: False
    inputs: dict[str, str] = field(default_factory=dict)  # e.g. {"checkpoint_dir": ...}
    outputs: dict[str, str] = field(default_factory=dict)


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def _torchrun(config: dict[str, Any], module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={config['nproc_per_node']}", "-m", module]  # fmt: skip


def _preset(name: str, extra: str = "") -> list[str]:
    """The stage's preset, then the pipeline's extra options for it (later flags win)."""
    return (["--config", name] if name else []) + shlex.split(extra)


def _dataset_args(config: dict[str, Any]) -> list[str]:
    if config["dataset_source"] == "download":
        return ["download", "--num-shards", str(config["dataset_download_shards"])]
    return ["builtin", "--overwrite", "--max-chars", str(config["dataset_max_chars"]),
            "--shards", str(config["dataset_shards"])]  # fmt: skip


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("meta_*.json"))


def _section_done(report_dir: Path, key: str) -> Callable[[], bool]:
    return lambda: (report_dir / f"{key}.md").is_file()


def model_tag(config: dict[str, Any]) -> str:
    """d<depth> of the base preset (what base_train would pick), unless given."""
    if config["model_tag"]:
        return config["model_tag"]
    from training import base_train

    values = (
        base_train.FLAGS.load_config_file(config["base_preset"]) if config["base_preset"] else {}
    )
    extra = shlex.split(config["base_args"])
    if "--depth" in extra[:-1]:
        values["depth"] = extra[extra.index("--depth") + 1]
    return f"d{base_train.FLAGS.validate(values)['depth']}"


class _OptionError(Exception):
    pass


def _raise_option_error(message: str):
    raise _OptionError(message)


def stage_options(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The options each `<kind>_args` gives its stage, checked as the stage will check them.

    Refuses options that name a path flag or `--config` of the stage's program: where a stage
    reads and writes is the pipeline's to decide (under `--out-dir`, which the web app sets to
    the run's own directory); extra options only tune the stage. Options are matched as
    argparse matches them, abbreviations included, and their values go through the stage's own
    flag checks (types, ranges), so a bad value is refused when the pipeline is submitted, not
    hours later when its stage starts. ConfigError names `<kind>_args`.
    """
    errors: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    for kind in ARGS_KINDS:
        key = f"{kind}_args"
        try:
            tokens = shlex.split(config[key])
        except ValueError as exc:
            errors[key] = f"cannot be read as command-line options: {exc}"
            continue
        flags = importlib.import_module(STAGE_PROGRAMS[kind]).FLAGS
        reserved = ["--config", *(f.option for f in flags.flags if f.path)]
        for token in tokens:
            option = token.split("=", 1)[0]
            if option.startswith("-") and any(r.startswith(option) for r in reserved):
                errors[key] = f"{option} is set by the pipeline, not by extra options"
                break
        if key in errors:
            continue
        parser = flags.parser()
        parser.error = _raise_option_error  # argparse would print and exit
        try:
            given = vars(parser.parse_args(tokens))
            options[kind] = flags.validate(given, partial=True)
        except _OptionError as exc:
            errors[key] = str(exc)
        except ConfigError as exc:
            errors[key] = "; ".join(f"{name}: {why}" for name, why in exc.errors.items())
    if errors:
        raise ConfigError(errors)
    return options


def plan(config: dict[str, Any]) -> list[Stage]:
    """The stages to run for this config, in order, with their command lines."""
    out = Path(config["out_dir"]) if config["out_dir"] else data_home()
    tag = model_tag(config)
    data, tok, reports = out / "base_data", out / "tokenizer", out / "report"
    ckpt = {s: join_inside(out / f"{s}_checkpoints", tag) for s in ("base", "mid", "sft", "rl")}
    rep = ["--report-dir", str(reports)]
    tasks = ["--task-source", config["task_source"]]
    stages = [
        Stage(
            "dataset", "dataset",
            [[*_module("training.dataset"), *_dataset_args(config), "--out", str(data), *rep]],
            done=lambda: any(data.glob("*.parquet")), outputs={"data_dir": str(data)},
        ),
        Stage(
            "tokenizer", "tokenizer",
            [[*_module("training.tok_train"), "--data-dir", str(data), "--out", str(tok),
              "--vocab-size", str(config["vocab_size"]),
              "--max-chars", str(config["tokenizer_max_chars"])],
             [*_module("training.tok_eval"), "--tokenizer", str(tok), "--data-dir", str(data),
              *rep]],
            done=lambda: (tok / "tokenizer.pkl").is_file(),
            inputs={"data_dir": str(data)}, outputs={"tokenizer_dir": str(tok)},
        ),
        Stage(
            "base", "base",
            [[*_torchrun(config, "training.base_train"), *_preset(config["base_preset"], config["base_args"]),
              *(["--model", config["model"]] if config["model"] else []),
              "--data-dir", str(data), "--tokenizer-dir", str(tok),
              "--checkpoint-dir", str(ckpt["base"]), *rep]],
            done=lambda: _has_checkpoint(ckpt["base"]),
            inputs={"data_dir": str(data), "tokenizer_dir": str(tok)},
            outputs={"checkpoint_dir": str(ckpt["base"])},
        ),
        Stage(
            "base_eval", "base_eval",
            [[*_torchrun(config, "training.base_eval"), *_preset(config["base_eval_preset"], config["base_eval_args"]),
              "--checkpoint-dir", str(ckpt["base"]), "--data-dir", str(data), *rep]],
            done=_section_done(reports, "base_eval"),
            inputs={"checkpoint_dir": str(ckpt["base"])},
        ),
    ]  # fmt: skip

    def chat_eval(name: str, source: str, extra: list[str]) -> Stage:
        return Stage(
            name, "chat_eval",
            [[*_torchrun(config, "training.chat_eval"), *_preset(config["chat_eval_preset"], config["chat_eval_args"]),
              "--checkpoint-dir", str(ckpt[source]), *tasks, *extra, *rep]],
            done=_section_done(reports, name), inputs={"checkpoint_dir": str(ckpt[source])},
        )  # fmt: skip

    def finetune(kind: str, module: str, preset: str, source: str) -> Stage:
        return Stage(
            kind, kind,
            [[*_torchrun(config, module), *_preset(preset, config[f"{kind}_args"]), "--source-dir", str(ckpt[source]),
              "--checkpoint-dir", str(ckpt[kind]), *(tasks if kind != "rl" else []), *rep]],
            done=lambda: _has_checkpoint(ckpt[kind]),
            inputs={"checkpoint_dir": str(ckpt[source])},
            outputs={"checkpoint_dir": str(ckpt[kind])},
        )  # fmt: skip

    if config["base_chat_eval_tasks"]:
        stages.append(chat_eval("chat_eval_base", "base",
                                ["--tasks", config["base_chat_eval_tasks"], "--column", "BASE"]))  # fmt: skip
    sft_source = "base"
    if config["mid"]:
        stages.append(finetune("mid", "training.mid_train", config["mid_preset"], "base"))
        sft_source = "mid"
    stages.append(finetune("sft", "training.chat_sft", config["sft_preset"], sft_source))
    stages.append(chat_eval("chat_eval_sft", "sft", []))
    if config["rl"]:
        stages.append(finetune("rl", "training.chat_rl", config["rl_preset"], "sft"))
        stages.append(chat_eval("chat_eval_rl", "rl", []))
    return stages


def _stage_error(stage_dir: Path | None, code: int) -> str:
    """The failed stage's own error line (its `end` event), else how it exited."""
    if stage_dir is not None:
        events = read_events(stage_dir / EVENTS_FILE).events
        for event in reversed(events):
            if event.get("type") == "end" and event.get("error"):
                return str(event["error"])
    return f"exit code {code}"


def _run_command(argv: list[str], log_path: Path | None) -> int:
    """Run one command, its output to ours and (when given) to the stage's log.txt."""
    print(f"$ {' '.join(argv)}", flush=True)
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed below
    try:
        if log:
            log.write(f"$ {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for line in proc.stdout:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                if log:
                    log.write(line)
                    log.flush()
            return proc.wait()
        except BaseException:
            proc.terminate()  # Ctrl-C / cancel: the stage goes with us
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    finally:
        if log:
            log.close()


def wandb_args(config: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The W&B options every training and eval stage gets, and what the start event records.

    With a project (the pipeline's flag, or $WANDB_PROJECT, which the stages inherit) each such
    stage logs to it as a run of one group: the pipeline's own group, else its run directory's
    name (run-<id> under the web app), else a timestamp, so W&B shows the stages together.
    Nothing without a project.
    """
    project = requested_project(config)
    if not project:
        return [], {}
    group = config["wandb_group"] or Path(config["run_dir"]).name
    try:
        check_component(group)
    except ValueError:  # no run directory, or one named as a group cannot be
        group = time.strftime("pipeline-%Y%m%d-%H%M%S")
    args = ["--wandb-group", group]
    if config["wandb_project"]:
        args += ["--wandb-project", config["wandb_project"]]
    return args, {"project": project, "group": group}


def stage_argv(stage: Stage, argv: list[str], stage_dir: Path | None,
               wandb: list[str]) -> list[str]:  # fmt: skip
    """One command of a stage as it runs: its events to the stage's directory, and the W&B
    options for the programs that train or evaluate a model (those that take `<kind>_args`)."""
    argv = [*argv, "--run-dir", str(stage_dir)] if stage_dir else list(argv)
    return [*argv, *wandb] if stage.kind in ARGS_KINDS else argv


def run(config: dict[str, Any], events: EventWriter) -> dict[str, Any]:
    stages = plan(config)
    out = Path(config["out_dir"]) if config["out_dir"] else data_home()
    reports = out / "report"
    run_dir = Path(config["run_dir"]) if config["run_dir"] else None
    stage_wandb, wandb_info = wandb_args(config)
    print(format_config(config), flush=True)
    events.start(config, total_steps=len(stages), world_size=config["nproc_per_node"],
                 device="", program="pipeline",
                 stages=[{"name": s.name, "kind": s.kind} for s in stages],
                 **({"wandb": wandb_info} if wandb_info else {}))  # fmt: skip
    if not (config["skip_existing"] and (reports / "header.md").is_file()):
        report.reset(reports)
    started = time.time()
    timings: dict[str, float] = {}
    for index, stage in enumerate(stages, start=1):
        stage_dir = run_dir / "stages" / f"{index:02d}-{stage.name}" if run_dir else None
        info = {"index": index, "name": stage.name, "kind": stage.kind,
                "run_dir": str(stage_dir) if stage_dir else "", "inputs": stage.inputs,
                "outputs": stage.outputs}  # fmt: skip
        if config["skip_existing"] and stage.done():
            print(
                f"== stage {index}/{len(stages)} {stage.name}: outputs exist, skipped", flush=True
            )
            events.emit("stage", **info, status="skipped")
            continue
        print(f"== stage {index}/{len(stages)} {stage.name}", flush=True)
        if stage_dir:
            stage_dir.mkdir(parents=True, exist_ok=True)
        events.emit("stage", **info, status="started")
        t0 = time.time()
        try:
            for argv in stage.commands:
                argv = stage_argv(stage, argv, stage_dir, stage_wandb)
                code = _run_command(argv, stage_dir / "log.txt" if stage_dir else None)
                if code != 0:
                    error = _stage_error(stage_dir, code)
                    events.emit("stage", **info, status="failed", error=error)
                    raise RuntimeError(f"stage {stage.name} failed: {error}")
        except KeyboardInterrupt:
            events.emit("stage", **info, status="cancelled")
            raise
        timings[stage.name] = time.time() - t0
        events.emit("stage", **info, status="succeeded", seconds=timings[stage.name])
        events.metrics(index, {"train/progress": index / len(stages)})
    path, markdown = report.generate(reports)
    total = time.time() - started
    print(f"report: {path}\npipeline done in {format_duration(total)}: "
          + ", ".join(f"{k} {format_duration(v)}" for k, v in timings.items()), flush=True)  # fmt: skip
    events.report("Report", markdown)
    return {"report": str(path), "seconds": total, "stages": timings}


def main(argv: list[str] | None = None) -> int:
    config = FLAGS.parse(argv)
    with EventWriter(config["run_dir"] or None) as events:
        # A failed stage already said what went wrong; the pipeline's error names it.
        return run_program(events, lambda: run(config, events),
                           user_errors=(ValueError, OSError, RuntimeError))  # fmt: skip


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
