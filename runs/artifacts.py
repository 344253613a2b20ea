"""Datasets and tokenizers as objects of their own: who may manage them, how they are deleted.

A dataset or tokenizer is the output of the run that built it, so deleting one goes through
services.delete_run on that run: the run's rules (not while it is active) and its cleanup (rows,
and the directories those rows own: services.artifact_dir) apply unchanged. The checks here
come first because an artifact can also be held by rows that no run of its own knows about (a
tokenizer trained on the dataset, another run reading it), and those must answer 409, not
surface as a database ProtectedError.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import OuterRef, QuerySet, Subquery

from runs import services
from runs.models import Dataset, Kind, Run, Tokenizer
from training import dataset as dataset_program
from training.flags import Flag

# Flags of those commands that the app sets itself (on top of the path flags).
APP_SET_FLAGS = ("overwrite",)


def dataset_source_flags() -> dict[str, list[Flag]]:
    """The options a user may give for each dataset source (what the create form offers)."""
    return {
        source: [
            flag
            for flag in dataset_program.COMMANDS[command].flags
            if not flag.path and flag.name not in APP_SET_FLAGS
        ]
        for source, command in services.DATASET_SOURCES.items()
    }


can_manage = services.can_manage  # the same rule as for runs


def with_build_run(queryset: QuerySet) -> QuerySet:
    """Annotate each dataset or tokenizer with `build_run`, the id of the run that built it."""
    if queryset.model is Dataset:
        runs = Run.objects.filter(kind=Kind.DATASET, dataset=OuterRef("pk"))
    else:
        runs = Run.objects.filter(kind=Kind.TOKENIZER, tokenizer=OuterRef("pk"))
    return queryset.annotate(build_run=Subquery(runs.order_by("created", "id").values("pk")[:1]))


def delete_dataset(dataset: Dataset, user) -> None:
    """Delete a dataset, its build run and (when the app made it) its directory."""
    if not can_manage(user, dataset):
        raise services.PermissionDenied("only the dataset's owner or staff may delete it")
    build = dataset.runs.filter(kind=Kind.DATASET).order_by("created", "id").first()
    users = dataset.runs.exclude(pk=build.pk) if build else dataset.runs.all()
    if users.exists() or dataset.tokenizers.exists():
        raise services.Conflict(
            f"dataset {dataset.name} is used by other runs or tokenizers; delete them first"
        )
    if build is not None:
        services.delete_run(build, user)
        return
    with transaction.atomic():
        services.delete_tree_on_commit(services.artifact_dir(dataset, None))
        dataset.delete()


def delete_tokenizer(tokenizer: Tokenizer, user) -> None:
    """Delete a tokenizer, its build run and its directory."""
    if not can_manage(user, tokenizer):
        raise services.PermissionDenied("only the tokenizer's owner or staff may delete it")
    build = tokenizer.runs.filter(kind=Kind.TOKENIZER).order_by("created", "id").first()
    users = tokenizer.runs.exclude(pk=build.pk) if build else tokenizer.runs.all()
    if users.exists():
        raise services.Conflict(f"tokenizer {tokenizer.name} is used by other runs")
    if build is not None:
        services.delete_run(build, user)
        return
    with transaction.atomic():
        services.delete_tree_on_commit(services.artifact_dir(tokenizer, None))
        tokenizer.delete()
