"""Optional Weights & Biases logging: a program's event stream, mirrored into a W&B run.

Every training program already reports through one `EventWriter` (training/events.py), so a
sink on that writer gives all of them W&B logging with no per-program code: the `start` event
opens the W&B run with the program's config, `metrics` and `eval` values are logged at their
step, `eval_result` and `checkpoint` events become summary values, and `end` finishes the run
with a matching exit code. W&B sees exactly the numbers the web app ingests.

It is off unless a project is named: `--wandb-project`, else `WANDB_PROJECT` in the
environment (a Celery worker's environment reaches the programs it launches, WANDB_MODE,
WANDB_ENTITY, WANDB_API_KEY and the rest with it). `wandb` is not a requirement of the project
(requirements-wandb.txt installs it) and is imported only when a project is named, so without
one nothing here touches it. When it is asked for but cannot work (not installed, not logged in,
no network in online mode) the run goes on unchanged: one warning in the log, and the `start`
event's `wandb` field says why, so the run page can too.

The `start` event's `wandb` field: project, group, mode ("online" | "offline" | "disabled"),
run_id, url (online) and dir (the local run directory, which `wandb sync <dir>` uploads
later; the one to sync in offline mode) -- or project and error.

Only rank 0 builds a sink (the caller's job, as only rank 0 writes events).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.flags import check_component

PROJECT_ENV = "WANDB_PROJECT"
INSTALL_HINT = "pip install -r requirements-wandb.txt"
# What `end` statuses become as the W&B run's exit code (non-zero: W&B marks it failed).
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 130}
# The start event's fields that describe the run rather than configure it: W&B keeps them
# under this config key, apart from the flags (one of which is also called `device`).
RUN_FIELDS = ("program", "total_steps", "world_size", "device", "start_step", "derived")
META_KEY = "nanochat"
MAX_ERROR = 500  # characters of an error message kept in the start event


def requested_project(config: Mapping[str, Any]) -> str:
    """The W&B project a program's config asks for: its flag, else $WANDB_PROJECT ('' = none)."""
    return str(config.get("wandb_project") or os.environ.get(PROJECT_ENV, "")).strip()


def sink_for(config: Mapping[str, Any], program: str) -> WandbSink | None:
    """The W&B sink for a program run with `config`, or None when no project is asked for
    (then wandb is not even imported)."""
    project = requested_project(config)
    if not project:
        return None
    run_dir = config.get("run_dir") or None
    return WandbSink(
        project,
        group=config.get("wandb_group") or None,
        name=Path(run_dir).name if run_dir else None,
        job_type=program,
        directory=run_dir,
    )


def _numbers(values: Any) -> dict[str, float]:
    """The plottable entries of an event's `values` (None stands for NaN/inf: left out)."""
    if not isinstance(values, Mapping):
        return {}
    return {
        str(k): v
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbSink:
    """An EventSink (training/events.py) that mirrors the events into one W&B run."""

    def __init__(
        self,
        project: str,
        *,
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        directory: str | os.PathLike | None = None,
    ):
        self.project = project
        self.group = group
        self.name = name
        self.job_type = job_type
        self.directory = directory
        self.error: str | None = None
        self._wandb = None
        self._run = None
        self._exit_code: int | None = None
        try:
            check_component(project)
        except ValueError as exc:
            self._fail(f"the project name {exc}")
            return
        try:
            import wandb
        except ImportError as exc:  # the optional dependency is missing (or broken)
            self._fail(f"wandb is not installed ({exc}); {INSTALL_HINT}")
            return
        self._wandb = wandb

    def _fail(self, why: str) -> None:
        """Stop mirroring: say why once (stderr, the run's log) and remember it."""
        self.error = why[:MAX_ERROR]
        self._wandb = self._run = None
        print(f"warning: no W&B logging to project {self.project!r}: {self.error}",
              file=sys.stderr, flush=True)  # fmt: skip

    # --- EventSink ----------------------------------------------------------------------------
    def observe(self, record: dict[str, Any]) -> Mapping[str, Any] | None:
        kind = record.get("type")
        if kind == "start":
            return {"wandb": self._start(record)}
        if self._run is None:
            if kind == "end":
                self._exit_code = EXIT_CODES.get(record.get("status"), 1)
            return None
        try:
            if kind in ("metrics", "eval"):
                values = _numbers(record.get("values"))
                step = record.get("step")
                if values:
                    self._run.log(values, step=step if isinstance(step, int) else None)
            elif kind == "eval_result" and _is_number(record.get("value")):
                self._run.summary[f"{record.get('task')}/{record.get('metric')}"] = record["value"]
            elif kind == "checkpoint":
                self._run.summary["checkpoint/step"] = record.get("step")
                self._run.summary["checkpoint/path"] = record.get("path")
            elif kind == "end":
                self._exit_code = EXIT_CODES.get(record.get("status"), 1)
        except Exception as exc:  # W&B trouble never stops the run
            self._fail(f"{type(exc).__name__}: {exc}")
        return None

    def close(self) -> None:
        """Finish the W&B run after the last event: a run that ended without an `end` event
        (it cannot normally happen) counts as failed."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if self._exit_code is None else self._exit_code)
        except Exception as exc:
            self._fail(f"finishing the run: {type(exc).__name__}: {exc}")

    # --- the W&B run ----------------------------------------------------------------------------
    def _start(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Open the W&B run for a `start` event; what the event records about it."""
        info: dict[str, Any] = {"project": self.project}
        if self.group:
            info["group"] = self.group
        if self._run is not None:  # a second start in one process: the run already exists
            return {**info, **self._describe(self._run)}
        if self._wandb is None:
            return {**info, "error": self.error or "W&B logging is off"}
        config = dict(record.get("config") or {})
        config[META_KEY] = {k: record[k] for k in RUN_FIELDS if k in record}
        # $WANDB_DIR wins; else the W&B files live in the run's own directory, beside its events.
        directory = None if os.environ.get("WANDB_DIR") else self.directory
        try:
            self._run = self._wandb.init(
                project=self.project,
                group=self.group,
                name=self.name,
                job_type=self.job_type,
                config=config,
                dir=str(directory) if directory else None,
                # Python-level capture only: the program's stdout stays a plain file descriptor
                # for the web app's log.txt and torchrun.
                settings=self._wandb.Settings(console="wrap"),
            )
        except Exception as exc:  # no API key, no network, a bad setting: say so, train on
            self._fail(f"{type(exc).__name__}: {exc}")
            return {**info, "error": self.error}
        except KeyboardInterrupt:  # cancelled while W&B started (online, that can take a while)
            # A run it opened is finished by close() with the `end` event's status (cancelled),
            # not left for wandb's exit hook to call a success.
            self._run = getattr(self._wandb, "run", None)
            raise
        return {**info, **self._describe(self._run)}

    @staticmethod
    def _describe(run) -> dict[str, Any]:
        """Where the run went: mode, id, web page (online), local directory."""
        mode = str(getattr(run.settings, "mode", "") or "")
        info: dict[str, Any] = {"mode": mode, "run_id": str(run.id or "")}
        if mode == "disabled":  # WANDB_MODE=disabled: a no-op run with nothing to show
            return info
        url = getattr(run, "url", None)
        if url:
            info["url"] = str(url)
        sync_dir = getattr(run.settings, "sync_dir", None)
        if sync_dir:
            info["dir"] = str(sync_dir)
        return info
