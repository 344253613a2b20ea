"""Command-line client of the runs API: `nanochat submit base --preset tiny ...`.

`make run` / `make test` install it as the `nanochat` command of the project's venv (see
pyproject.toml), usable from any directory; `python -m runs.client` is the same program.
Standard library only and no import from the project, so the file also works copied onto a
laptop that has nothing but Python. The server comes from --url or NANOCHAT_URL, the token from
--token or NANOCHAT_TOKEN (get one with `nanochat token`).

Exit status: 0 done, 1 a watched run did not succeed, 2 the server refused the request (its
messages are printed one per line, `field: message`) or could not be reached, 141 the reader of
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


COMMANDS = {
    "token": cmd_token, "programs": cmd_programs, "submit": cmd_submit, "list": cmd_list,
    "show": cmd_show, "cancel": cmd_action, "resume": cmd_action, "retry": cmd_action,
    "metrics": cmd_metrics, "log": cmd_log, "watch": cmd_watch,
    "dataset-create": cmd_dataset_create, "tokenizer-create": cmd_tokenizer_create,
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, Client(args.url, args.token))
    except ApiError as exc:
        for line in exc.messages():
            print(line, file=sys.stderr)
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
