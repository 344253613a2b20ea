"""Downloads: a run's metric points (CSV or JSON lines), the leaderboard and a compare table (CSV).

Plain functions shared by the pages and the REST API, so a table downloaded from a page has the
rows and values the page shows, and the API and the run page's links give the same file.

A long run has millions of metric points, so they are streamed: read with `.iterator()` (a
server-side cursor where the database has one) and written in chunks of rows, never held in a
list. Under ASGI (daphne) Django would collect a synchronous iterator into a list before
sending it; `StreamingDownload` reads the next chunk in the request's own thread instead.

Download file names are made from ids and fixed words only: a run's name is user text and has
no place in a header. Text cells that a spreadsheet would run as a formula (=, +, -, @ first)
get a leading apostrophe; numbers are written as they are, so values round-trip.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse

from runs.models import MetricPoint

CSV_TYPE = "text/csv; charset=utf-8"
JSONL_TYPE = "application/x-ndjson; charset=utf-8"
METRIC_COLUMNS = ("name", "step", "value", "time")
MAX_EXPORT_NAMES = 100  # more than any run reports; bounds the SQL `IN` list
MAX_NAME_LENGTH = MetricPoint._meta.get_field("name").max_length
ROWS_PER_CHUNK = 2000  # rows per database fetch and per chunk sent
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ExportError(ValueError):
    """A bad download request: `field` names the query parameter (a 400 naming it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


# ---- streaming -----------------------------------------------------------------------------


class StreamingDownload(StreamingHttpResponse):
    """A streamed attachment that stays streamed under ASGI too.

    Django's ASGI handler collects a synchronous iterator into a list before sending it (all
    points in memory at once); here each chunk is read by sync_to_async in the request's
    thread (the handler's ThreadSensitiveContext), where the database cursor lives."""

    def __init__(self, chunks: Iterable[str], content_type: str, filename: str):
        super().__init__(chunks, content_type=content_type)
        self["Content-Disposition"] = f'attachment; filename="{filename}"'
        self["X-Content-Type-Options"] = "nosniff"

    async def __aiter__(self):
        chunks = iter(self.streaming_content)
        done = object()
        while (chunk := await sync_to_async(next)(chunks, done)) is not done:
            yield chunk


def csv_chunks(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """The CSV text of header + rows, in chunks of ROWS_PER_CHUNK rows (csv module quoting)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(rows, 1):
        writer.writerow([_cell(value) for value in row])
        if i % ROWS_PER_CHUNK == 0:
            yield _drain(buffer)
    yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _cell(value: Any) -> Any:
    """A CSV cell: numbers as Python writes them (repr: exact round-trip), None empty, text
    defused against spreadsheet formulas."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_download(header: Sequence[str], rows: Iterable[Sequence[Any]], filename: str):
    return StreamingDownload(csv_chunks(header, rows), CSV_TYPE, filename)


# ---- metric points -------------------------------------------------------------------------


def parse_names(raw: str | None, known: Iterable[str]) -> list[str]:
    """The metric names asked for in `?names=a,b` (all `known` ones when none are), checked
    before any point is read: a bounded count and length, and only names the run has (a typo
    would otherwise download an empty file without a word)."""
    known = list(known)
    asked = list(dict.fromkeys(n.strip() for n in (raw or "").split(",") if n.strip()))
    if not asked:
        return known
    if len(asked) > MAX_EXPORT_NAMES:
        raise ExportError("names", f"at most {MAX_EXPORT_NAMES} names")
    if any(len(n) > MAX_NAME_LENGTH for n in asked):
        raise ExportError("names", f"a metric name is at most {MAX_NAME_LENGTH} characters")
    unknown = [n for n in asked if n not in set(known)]
    if unknown:
        raise ExportError("names", "the run has no metric named " + ", ".join(unknown))
    return asked


def metric_rows(run_id: int, names: Sequence[str]) -> Iterator[tuple]:
    """(name, step, value, time) of the run's points for `names`, by name then step, read
    ROWS_PER_CHUNK at a time (the run/name/step index serves the order)."""
    points = MetricPoint.objects.filter(run_id=run_id, name__in=list(names))
    points = points.order_by("name", "step", "id").values_list(*METRIC_COLUMNS)
    return points.iterator(chunk_size=ROWS_PER_CHUNK)


def jsonl_chunks(rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """One JSON object per point ({"name", "step", "value", "time"}; value null for NaN/inf),
    in chunks of ROWS_PER_CHUNK lines."""
    lines = []
    for row in rows:
        lines.append(json.dumps(dict(zip(METRIC_COLUMNS, row, strict=True))) + "\n")
        if len(lines) == ROWS_PER_CHUNK:
            yield "".join(lines)
            lines = []
    yield "".join(lines)


METRIC_FORMATS = {"csv": CSV_TYPE, "jsonl": JSONL_TYPE}


def metrics_download(run_id: int, names: Sequence[str], fmt: str) -> StreamingDownload:
    """The run's points for `names` as a streamed csv or jsonl attachment."""
    rows = metric_rows(run_id, names)
    chunks = csv_chunks(METRIC_COLUMNS, rows) if fmt == "csv" else jsonl_chunks(rows)
    return StreamingDownload(chunks, METRIC_FORMATS[fmt], f"run-{int(run_id)}-metrics.{fmt}")


# ---- leaderboard ---------------------------------------------------------------------------


def leaderboard_table(rows, columns: Sequence[str], arena_column: str) -> tuple[list, list]:
    """(header, rows) of the leaderboard as the page shows it: rank, the checkpoint (split into
    its id, stage, step, depth, run id and run name), the model, a score per column (full
    precision; the page rounds to 4 places), which scores are offline sample data (the page's
    †), and with the Arena column its rating, ± margin and votes."""
    scores = [c for c in columns if c != arena_column]
    arena = arena_column in columns
    header = ["rank", "checkpoint", "stage", "step", "depth", "run", "run name", "model"]
    header += [*scores, "offline"]
    if arena:
        header += [arena_column, f"{arena_column} ±", f"{arena_column} votes"]
    table = []
    for rank, row in enumerate(rows, 1):
        ckpt = row.checkpoint
        cells = [rank, ckpt.pk, ckpt.stage, ckpt.step, ckpt.depth or None, ckpt.run_id,
                 str(ckpt.run) if ckpt.run_id else None, row.family_label]  # fmt: skip
        cells += [row.scores.get(c) for c in scores]
        cells.append(";".join(c for c in scores if c in row.offline))
        if arena:
            rating = row.arena
            cells += [rating.rating, rating.margin, rating.votes] if rating else [None] * 3
        table.append(cells)
    return header, table


# ---- compare -------------------------------------------------------------------------------


def compare_table(context: dict) -> tuple[list, list]:
    """(header, rows) of the compare page's tables: the final metrics table (model, the chosen
    metrics' last values, best val bpb, status, steps, training amounts), then the config
    diff, one row per setting, `section` saying which table a row is from."""
    runs = context["runs"]
    header = ["section", "row", *(f"run {r.pk}" for r in runs)]
    rows = [["final", "name", *(str(r) for r in runs)]]
    rows.append(["final", "model", *(r.model_label or None for r in runs)])
    for name, values in [*context["final_rows"], *context["best_rows"]]:
        rows.append(["final", name, *values])
    rows.append(["final", "status", *(r.status for r in runs)])
    rows.append(["final", "steps", *(r.step for r in runs)])
    for name, values in context["amount_rows"]:
        rows.append(["final", name, *(None if v == "–" else v for v in values)])
    for key, values in context["diff"]:
        rows.append(["config", key, *(_setting(v) for v in values)])
    return header, rows


def _setting(value: Any) -> Any:
    """A config value: numbers and text as they are, lists and dicts as JSON, missing empty."""
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else value
