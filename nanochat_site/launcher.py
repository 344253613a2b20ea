"""Exec a command that dies with its supervisor.

Run as a script (`python nanochat_site/launcher.py PARENT_PID -- argv...`), not as a module,
so starting a child costs no imports. It asks Linux to send SIGTERM to this process when the
supervisor dies (PR_SET_PDEATHSIG survives exec), then becomes the real command. That way
even a supervisor killed with SIGKILL leaves no web server or worker running behind it.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent = int(argv[0])
    if argv[1] != "--" or len(argv) < 3:
        raise SystemExit("usage: launcher.py PARENT_PID -- COMMAND [ARGS...]")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The supervisor may have died before prctl took effect; then nobody would stop us.
    if os.getppid() != parent:
        raise SystemExit(1)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
