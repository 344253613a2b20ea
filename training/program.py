"""How every training program ends: an `end` event and an exit code, whatever happened.

The web app decides a run's fate from the `end` event and the exit code, so each program must
record "succeeded", "cancelled" (Ctrl-C, or SIGTERM from the web app's cancel button) or
"failed" with the error, exactly once. Errors of the user's making (bad paths, too little data,
impossible settings: ValueError/OSError) print one clear line and exit 1; anything else is a
bug and keeps its traceback.

`program_main` is the whole `main()` of a program that runs on a `Runtime` (every one but the
dataset and tokenizer programs): parse its flags, join the device / torchrun group, open the
event log, run, and leave the process group whatever happened. This module itself must not
import torch: training.dataset uses it too, and importing torch patches `inspect.getfile`,
which would change the pydoc text of the builtin corpus.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from training.events import EventWriter
from training.flags import FlagSet
from training.wandb_sink import sink_for

if TYPE_CHECKING:
    from training.runtime import Runtime

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 130
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def cancel_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C (KeyboardInterrupt), so cancelling a run is recorded as such."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def run_program(
    events: EventWriter,
    body: Callable[[], object],
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> int:
    """Run `body`, write the matching `end` event, return the process exit code."""
    try:
        body()
    except KeyboardInterrupt:
        events.end("cancelled", "interrupted")
        print("cancelled", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except user_errors as exc:
        events.end("failed", f"{type(exc).__name__}: {exc}")
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except BaseException as exc:
        events.end("failed", f"{type(exc).__name__}: {exc}")
        raise
    events.end("succeeded")
    return EXIT_OK


def program_main(
    flags: FlagSet,
    body: Callable[[dict[str, Any], Runtime, EventWriter], object],
    argv: Iterable[str] | None = None,
) -> int:
    """Parse `flags`, start the runtime, run `body(config, runtime, events)`; the exit code.

    The flag set must declare `device`, `dtype`, `seed` (`training.runtime.runtime_flags`) and
    `run_dir` (`training.flags.output_flags`, with the W&B flags). Only rank 0 writes events.
    """
    from training.runtime import init_runtime, shutdown  # torch: see the module docstring

    config = flags.parse(argv)
    runtime = init_runtime(config["device"], config["dtype"], config["seed"])
    code = None
    try:
        # Optional W&B logging of the same events (rank 0, only when a project is named).
        sink = sink_for(config, flags.program) if runtime.master else None
        sinks = [sink] if sink is not None else []
        with EventWriter(config["run_dir"] or None, runtime.rank, sinks) as events:
            code = run_program(events, lambda: body(config, runtime, events))
        return code
    finally:
        shutdown(runtime, together=code == EXIT_OK)
