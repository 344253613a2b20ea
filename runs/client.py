"""Command-line client of the runs API: `nanochat submit base --preset tiny ...`.

`make run` / `make test` install it as the `nanochat` command of the project's venv (see
pyproject.toml), usable from any directory; `python -m runs.client` is the same program.
Standard library only and no import from the project, so the file also works copied onto a
laptop that has nothing but Python. The server comes from --url or NANOCHAT_URL, the token from
--token or NANOCHAT_TOKEN (get one with `nanochat token`).

`plot` and `compare` draw metric curves into a local image file with matplotlib (imported only by
those two commands, so everything else still needs nothing beyond the standard library).

Exit status: 0 done, 1 a watched run did not succeed, 2 the server refused the request (its
messages are printed one per line, `field: message`) or could not be reached, or the client
refused it (an unknown run or metric, too many of them, --out a directory), 141 the reader of
the output went away (`nanochat list | head -1`), as a shell reports a command that SIGPIPE
ended -- silently, like other Unix tools.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://localhost:8000"
POLL_SECONDS = 2.0
FINISHED = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """The server said no (status >= 400) or could not be reached (status 0)."""

    def __init__(self, status: int, payload: Any):
        self.status = status
        self.payload = payload
        super().__init__("\n".join(self.messages()))

    def messages(self) -> list[str]:
        """One line per message: `field: message`, or the bare message for `detail`."""
        payload = self.payload
        if isinstance(payload, dict):
            lines = []
            for field, value in payload.items():
                for message in value if isinstance(value, list) else [value]:
                    text = message if isinstance(message, str) else json.dumps(message)
                    lines.append(text if field == "detail" else f"{field}: {text}")
            return lines
        if isinstance(payload, list):
            return [str(m) for m in payload]
        return [f"HTTP {self.status}: {str(payload).strip()[:500]}"]


class UsageError(Exception):
    """A request the client refuses itself (the server cannot: it answers an unknown metric
    with an empty series, and knows nothing of the local --out file); exits 2 like ApiError."""


def _multipart(fields: dict[str, str], files: list[Path]) -> tuple[bytes, str]:
    """A multipart/form-data body (files are read into memory: fine for text corpora)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    for path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, url: str, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        query: dict | None = None,
        files: list[Path] | None = None,
    ) -> Any:
        """One request; returns the decoded JSON answer (None when empty), raises ApiError."""
        url = self.url + path
        query = {k: v for k, v in (query or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        data = None
        if files:
            fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
            data, headers["Content-Type"] = _multipart(fields, files)
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            raise ApiError(exc.code, payload) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, {"detail": f"cannot reach {self.url}: {exc.reason}"}) from None
        return json.loads(raw) if raw else None


# ---- output -------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _progress_line(run: dict) -> str:
    total = f"/{run['total_steps']}" if run.get("total_steps") else ""
    return (
        f"run {run['id']} {run['status']}: step {run['step']}{total} "
        f"({100 * (run.get('progress') or 0):.1f}%) eta {_duration(run.get('eta_seconds'))}"
    )


def _ref(obj: dict | None) -> str:
    return f"{obj['name']} (#{obj['id']})" if obj else "-"


def _show_run(run: dict) -> None:
    rows = [
        ("run", f"{run['id']} {run['name']}".strip()),
        ("kind", f"{run['kind']}" + (f" (preset {run['preset']})" if run["preset"] else "")),
        ("status", run["status"]),
        ("owner", run["owner"] or "-"),
        ("progress", _progress_line(run).split(": ", 1)[1]),
        ("dataset", _ref(run["dataset"])),
        ("tokenizer", _ref(run["tokenizer"])),
        ("created", run["created"]),
        ("started", run["started_at"] or "-"),
        ("finished", run["finished_at"] or "-"),
        ("best val bpb", run["best_val_bpb"] if run["best_val_bpb"] is not None else "-"),
        ("host / pid", f"{run['host'] or '-'} / {run['pid'] or '-'}"),
        ("exit code", run["exit_code"] if run["exit_code"] is not None else "-"),
        ("overrides", json.dumps(run["overrides"])),
    ]
    if run["error"]:
        rows.append(("error", run["error"]))
    for key, value in rows:
        print(f"{key:>13}  {value}")


def _show_programs(programs: list[dict]) -> None:
    def flag_lines(flags: list[dict], indent: str) -> None:
        for flag in flags:
            print(f"{indent}{flag['name']} ({flag['type']}, default {flag['default']!r}): "
                  f"{flag['help']}")  # fmt: skip

    for program in programs:
        print(f"{program['kind']}: {program['description']}  [{program['submit_via']}]")
        if program["inputs"]:
            print(f"  inputs: {', '.join(program['inputs'])}")
        if program["presets"]:
            print(f"  presets: {', '.join(program['presets'])}")
        flag_lines(program["flags"], "    ")
        for source, flags in (program.get("sources") or {}).items():
            print(f"  source {source}:")
            flag_lines(flags, "    ")


# ---- commands -----------------------------------------------------------------------------


def _settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are JSON when they parse (4, true, 1e-3), else strings."""
    values = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text
    return values


def _pair(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return text


def watch(client: Client, run_id: int, out=print) -> int:
    """Print the run's progress whenever it changes, until it finishes; 0 if it succeeded."""
    last = None
    while True:
        run = client.call("GET", f"/api/runs/{run_id}/")
        line = _progress_line(run)
        if line != last:
            out(line)
            last = line
        if run["status"] in FINISHED:
            if run["error"]:
                out(f"error: {run['error']}")
            return 0 if run["status"] == "succeeded" else 1
        time.sleep(POLL_SECONDS)


def _output(args: argparse.Namespace, data: Any, human) -> None:
    """The server's JSON with --json, else the human-readable form."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)


def cmd_token(args, client: Client) -> int:
    username = args.username or input("username: ")
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:  # piped, as in `echo "$PASSWORD" | python -m runs.client token --username me`
        password = sys.stdin.readline().rstrip("\n")
    data = client.call("POST", "/api/auth/token/", {"username": username, "password": password})
    print(data["token"])
    return 0


def cmd_programs(args, client: Client) -> int:
    _output(args, client.call("GET", "/api/programs/"), _show_programs)
    return 0


def cmd_submit(args, client: Client) -> int:
    body = {
        "kind": args.kind, "preset": args.preset, "config": _settings(args.set),
        "dataset": args.dataset, "tokenizer": args.tokenizer, "parent_checkpoint": args.parent,
        "nproc_per_node": args.nproc, "name": args.name,
    }  # fmt: skip
    run = client.call("POST", "/api/runs/", body)
    _output(args, run, lambda r: print(f"run {r['id']} {r['status']}: {r['name'] or r['kind']}"))
    return watch(client, run["id"]) if args.wait else 0


def _show_list(data: dict) -> None:
    print(f"{'ID':>6}  {'KIND':<10} {'STATUS':<10} {'PROGRESS':>8}  {'OWNER':<12} NAME")
    for run in data["results"]:
        progress = f"{100 * run['progress']:.1f}%"
        print(f"{run['id']:>6}  {run['kind']:<10} {run['status']:<10} {progress:>8}  "
              f"{run['owner'] or '-':<12} {run['name']}")  # fmt: skip
    if data["next"]:
        print(f"... {data['count'] - len(data['results'])} more (filter with --status/--kind)")


def cmd_list(args, client: Client) -> int:
    query = {"status": args.status, "kind": args.kind, "mine": 1 if args.mine else None}
    _output(args, client.call("GET", "/api/runs/", query=query), _show_list)
    return 0


def cmd_show(args, client: Client) -> int:
    _output(args, client.call("GET", f"/api/runs/{args.id}/"), _show_run)
    return 0


def cmd_action(args, client: Client) -> int:
    """cancel, resume and retry: POST /api/runs/<id>/<command>/."""
    run = client.call("POST", f"/api/runs/{args.id}/{args.command}/")
    note = f" (retry of run {args.id})" if run["id"] != args.id else ""
    _output(args, run, lambda r: print(f"run {r['id']} {r['status']}{note}"))
    return 0


def _show_metrics(data: dict) -> None:
    for name, series in data["series"].items():
        if not series["step"]:
            print(f"{name}: no points")
            continue
        print(f"{name}: {len(series['step'])} of {series['total']} points, "
              f"last step {series['step'][-1]} = {series['value'][-1]}")  # fmt: skip


def cmd_metrics(args, client: Client) -> int:
    query = {"names": args.names, "max_points": args.max_points}
    _output(args, client.call("GET", f"/api/runs/{args.id}/metrics/", query=query), _show_metrics)
    return 0


def cmd_log(args, client: Client) -> int:
    data = client.call("GET", f"/api/runs/{args.id}/log/", query={"lines": args.lines})
    _output(args, data, lambda d: print("\n".join(d["lines"])))
    return 0


def cmd_watch(args, client: Client) -> int:
    return watch(client, args.id)


def _show_artifact(kind: str):
    return lambda a: print(f"{kind} {a['id']} {a['name']} {a['status']} (run {a['run']})")


def cmd_dataset_create(args, client: Client) -> int:
    body = {"name": args.name, "source": args.source, "options": _settings(args.option)}
    if args.path:
        body["path"] = args.path
    files = [Path(f) for f in args.file]
    _output(
        args, client.call("POST", "/api/datasets/", body, files=files), _show_artifact("dataset")
    )
    return 0


def cmd_tokenizer_create(args, client: Client) -> int:
    body = {"name": args.name, "dataset": args.dataset, "config": _settings(args.set)}
    _output(args, client.call("POST", "/api/tokenizers/", body), _show_artifact("tokenizer"))
    return 0


# ---- plots --------------------------------------------------------------------------------

MAX_PLOT_RUNS = 10  # more curves per axes than a legend can tell apart
MAX_PLOT_METRICS = 8  # subplots stacked in one figure stay readable up to about this many
PLOT_POINTS = 2000  # per curve: the server keeps each bucket's min and max, so spikes survive


def _metric_names(text: str) -> list[str]:
    """--metrics: comma-separated names, duplicates dropped, at most MAX_PLOT_METRICS."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated metric names")
    if len(names) > MAX_PLOT_METRICS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_PLOT_METRICS} metrics per figure (got {len(names)})"
        )
    return names


def _out_file(text: str) -> Path:
    """--out: the user's own file, overwritten if it is one, refused if it is a directory (a
    file would otherwise land inside it under a name nobody chose)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise UsageError(f"--out {text}: is a directory; give a file name such as {text}/loss.png")
    if not path.parent.is_dir():
        raise UsageError(f"--out {text}: no directory {path.parent}")
    return path


def fetch_curves(client: Client, run_ids: list[int], metrics: list[str]) -> list[dict]:
    """[{"run": run detail, "series": {metric: series}}] per run, in the order given.

    Every run and metric is checked before anything is drawn: an unknown one is named in the
    error (the server's 404 says only "No Run matches", and an unknown metric comes back as an
    empty series, indistinguishable from one that has no points yet).
    """
    if len(run_ids) > MAX_PLOT_RUNS:
        raise UsageError(f"at most {MAX_PLOT_RUNS} runs per figure (got {len(run_ids)})")
    curves = []
    for run_id in run_ids:
        try:
            run = client.call("GET", f"/api/runs/{run_id}/")
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(404, {"detail": f"run {run_id}: no such run"}) from None
            raise
        query = {"names": ",".join(metrics), "max_points": PLOT_POINTS}
        data = client.call("GET", f"/api/runs/{run_id}/metrics/", query=query)
        unknown = [m for m in metrics if m not in data["names"]]
        if unknown:
            known = ", ".join(data["names"]) or "none yet"
            raise UsageError(f"run {run_id} has no metric {', '.join(unknown)} (it has: {known})")
        curves.append({"run": run, "series": data["series"]})
    return curves


def _label(run: dict) -> str:
    return f"#{run['id']} {run['name'] or run['kind']}"


def metrics_figure(curves: list[dict], metrics: list[str]):
    """A matplotlib Figure: one subplot per metric (x = step), one line per run.

    Built on a bare Figure with the Agg canvas rather than pyplot, so no GUI backend is ever
    chosen (the client runs on servers without a display) and no global figure state is left
    behind; returned rather than saved so tests can count the lines on each axes.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plot and compare need matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(8, 2.6 * len(metrics) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for curve in curves:
            series = curve["series"][metric]
            values = [float("nan") if v is None else v for v in series["value"]]
            # sparse series (evals every few hundred steps) get markers: each point is real
            marker = "." if len(values) <= 50 else None
            ax.plot(series["step"], values, label=_label(curve["run"]), marker=marker, lw=1.2)
        ax.set_title(metric, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    return figure


def _save(figure, path: Path) -> str:
    """Write the figure (format from the file's suffix, PNG when it has none)."""
    try:
        figure.savefig(path, dpi=100, format=None if path.suffix else "png")
    except ValueError as exc:  # "Format 'xyz' is not supported"
        raise UsageError(f"--out {path}: {exc}") from None
    return str(path.resolve())


def _last(series: dict) -> float | None:
    """A series' last value (the server's downsampling always keeps the last point)."""
    return series["value"][-1] if series["value"] else None


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, so a diff names the exact setting that differs."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = object()


def config_diff(runs: list[dict]) -> dict[str, list[Any]]:
    """{setting: [value per run]} for the settings whose values differ (absent counts as a
    value: a setting only one run has is a difference), in sorted order."""
    configs = [_flat(run.get("config") or {}) for run in runs]
    keys = sorted(set().union(*configs))
    diff = {}
    for key in keys:
        values = [c.get(key, _ABSENT) for c in configs]
        if any(v != values[0] for v in values[1:]):
            diff[key] = [None if v is _ABSENT else v for v in values]
    return diff


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


def cmd_plot(args, client: Client) -> int:
    out = _out_file(args.out)
    curves = fetch_curves(client, [args.id], args.metrics)
    path = _save(metrics_figure(curves, args.metrics), out)
    _output(args, {"out": path}, lambda d: print(f"wrote {d['out']}"))
    return 0


def cmd_compare(args, client: Client) -> int:
    run_ids = list(dict.fromkeys(args.ids))
    if len(run_ids) < 2:
        raise UsageError("compare needs two or more different runs (one run: use plot)")
    out = _out_file(args.out)
    curves = fetch_curves(client, run_ids, args.metrics)
    runs = [c["run"] for c in curves]
    data = {
        "out": _save(metrics_figure(curves, args.metrics), out),
        "final": [
            {"run": run["id"], "name": run["name"],
             "metrics": {m: _last(c["series"][m]) for m in args.metrics}}
            for run, c in zip(runs, curves, strict=True)
        ],
        "config_diff": config_diff(runs),
    }  # fmt: skip

    def human(d: dict) -> None:
        print(f"wrote {d['out']}\n\nfinal metrics")
        rows = [["run", *args.metrics]]
        rows += [[_label(run), *(_value(f["metrics"][m]) for m in args.metrics)]
                 for run, f in zip(runs, d["final"], strict=True)]  # fmt: skip
        _table(rows)
        if not d["config_diff"]:
            print("\nconfig diff: none (the runs' configs are identical)")
            return
        print("\nconfig diff")
        rows = [["setting", *(f"#{run['id']}" for run in runs)]]
        rows += [[key, *map(_value, values)] for key, values in d["config_diff"].items()]
        _table(rows)

    _output(args, data, human)
    return 0


COMMANDS = {
    "token": cmd_token, "programs": cmd_programs, "submit": cmd_submit, "list": cmd_list,
    "show": cmd_show, "cancel": cmd_action, "resume": cmd_action, "retry": cmd_action,
    "metrics": cmd_metrics, "log": cmd_log, "watch": cmd_watch,
    "dataset-create": cmd_dataset_create, "tokenizer-create": cmd_tokenizer_create,
    "plot": cmd_plot, "compare": cmd_compare,
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    name = Path(sys.argv[0]).name
    p = argparse.ArgumentParser(
        prog=name if name == "nanochat" else "python -m runs.client",
        description="Submit and follow training runs.",
    )
    p.add_argument("--url", default=os.environ.get("NANOCHAT_URL", DEFAULT_URL),
                   help="server (default: $NANOCHAT_URL or %(default)s)")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("NANOCHAT_TOKEN"),
                   help="API token (default: $NANOCHAT_TOKEN)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    commands = p.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="get an API token (password read from stdin)")
    token.add_argument("--username")
    commands.add_parser("programs", help="kinds of runs, their presets and settings")

    submit = commands.add_parser("submit", help="queue a run")
    submit.add_argument("kind")
    submit.add_argument("--preset", default="")
    submit.add_argument("--set", action="append", default=[], type=_pair, metavar="KEY=VALUE",
                        help="override a setting (repeatable)")  # fmt: skip
    submit.add_argument("--dataset", type=int)
    submit.add_argument("--tokenizer", type=int)
    submit.add_argument("--parent", type=int, help="parent checkpoint id")
    submit.add_argument("--nproc", type=int, default=1, help="processes per node")
    submit.add_argument("--name", default="")
    submit.add_argument("--wait", action="store_true", help="watch it until it finishes")

    listing = commands.add_parser("list", help="runs, newest first")
    listing.add_argument("--status")
    listing.add_argument("--kind")
    listing.add_argument("--mine", action="store_true")

    for name, text in [("show", "a run's details"), ("cancel", "cancel a run"),
                       ("resume", "resume a failed or cancelled run"),
                       ("retry", "run it again from scratch"),
                       ("watch", "follow a run until it finishes")]:  # fmt: skip
        commands.add_parser(name, help=text).add_argument("id", type=int)

    metrics = commands.add_parser("metrics", help="a run's metric series")
    metrics.add_argument("id", type=int)
    metrics.add_argument("--names", help="comma-separated (default: all)")
    metrics.add_argument("--max-points", type=int)

    log = commands.add_parser("log", help="the end of a run's log")
    log.add_argument("id", type=int)
    log.add_argument("--lines", type=int)

    dataset = commands.add_parser("dataset-create", help="build a dataset")
    dataset.add_argument("name")
    dataset.add_argument("--source", required=True,
                         help="builtin, download, upload (with --file) or path (with --path)")  # fmt: skip
    dataset.add_argument("--option", action="append", default=[], type=_pair,
                         metavar="KEY=VALUE")  # fmt: skip
    dataset.add_argument("--file", action="append", default=[], help="file to upload")
    dataset.add_argument("--path", help="directory of shards on the server")

    tokenizer = commands.add_parser("tokenizer-create", help="train a tokenizer")
    tokenizer.add_argument("name")
    tokenizer.add_argument("--dataset", type=int, required=True)
    tokenizer.add_argument("--set", action="append", default=[], type=_pair, metavar="KEY=VALUE")

    plot = commands.add_parser("plot", help="draw a run's metric curves into an image file")
    plot.add_argument("id", type=int)
    compare = commands.add_parser(
        "compare", help="overlay runs' curves; print their final metrics and config diff"
    )
    compare.add_argument("ids", type=int, nargs="+", metavar="id")
    for sub, default in ((plot, "metrics.png"), (compare, "compare.png")):
        sub.add_argument("--metrics", type=_metric_names, required=True,
                         help=f"comma-separated, at most {MAX_PLOT_METRICS}")  # fmt: skip
        sub.add_argument("--out", default=default,
                         help="image file to write, format from its suffix (default %(default)s)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, Client(args.url, args.token))
    except ApiError as exc:
        for line in exc.messages():
            print(line, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Whatever is left in stdout's buffer can never be written: point stdout at /dev/null
        # so the interpreter's flush at exit does not report the broken pipe either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # an unreadable --file
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
