"""Checkpoints as Hugging Face downloads, and exported folders imported as checkpoints.

The download (the checkpoints page's "HF zip" button and `GET /api/checkpoints/<id>/export/`)
builds the export (engine/hf_export.py) in a temporary folder of its own and streams it as a
zip made on the fly, so a multi-gigabyte model is never held in memory; the folder is removed
when the response is closed (sent, failed or abandoned), and folders a killed process left
behind are swept by the next export. Exports are bounded: at most `HF_EXPORT_CONCURRENCY` at
once per web process and checkpoints of at most `HF_EXPORT_MAX_BYTES` (settings, with the
defaults below); the CLI (`python -m engine.export`) has no such limits. Reading a checkpoint
needs only a signed-in user (every user sees every run and artifact, runs/services.py
`can_manage`), and so does downloading it: `can_download` is the one place that says so.

The import (`manage.py import_checkpoint`) writes into the data home at
`imports/checkpoint-<id>/` and registers a Checkpoint row, which the chat picker then lists.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction

from engine.checkpoint import meta_path, model_path
from engine.hf_export import CardInfo, ExportError, export_checkpoint, safe_settings, zip_chunks
from engine.hf_import import import_folder, read_export_config
from runs import layout
from runs.exports import StreamingDownload
from runs.models import Checkpoint, EvalResult

ZIP_TYPE = "application/zip"
DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_CONCURRENCY = 2
# An export folder older than this belongs to a process that died mid-download.
STALE_SECONDS = 6 * 3600
# An export needs about the checkpoint's size again on disk (plus the zip's own bookkeeping).
DISK_MARGIN = 1.1
MAX_CARD_EVALS = 50
_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()


class ExportUnavailable(Exception):
    """Why a checkpoint cannot be downloaded now: `status` is the HTTP answer (404 gone, 409
    cannot be exported, 503 busy or out of disk space)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def can_download(user, checkpoint: Checkpoint) -> bool:
    """Whoever may read the checkpoint may download it: any signed-in user (see the module
    docstring); kept here so a future per-user visibility changes one function."""
    return bool(user and user.is_authenticated)


def export_tmp_root() -> Path:
    return layout.data_home() / "tmp" / "hf-export"


def max_export_bytes() -> int:
    return int(getattr(settings, "HF_EXPORT_MAX_BYTES", DEFAULT_MAX_BYTES))


def _export_slots() -> threading.BoundedSemaphore:
    global _slots
    with _slots_lock:
        if _slots is None:
            count = int(getattr(settings, "HF_EXPORT_CONCURRENCY", DEFAULT_CONCURRENCY))
            _slots = threading.BoundedSemaphore(max(1, count))
        return _slots


def download_name(checkpoint: Checkpoint) -> str:
    """The zip's file name and its top folder, from ids only (names are user text)."""
    return f"checkpoint-{checkpoint.pk}-step-{checkpoint.step}-hf"


def card_for(checkpoint: Checkpoint) -> CardInfo:
    """The model card's facts from the database: the run, its data, settings and scores."""
    run = checkpoint.run
    evals = EvalResult.objects.filter(checkpoint=checkpoint).order_by("task", "metric", "-created")
    seen, scores = set(), []
    for result in evals[: MAX_CARD_EVALS * 4]:
        if (result.task, result.metric) not in seen and len(scores) < MAX_CARD_EVALS:
            seen.add((result.task, result.metric))
            scores.append((result.task, result.metric, result.value))
    card = CardInfo(stage=checkpoint.stage, evals=scores, val_bpb=checkpoint.val_bpb)
    if run is not None:
        card.title = run.name
        card.source = f"run #{run.pk} {run.name}".strip()
        card.training = safe_settings(run.config) if isinstance(run.config, dict) else {}
        parts = []
        if run.dataset is not None:
            parts.append(f"dataset {run.dataset.name} ({run.dataset.source})")
        if run.tokenizer is not None:
            parts.append(f"tokenizer {run.tokenizer.name}")
        card.data = ", ".join(parts)
    return card


class ZipStream:
    """The zip of an export folder, produced while it is sent; `close` (called by Django when
    the response ends, however it ends) removes the folder and frees the export slot."""

    def __init__(self, workdir: Path, folder: Path, root: str, release) -> None:
        self._workdir, self._release = workdir, release
        self._chunks = zip_chunks(folder, root)
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._release()


def prepare_download(checkpoint: Checkpoint) -> ZipStream:
    """Build the export of `checkpoint` and return its zip stream (ExportUnavailable if the
    files are gone, it cannot be exported, or the server is busy or short of disk)."""
    directory = Path(checkpoint.path)
    weights = model_path(directory, checkpoint.step)
    if not (meta_path(directory, checkpoint.step).is_file() and weights.is_file()):
        raise ExportUnavailable(404, "the checkpoint's files are no longer on disk")
    size = weights.stat().st_size
    limit = max_export_bytes()
    if size > limit:
        raise ExportUnavailable(
            409,
            f"the checkpoint is {size / 2**30:.1f} GiB, more than the web download allows "
            f"({limit / 2**30:.1f} GiB); export it on the server with `python -m engine.export`",
        )
    root = export_tmp_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale_exports(root)
    if shutil.disk_usage(root).free < size * DISK_MARGIN:
        raise ExportUnavailable(503, "not enough free disk space to build the export now")
    slots = _export_slots()
    if not slots.acquire(blocking=False):
        raise ExportUnavailable(503, "other exports are being built; try again in a minute")
    workdir = Path(tempfile.mkdtemp(prefix="export-", dir=root))
    name = download_name(checkpoint)
    try:
        export_checkpoint(
            directory, workdir / name, step=checkpoint.step, card=card_for(checkpoint)
        )
    except ExportError as error:
        _discard(workdir, slots)
        raise ExportUnavailable(409, str(error)) from error
    except FileNotFoundError as error:
        _discard(workdir, slots)
        raise ExportUnavailable(404, "the checkpoint's files are no longer on disk") from error
    except BaseException:
        _discard(workdir, slots)
        raise
    return ZipStream(workdir, workdir / name, name, slots.release)


def download_response(checkpoint: Checkpoint) -> StreamingDownload:
    """The streamed zip response (Django closes it, and so the stream, when it is done)."""
    return StreamingDownload(
        prepare_download(checkpoint), ZIP_TYPE, download_name(checkpoint) + ".zip"
    )


def _discard(workdir: Path, slots: threading.BoundedSemaphore) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    slots.release()


def sweep_stale_exports(root: Path) -> None:
    """Remove export folders older than STALE_SECONDS (their process died mid-download)."""
    cutoff = time.time() - STALE_SECONDS
    for entry in root.glob("export-*"):
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)


# ---- import -------------------------------------------------------------------------------


def import_checkpoint(folder: str | Path, owner, stage: str = Checkpoint.Stage.SFT) -> Checkpoint:
    """Import an export folder into the data home and register it (owned by `owner`).

    The folder is checked and converted into a temporary directory under `imports/` first; only
    a complete import becomes `imports/checkpoint-<id>/` and a row, so a refused folder leaves
    nothing behind. Raises ExportError with the reason."""
    if stage not in Checkpoint.Stage.values:
        raise ExportError(f"stage must be one of {', '.join(Checkpoint.Stage.values)}")
    read_export_config(folder)  # refuse a foreign folder before making anything
    imports = layout.data_home() / "imports"
    imports.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=imports))
    try:
        result = import_folder(folder, staging / "checkpoint")
        with transaction.atomic():
            checkpoint = Checkpoint.objects.create(
                owner=owner, stage=stage, step=result.step, path=str(staging / "checkpoint"),
                model_config=result.model_config, size_bytes=result.size_bytes,
                val_bpb=_val_bpb(staging / "checkpoint", result.step),
            )  # fmt: skip
            final = layout.import_dir(checkpoint.pk)
            if final.exists():  # left by a row that was deleted without its files
                raise ExportError(f"{final} already exists; remove it or import again")
            (staging / "checkpoint").rename(final)
            try:
                checkpoint.path = str(final)
                checkpoint.save(update_fields=["path"])
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def _val_bpb(directory: Path, step: int) -> float | None:
    meta = json.loads(meta_path(directory, step).read_text(encoding="utf-8"))
    value = meta.get("val_bpb")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
