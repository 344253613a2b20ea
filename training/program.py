"""How every training program ends: an `end` event and an exit code, whatever happened.

The web app decides a run's fate from the `end` event and the exit code, so each program must
record "succeeded", "cancelled" (Ctrl-C, or SIGTERM from the web app's cancel button) or
"failed" with the error, exactly once. Errors of the user's making (bad paths, too little data,
impossible settings: ValueError/OSError) print one clear line and exit 1; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from training.events import EventWriter

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
