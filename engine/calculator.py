"""The calculator tool: what a model's `<|python_start|> expr <|python_end|>` evaluates to.

SPEC §9 allows two kinds of expression, and everything else yields no output (None):

* Pure arithmetic -- digits, `+ - * / . ( )` and spaces, `**` banned. It is parsed with `ast`
  and folded in this process by a walker that knows only numbers, `+ - * / //` and unary signs,
  so it needs no sandbox: with powers banned and the input capped at 1000 characters, no
  integer can grow past about 1000 digits, and the fold takes microseconds.
* A string expression containing `.count(` (letter counting: `'strawberry'.count('r')`). Its
  syntax tree may hold only string/int constants, slices, negative signs and calls of public
  `str` method names on such values -- no names, operators, comprehensions, lambdas or dunder
  attributes -- and its text must avoid a deny list. Even so `'a'.zfill(10**9)`-style methods can
  ask for gigabytes, so it is evaluated with empty builtins in a separate, persistent worker
  interpreter that has a 256 MiB address-space limit and is killed (and replaced on the next
  call) when a reply takes longer than 3 s. A killable process is the only limit that holds for
  C code that never checks for signals, and `signal.alarm` only works on the main thread, while
  the engine calls this from its decode loop on any thread.

Results: integers print as integers; a float prints as an integer when it is integral and exactly
representable (|x| < 2**53), so "48/2" gives "24" like the GSM8K tool calls models are trained
on, and otherwise as Python's shortest repr ("7/2" -> "3.5"). Infinite or NaN results, results
longer than 1000 characters and any error (syntax, division by zero, overflow, timeout,
memory) give None. Measured on the 2-core dev box: arithmetic 10-20 us per call, a string
expression 65-100 us once the worker runs; starting the worker costs 20-50 ms, once.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import operator
import os
import select
import subprocess
import sys
import threading
import time

MAX_EXPRESSION_CHARS = 1000
MAX_RESULT_CHARS = 1000
EVAL_TIMEOUT_S = 3.0
# Enough for the interpreter (~15 MiB) and any honest string; a bomb hits MemoryError instead
# of taking the engine machine's memory.
WORKER_MEMORY_BYTES = 256 * 1024 * 1024

_ARITHMETIC_CHARS = frozenset("0123456789+-*/.() ")
_BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Floats beyond this are no longer spaced one apart, so printing them as integers would invent
# digits.
_EXACT_FLOAT_INTEGERS = 2**53

# Checked on the lower-cased text as a second line behind the syntax-tree allowlist.
_DENIED_SUBSTRINGS = (
    "__",
    "import",
    "exec",
    "eval",
    "compile",
    "open",
    "getattr",
    "setattr",
    "delattr",
    "hasattr",
    "globals",
    "locals",
    "vars",
    "lambda",
    "builtins",
    "breakpoint",
    "input",
    "format",
    "subclasses",
    "mro",
)
# `format` and `format_map` are excluded because a format spec can reach attributes of its
# arguments ("{0.real}"); every other public str method only computes on its own data.
_STRING_METHODS = frozenset(
    name for name in dir(str) if not name.startswith("_") and not name.startswith("format")
)
_STRING_NODES = (ast.Expression, ast.Call, ast.Attribute, ast.Subscript, ast.Slice, ast.Load)

# The worker reads one JSON-encoded expression per line and answers one JSON line: the result
# text, or null for any failure. argv: address-space limit in bytes, longest result.
_WORKER_SOURCE = """
import json, resource, sys
limit, longest = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for line in sys.stdin.buffer:
    try:
        text = str(eval(json.loads(line), {"__builtins__": {}}, {}))
        reply = text if len(text) <= longest else None
    except Exception:
        reply = None
    sys.stdout.write(json.dumps(reply) + "\\n")
    sys.stdout.flush()
"""


def evaluate_expression(expr: str) -> str | None:
    """The calculator's output for `expr`, or None when it is not allowed or fails.

    Thread-safe; returns within about `EVAL_TIMEOUT_S` seconds whatever the input.
    """
    if not isinstance(expr, str):
        raise TypeError(f"expr must be a str, got {type(expr).__name__}")
    deadline = time.monotonic() + EVAL_TIMEOUT_S
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    text = expr.replace(",", "").strip()
    if not text:
        return None
    if set(text) <= _ARITHMETIC_CHARS:
        result = _evaluate_arithmetic(text)
    elif _is_allowed_string_expression(text):
        result = _WORKER.evaluate(text, deadline)
    else:
        return None
    if result is None or len(result) > MAX_RESULT_CHARS:
        return None
    return result


def _evaluate_arithmetic(text: str) -> str | None:
    if "**" in text:
        return None
    try:
        value = _fold(ast.parse(text, mode="eval").body)
    except (SyntaxError, ArithmeticError, ValueError, RecursionError, MemoryError):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer() and abs(value) < _EXACT_FLOAT_INTEGERS:
            return str(int(value))
        return repr(value)
    return str(value)


def _fold(root: ast.expr) -> int | float:
    """Evaluate a numbers-and-operators tree without recursion (a 1000-character input can nest
    hundreds of levels deep); any other node raises ValueError."""
    values: list[int | float] = []
    pending: list[tuple[ast.expr, bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            values.append(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
            if children_done:
                right = values.pop()
                left = values.pop()
                values.append(_BINARY_OPERATORS[type(node.op)](left, right))
            else:
                pending += [(node, True), (node.right, False), (node.left, False)]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
            if children_done:
                values.append(_UNARY_OPERATORS[type(node.op)](values.pop()))
            else:
                pending += [(node, True), (node.operand, False)]
        else:
            raise ValueError(f"not arithmetic: {type(node).__name__}")
    return values[0]


def _is_allowed_string_expression(text: str) -> bool:
    if ".count(" not in text:
        return False
    lowered = text.lower()
    if any(denied in lowered for denied in _DENIED_SUBSTRINGS):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            allowed = node.attr in _STRING_METHODS
        elif isinstance(node, ast.Call):
            allowed = isinstance(node.func, ast.Attribute) and not node.keywords
        elif isinstance(node, ast.Constant):
            allowed = type(node.value) in (str, int)
        elif isinstance(node, ast.UnaryOp):
            allowed = isinstance(node.op, ast.USub)
        else:
            allowed = isinstance(node, (*_STRING_NODES, ast.USub))
        if not allowed:
            return False
    return True


class _EvaluationWorker:
    """A long-lived child interpreter for vetted string expressions, one request at a time.

    Reusing one process keeps a call at a pipe round trip instead of an interpreter start;
    a request that misses its deadline gets the process killed, and the next call starts a new
    one. The lock is taken with the caller's deadline, so a caller queued behind a runaway
    expression also gives up in time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = b""

    def evaluate(self, text: str, deadline: float) -> str | None:
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return None
        try:
            reply = self._request(text, deadline)
        finally:
            self._lock.release()
        return reply if isinstance(reply, str) else None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's worker (it is not ours to stop) and its lock."""
        self._lock = threading.Lock()
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
        self._process = None
        self._pending = b""

    def _request(self, text: str, deadline: float) -> object:
        try:
            process = self._ensure_started()
            assert process.stdin is not None
            process.stdin.write(json.dumps(text).encode() + b"\n")
            process.stdin.flush()
            line = self._read_line(process, deadline)
            if line is None:
                self._stop()
                return None
            return json.loads(line)
        except (OSError, ValueError):
            self._stop()
            return None

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._stop()
            # -I: ignore PYTHON* variables and user site; -S: no site-packages, faster start.
            # A new session keeps a terminal's Ctrl-C off it; it exits on its own at stdin EOF.
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _WORKER_SOURCE,
                    str(WORKER_MEMORY_BYTES),
                    str(MAX_RESULT_CHARS),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
                start_new_session=True,
            )
        return self._process

    def _read_line(self, process: subprocess.Popen[bytes], deadline: float) -> bytes | None:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        # poll, not select: select fails on descriptors above 1024, common in a busy server.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._pending:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0 or not poller.poll(remaining_ms):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def _stop(self) -> None:
        process, self._process = self._process, None
        self._pending = b""
        if process is None:
            return
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


_WORKER = _EvaluationWorker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER.forget_after_fork)
