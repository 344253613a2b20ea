"""The training report: one markdown file assembled from what every stage wrote (SPEC §11).

Each program, given `--report-dir`, drops its own section there (`<key>.md`, plus `<key>.json`
with the numbers that belong in the summary table). Stages run as separate processes, maybe on
different days, so the sections are plain files that any later `generate` can put together,
rather than state held by one process:

    python -m training.report reset --report-dir D      # clear old sections, write the header
    ... run the stages with --report-dir D ...
    python -m training.report generate --report-dir D   # -> D/report.md

`reset` records the environment (git commit, hardware, versions, a cost estimate) and the start
time in `header.md` / `header.json`; the total wall-clock time at the end of the report runs
from that start to the last section written.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.fileio import atomic_path
from engine.paths import data_home
from training.events import EventWriter
from training.flags import ConfigError, Flag, FlagSet
from training.program import cancel_on_sigterm, run_program

COLUMNS = ("BASE", "MID", "SFT", "RL")
SUMMARY_METRICS = (
    "CORE",
    "ARC-Easy",
    "ARC-Challenge",
    "MMLU",
    "GSM8K",
    "HumanEval",
    "SpellingBee",
    "ChatCORE",
)
SECTION_ORDER = (
    "dataset",
    "tokenizer",
    "tok_eval",
    "base_train",
    "base_eval",
    "chat_eval_base",
    "mid_train",
    "chat_eval_mid",
    "chat_sft",
    "chat_eval_sft",
    "chat_rl",
    "chat_eval_rl",
)
HEADER_MD, HEADER_JSON, REPORT_MD = "header.md", "header.json", "report.md"
REPORT_TITLE = "# nanochat training report"
# Section keys become file names, so they are kept to one safe path component.
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = {"header", "report"}

# On-demand $/hour per GPU (typical cloud list prices; a rough estimate, not a quote). Matched by
# substring of the device name, first match wins, so more specific names come first.
GPU_HOURLY_USD = (
    ("H200", 3.50),
    ("H100", 3.00),
    ("GH200", 3.20),
    ("B200", 5.00),
    ("A100", 1.80),
    ("L40S", 1.10),
    ("L4", 0.70),
    ("A10", 0.75),
    ("RTX 4090", 0.60),
    ("RTX 3090", 0.40),
)


# ---- section files -------------------------------------------------------------------------


def _now_text(when: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if when is None else when).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.match(key) or key in _RESERVED:
        raise ValueError(
            f"report section key must be a simple file name (letters, digits, _ . -) and not "
            f"{' or '.join(sorted(_RESERVED))}, got {key!r}"
        )


def write_section(
    report_dir: str | os.PathLike | None,
    key: str,
    markdown: str,
    *,
    summary: Mapping[str, float] | None = None,
    column: str | None = None,
) -> Path | None:
    """Write `<report_dir>/<key>.md` (and `<key>.json` with a summary); None when no report_dir.

    Programs call this on rank 0 only, after emitting their `report` event. The markdown
    should start with "## Title"; a `timestamp:` line is added under the title when the
    markdown has none, so every section says when it was produced. Numbers that are not
    finite are stored as null (they show as "-" in the summary table).
    """
    if report_dir is None or str(report_dir) == "":
        return None
    _check_key(key)
    if summary is not None and column not in COLUMNS:
        raise ValueError(f"report column must be one of {', '.join(COLUMNS)}, got {column!r}")
    directory = Path(report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    text = markdown.strip("\n")
    if not text.startswith("## "):
        text = f"## {key}\n\n{text}"
    if not re.search(r"^timestamp:", text, re.MULTILINE):
        title, _, rest = text.partition("\n")
        text = f"{title}\ntimestamp: {_now_text(now)}\n{rest}"
    path = directory / f"{key}.md"
    if summary is not None:
        values = {str(k): _number(v) for k, v in summary.items()}
        record = {"column": column, "summary": values, "time": now}
        _write_text(directory / f"{key}.json", json.dumps(record, indent=2) + "\n")
    _write_text(path, text.rstrip() + "\n")
    return path


def model_lines(
    model_config: Mapping[str, Any], parameters: Mapping[str, int] | None = None
) -> list[str]:
    """Report lines describing a model: its family and shape, and its parameters by group.

    `model_config` is a checkpoint's config dict (no `model` key: a GPT's); `parameters` is
    `num_scaling_params()` ({group: count, ..., "total": n}), left out when None."""
    from engine.models.registry import family_of

    try:
        label = family_of(model_config).label
    except ValueError:
        label = str(model_config.get("model"))
    parts = (("n_layer", "{} layers"), ("n_embd", "width {}"), ("n_head", "{} heads"),
             ("sequence_len", "context {}"))  # fmt: skip
    shape = [text.format(model_config[key]) for key, text in parts if key in model_config]
    lines = [f"- model: {label}" + (f" ({', '.join(shape)})" if shape else "")]
    if parameters and "total" in parameters:
        groups = ", ".join(
            f"{name} {count:,}" for name, count in parameters.items() if name != "total" and count
        )
        lines.append(f"- parameters: {parameters['total']:,}" + (f" ({groups})" if groups else ""))
    return lines


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


# ---- header --------------------------------------------------------------------------------


def _git_info(cwd: Path) -> dict[str, Any]:
    """Commit, branch and dirtiness of the source tree; empty when git or the repo is absent."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    # --no-optional-locks: reading the status must not rewrite the index of the repo.
    status = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(status),
    }


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory)})
        return gpus
    except Exception:  # noqa: BLE001 - a broken driver must not stop a report
        return []


def hourly_cost(gpus: Sequence[Mapping[str, Any]]) -> float | None:
    """Estimated $/hour for these GPUs; None on CPU or when a GPU is not in the price table."""
    if not gpus:
        return None
    total = 0.0
    for gpu in gpus:
        price = next((usd for key, usd in GPU_HOURLY_USD if key in gpu["name"]), None)
        if price is None:
            return None
        total += price
    return total


def environment() -> dict[str, Any]:
    """What the header records: where and on what the pipeline ran, and when it started."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    gpus = _gpus()
    started = time.time()
    return {
        "start_time": started,
        "start": _now_text(started),
        "git": _git_info(Path(__file__).resolve().parent),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch_version,
        "hourly_cost_usd": hourly_cost(gpus),
    }


def header_markdown(env: Mapping[str, Any]) -> str:
    git = env.get("git") or {}
    if git:
        commit = f"{git['commit'][:12]} ({git.get('branch') or '?'}"
        commit += ", uncommitted changes)" if git.get("dirty") else ")"
    else:
        commit = "n/a"
    memory = env.get("memory_bytes")
    gpus = env.get("gpus") or []
    if gpus:
        names: dict[str, int] = {}
        for gpu in gpus:
            label = f"{gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB)"
            names[label] = names.get(label, 0) + 1
        gpu_text = ", ".join(f"{n} x {label}" for label, n in names.items())
    else:
        gpu_text = "none"
    cost = env.get("hourly_cost_usd")
    lines = [
        REPORT_TITLE,
        "",
        "## Environment",
        f"- started: {env['start']}",
        f"- git commit: {commit}",
        f"- platform: {env.get('platform')}",
        f"- CPUs: {env.get('cpus') or '?'}",
        f"- memory: {memory / 2**30:.1f} GiB" if memory else "- memory: ?",
        f"- GPUs: {gpu_text}",
        f"- Python: {env.get('python')}",
        f"- PyTorch: {env.get('torch') or 'n/a'}",
        f"- hourly cost estimate: {'n/a' if cost is None else f'${cost:.2f}/h'}",
    ]
    return "\n".join(lines) + "\n"


def write_header(report_dir: str | os.PathLike) -> Path:
    """Record the environment and the start time in header.md / header.json; returns header.md."""
    directory = Path(report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    env = environment()
    _write_text(directory / HEADER_JSON, json.dumps(env, indent=2) + "\n")
    path = directory / HEADER_MD
    _write_text(path, header_markdown(env))
    return path


def reset(report_dir: str | os.PathLike) -> Path:
    """Remove every section (and an old report), then write a fresh header."""
    directory = Path(report_dir)
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_file() and entry.suffix in (".md", ".json"):
                entry.unlink()
    return write_header(directory)


# ---- assembling ----------------------------------------------------------------------------


def _section_keys(directory: Path) -> list[str]:
    found = {
        p.stem
        for p in directory.glob("*.md")
        if p.stem not in _RESERVED and _KEY.match(p.stem) and p.is_file()
    }
    ordered = [key for key in SECTION_ORDER if key in found]
    return ordered + sorted(found - set(SECTION_ORDER))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def collect_summary(report_dir: str | os.PathLike) -> dict[str, dict[str, float | None]]:
    """{column: {metric: value}} from the section files, later stages overriding earlier ones."""
    directory = Path(report_dir)
    table: dict[str, dict[str, float | None]] = {}
    for key in _section_keys(directory):
        path = directory / f"{key}.json"
        if not path.is_file():
            continue
        data = _read_json(path)
        column, summary = data.get("column"), data.get("summary")
        if column not in COLUMNS or not isinstance(summary, dict):
            raise ValueError(f"{path}: needs a column in {COLUMNS} and a summary object")
        for metric, value in summary.items():
            if value is not None:
                table.setdefault(column, {})[metric] = value
    return table


def summary_table(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """`| Metric | BASE | SFT | RL |` with only the columns and metrics that have a value."""
    columns = [c for c in COLUMNS if any(v is not None for v in table.get(c, {}).values())]
    if not columns:
        return ""
    seen = {m for c in columns for m, v in table[c].items() if v is not None}
    metrics = [m for m in SUMMARY_METRICS if m in seen] + sorted(seen - set(SUMMARY_METRICS))
    lines = [
        "| Metric | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for metric in metrics:
        cells = []
        for column in columns:
            value = table[column].get(metric)
            cells.append("-" if value is None else f"{value:.4f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _section_time(directory: Path, key: str) -> float:
    summary = directory / f"{key}.json"
    if summary.is_file():
        value = _read_json(summary).get("time")
        if isinstance(value, (int, float)):
            return float(value)
    return (directory / f"{key}.md").stat().st_mtime


def build_report(report_dir: str | os.PathLike) -> str:
    """Header + sections in stage order (unknown ones after, by name) + summary + wall clock."""
    directory = Path(report_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"report directory {directory} does not exist")
    parts = []
    header = directory / HEADER_MD
    start = None
    if header.is_file():
        parts.append(header.read_text(encoding="utf-8").strip())
        header_json = directory / HEADER_JSON
        if header_json.is_file():
            start = _read_json(header_json).get("start_time")
    else:
        parts.append(f"{REPORT_TITLE}\n\n(no header: run `python -m training.report reset` first)")
    keys = _section_keys(directory)
    for key in keys:
        parts.append((directory / f"{key}.md").read_text(encoding="utf-8").strip())
    summary = ["## Summary"]
    table = summary_table(collect_summary(directory))
    summary += ["", table] if table else ["", "No summary metrics were recorded."]
    if isinstance(start, (int, float)):
        end = max((_section_time(directory, k) for k in keys), default=time.time())
        summary += ["", f"Total wall clock time: {_format_seconds(end - start)}"]
    parts.append("\n".join(summary))
    return "\n\n".join(parts) + "\n"


def generate(report_dir: str | os.PathLike) -> tuple[Path, str]:
    """Write `<report_dir>/report.md` atomically; returns its path and the markdown."""
    markdown = build_report(report_dir)
    path = Path(report_dir) / REPORT_MD
    _write_text(path, markdown)
    return path, markdown


# ---- command line --------------------------------------------------------------------------

_REPORT_DIR = Flag(
    "report_dir", str, "", "report directory (default <NANOCHAT_HOME>/report)", path=True
)
_RUN_DIR = Flag("run_dir", str, "", "write events.jsonl here for the web app", path=True)
COMMANDS: dict[str, FlagSet] = {
    "reset": FlagSet(
        "report_reset", [_REPORT_DIR, _RUN_DIR], "Clear the sections and write a fresh header."
    ),
    "generate": FlagSet(
        "report_generate", [_REPORT_DIR, _RUN_DIR], "Assemble report.md from the sections."
    ),
}


def parse_command(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(command, config) from `argv`; exits with a usage message on bad input."""
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        lines = [f"usage: python -m training.report {{{','.join(COMMANDS)}}} [options]", ""]
        lines += [f"  {name:<9} {flags.description}" for name, flags in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    command, flagset = argv[0], COMMANDS[argv[0]]
    parser = flagset.parser()
    parser.prog = f"python -m training.report {command}"
    given = vars(parser.parse_args(list(argv[1:])))
    preset = given.pop("config", None)
    try:
        config = flagset.load_config_file(preset) if preset else {}
        config.update(flagset.validate(given, partial=True))
        return command, flagset.validate(config)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _run(command: str, config: Mapping[str, Any], events: EventWriter) -> None:
    directory = Path(config["report_dir"] or data_home() / "report")
    if command == "reset":
        path = reset(directory)
        print(f"report reset: {path}")
        return
    path, markdown = generate(directory)
    events.report("Report", markdown)
    print(path)


def main(argv: Sequence[str] | None = None) -> int:
    command, config = parse_command(sys.argv[1:] if argv is None else argv)
    with EventWriter(config["run_dir"] or None) as events:
        events.start({"command": command, **config}, total_steps=0, world_size=1,
                     device="cpu", program="report")  # fmt: skip
        return run_program(events, lambda: _run(command, config, events))


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
