"""karpathy's nanochat, imported from a source checkout for the parity tests.

NANOCHAT_SRC names the checkout (the folder holding `nanochat/`); without it those tests skip.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

SOURCE = os.environ.get("NANOCHAT_SRC", "")


def import_fp32(*names: str) -> list[ModuleType]:
    """The named nanochat modules, imported from SOURCE with NANOCHAT_DTYPE=float32 (so they
    compute in fp32 on any machine); the environment and sys.path are restored after."""
    previous = os.environ.get("NANOCHAT_DTYPE")
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, SOURCE)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(SOURCE)
        if previous is None:
            os.environ.pop("NANOCHAT_DTYPE", None)
        else:
            os.environ["NANOCHAT_DTYPE"] = previous
