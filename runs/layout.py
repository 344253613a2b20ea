"""Where the web app keeps what it writes: one fixed layout under the data home, keyed by ids.

Every directory the app creates is named here from a database id, never from something a user
typed: a user string that became a path could be `.`, `..` or `a/../../b`, and building or
deleting "a dataset" would then mean building into or deleting some other user's files. Names
are display values only. Deleting goes through `removable`, which refuses anything that is not
below the data home, is the data home or one of its top-level folders, or is not one of the
directories the row owns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

TOP_LEVEL = ("datasets", "tokenizers", "runs", "imports", "tmp")


def data_home() -> Path:
    return Path(settings.NANOCHAT_HOME)


def run_dir(run_id: int) -> Path:
    return data_home() / "runs" / f"run-{run_id:06d}"


def dataset_dir(dataset_id: int) -> Path:
    return data_home() / "datasets" / f"dataset-{dataset_id:06d}"


def tokenizer_dir(tokenizer_id: int) -> Path:
    return data_home() / "tokenizers" / f"tokenizer-{tokenizer_id:06d}"


def import_dir(checkpoint_id: int) -> Path:
    """Where an imported checkpoint (manage.py import_checkpoint) lives."""
    return data_home() / "imports" / f"checkpoint-{checkpoint_id:06d}"


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path` resolves to somewhere strictly below `root` (symlinks followed)."""
    return Path(root).resolve() in Path(path).resolve().parents


def protected(path: str | Path) -> bool:
    """The data home itself, one of its top-level folders, or anywhere outside it."""
    home = data_home().resolve()
    target = Path(path).resolve()
    return target == home or home not in target.parents or target.parent == home


def removable(
    path: str | Path, *, exact: Iterable[Path] = (), within: Iterable[Path] = ()
) -> Path | None:
    """The resolved `path` if a row may delete it, else None.

    It must not be `protected`, and must be one of the row's own directories (`exact`) or lie
    strictly below one (`within`, e.g. the run directory of the run that built it).
    """
    if not path or protected(path):
        return None
    target = Path(path).resolve()
    if any(target == Path(own).resolve() for own in exact):
        return target
    if any(inside(target, root) for root in within):
        return target
    return None


def legacy_dir(folder: str, name: str) -> Path:
    """Where rows made before migration 0003 were built: `<folder>/<their name>`.

    Only ever compared with a row's recorded path (`removable`), never created; a name such
    as `.` resolves to the top-level folder itself, which `protected` refuses.
    """
    return data_home() / folder / name
