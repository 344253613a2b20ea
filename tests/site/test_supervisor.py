"""The process supervisor behind `manage.py up`, on small shell children: output, restarts
with backoff, crash loops, and stopping whole process trees."""

import io
import signal
import threading
import time

import psutil
import pytest

from nanochat_site.supervisor import (
    ChildFailed,
    ChildSpec,
    RestartPolicy,
    Supervisor,
    describe_exit,
)


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


def test_quiet_output_goes_to_log_files_and_deaths_to_the_console(tmp_path):
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2, log_dir=tmp_path, verbose=False)
    child = sup.start(sh("banner", "echo a very long banner; exit 3"))
    child.process.wait(timeout=10)
    stop_when(sup, lambda: "restarting" in out.getvalue(), timeout=10)
    sup.supervise(RestartPolicy(backoff_initial=5))
    sup.stop_all()
    console = out.getvalue()
    assert "a very long banner" not in console and "started" not in console
    assert "exited with code 3; restarting in 5 s" in console
    assert "a very long banner" in (tmp_path / "banner.log").read_text()
    assert "started banner (pid" in (tmp_path / "up.log").read_text()


def stop_when(sup: Supervisor, condition, timeout: float = 30) -> threading.Thread:
    """Request a stop once `condition()` holds (or after `timeout`), from a watcher thread."""

    def watch():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        sup.request_stop("test done")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_backoff_doubles_up_to_its_maximum():
    policy = RestartPolicy(backoff_initial=1, backoff_max=30)
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_child_that_dies_is_restarted_and_the_event_is_one_line(tmp_path):
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2)
    mark = tmp_path / "ran-once"
    flaky = sup.start(
        sh("flaky", f"if [ -e {mark} ]; then echo second; sleep 30; else touch {mark}; exit 3; fi")
    )
    first_pid = flaky.pid
    try:
        stop_when(sup, lambda: "second" in flaky.tail)
        assert sup.supervise(RestartPolicy(backoff_initial=0.1), poll=0.02) is None
    finally:
        sup.stop_all()
    text = out.getvalue()
    assert f"flaky (pid {first_pid}) exited with code 3; restarting in 0.1 s (restart 1)" in text
    assert f"restarted flaky (pid {flaky.pid})" in text and flaky.pid != first_pid
    assert "second" in flaky.tail


def test_what_a_dead_child_left_in_its_session_is_killed_before_the_restart():
    sup = Supervisor(out=io.StringIO(), grace=2)
    # Like a Celery main process killed under its pool: the grandchild outlives its parent.
    parent = sup.start(sh("parent", "sleep 60 & echo $!; exit 5"))
    try:
        deadline = time.monotonic() + 20
        while not parent.tail and time.monotonic() < deadline:
            time.sleep(0.02)
        grandchild = psutil.Process(int(parent.tail[0]))
        stop_when(sup, lambda: parent.restarts >= 1)
        sup.supervise(RestartPolicy(backoff_initial=30), poll=0.02)
        gone, alive = psutil.wait_procs([grandchild], timeout=5)
        assert alive == []
    finally:
        sup.stop_all()


def test_a_crash_loop_of_an_essential_child_is_reported_and_stops_supervising():
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2)
    sleeper = sup.start(sh("sleeper", "sleep 30"))
    crasher = sup.start(sh("crasher", "echo boom; exit 1", essential=True))
    policy = RestartPolicy(backoff_initial=0.01, max_restarts=3, window=60)
    try:
        stop_when(sup, lambda: False, timeout=60)  # a safety net only
        assert sup.supervise(policy, poll=0.02) is crasher
        assert sleeper.process.poll() is None  # the caller decides what to stop
    finally:
        sup.stop_all()
    text = out.getvalue()
    assert text.count("restarted crasher") == 3
    assert (
        "exited with code 1: 4 deaths within 60 s, a crash loop; not restarting it again "
        "(stopping everything)" in text
    )
    assert "last lines from crasher:" in text and "    boom" in text


def test_a_crash_loop_of_another_child_leaves_the_rest_running():
    out = io.StringIO()
    sup = Supervisor(out=out, grace=2)
    sleeper = sup.start(sh("sleeper", "sleep 30"))
    crasher = sup.start(sh("crasher", "exit 1"))
    policy = RestartPolicy(backoff_initial=0.01, max_restarts=0)
    try:
        stop_when(sup, lambda: crasher.given_up)
        assert sup.supervise(policy, poll=0.02) is None
        assert crasher.given_up and sleeper.process.poll() is None
    finally:
        sup.stop_all()
    assert "crash loop; not restarting it again (the rest keeps running)" in out.getvalue()
    assert "restarted crasher" not in out.getvalue()


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
