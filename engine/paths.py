"""Where artifacts live by default: one data home for datasets, tokenizers and checkpoints.

Programs always accept explicit paths; these defaults only serve shell use. The web app reads
the same variable, so a shell run and the site agree on where things are.
"""

import os
from pathlib import Path


def data_home() -> Path:
    """`NANOCHAT_HOME` (or nanochat's `NANOCHAT_BASE_DIR`), else `~/.cache/nanochat`."""
    raw = os.environ.get("NANOCHAT_HOME") or os.environ.get("NANOCHAT_BASE_DIR")
    home = Path(raw).expanduser() if raw else Path.home() / ".cache" / "nanochat"
    return home.resolve()
