"""Reading configuration from the environment.

Kept free of Django so that settings, management commands and tests share one reading of
each variable (and so that a typo such as DEBUG=flase fails loudly instead of meaning False).
"""

import os
import secrets
from pathlib import Path

from engine import paths

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def flag(name: str, default: bool) -> bool:
    """A boolean variable; anything but a recognised true/false word is an error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off")


def csv(name: str, default: str) -> list[str]:
    """A comma-separated list variable, blanks dropped."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def data_home() -> Path:
    """Where datasets, tokenizers, checkpoints, run dirs and the embedded services live.

    One definition shared with the training programs, so the site and a shell agree.
    """
    return paths.data_home()


def secret_key(home: Path) -> str:
    """SECRET_KEY from the environment, else one generated once and kept in the data home.

    Keeping it on disk means logins survive restarts without anyone having to invent a key,
    and no key ever lives in the repository.
    """
    from_env = os.environ.get("SECRET_KEY")
    if from_env:
        return from_env
    path = home / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(50)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    try:
        # Two processes starting at once: the first link wins and both read the same key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()
