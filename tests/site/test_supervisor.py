"""The process supervisor behind `manage.py up`, on small shell children."""

import io
import signal
import time

import psutil
import pytest

from nanochat_site.supervisor import ChildFailed, ChildSpec, Supervisor, describe_exit


def sh(name: str, script: str, **kw) -> ChildSpec:
    return ChildSpec(name, ["sh", "-c", script], **kw)


def test_describe_exit():
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_output_is_prefixed_with_the_child_name():
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2)
    child = sup.start(sh("echoer", "echo hello; echo world"))
    child.process.wait(timeout=10)
    sup.stop_all()
    lines = out.getvalue().splitlines()
    assert any(line.endswith("| hello") and line.startswith("echoer") for line in lines)
    assert list(child.tail) == ["hello", "world"]


def test_watch_returns_the_child_that_died():
    sup = Supervisor(out=io.StringIO(), grace=2)
    sup.start(sh("sleeper", "sleep 30"))
    quitter = sup.start(sh("quitter", "sleep 0.3; exit 7"))
    try:
        died = sup.watch(poll=0.05)
        assert died is quitter
        assert describe_exit(died.process.returncode) == "exited with code 7"
    finally:
        sup.stop_all()


def test_stop_kills_children_that_ignore_sigterm_and_their_whole_tree():
    sup = Supervisor(out=io.StringIO(), grace=0.5)
    # A child that ignores SIGTERM and has started a grandchild in a session of its own
    # (the way a training task starts torchrun): both must be gone after stop_all().
    stubborn = sup.start(sh("stubborn", "trap '' TERM; setsid sleep 60 & sleep 60 & wait"))
    time.sleep(0.5)
    tree = [psutil.Process(stubborn.pid), *psutil.Process(stubborn.pid).children(recursive=True)]
    assert len(tree) >= 3
    started = time.monotonic()
    sup.stop_all()
    assert time.monotonic() - started < 8
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []


def test_stop_last_children_outlive_the_others():
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2)
    sup.start(sh("broker", "trap 'echo broker-bye; exit 0' TERM; sleep 60 & wait", stop_last=True))
    sup.start(sh("worker", "trap 'echo worker-bye; exit 0' TERM; sleep 60 & wait"))
    time.sleep(0.3)
    sup.stop_all()
    lines = out.getvalue().splitlines()
    assert lines.index("worker | worker-bye") < lines.index("broker | broker-bye")


def test_wait_until_fails_fast_when_the_child_dies():
    sup = Supervisor(out=io.StringIO(), grace=1)
    child = sup.start(sh("crasher", "echo boom; exit 2"))
    try:
        with pytest.raises(ChildFailed, match=r"crasher \(pid \d+\) exited with code 2 before"):
            sup.wait_until(child, lambda: False, timeout=20, what="ready")
    finally:
        sup.stop_all()


def test_wait_until_times_out_with_a_clear_message():
    sup = Supervisor(out=io.StringIO(), grace=1)
    child = sup.start(sh("slow", "sleep 30"))
    try:
        with pytest.raises(ChildFailed, match="slow .* is still running did not become ready"):
            sup.wait_until(child, lambda: False, timeout=0.5, what="ready")
    finally:
        sup.stop_all()
