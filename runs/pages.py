"""Dashboard pages: home, runs (list, new, detail, compare), datasets, tokenizers, checkpoints,
the eval leaderboard and reports.

Server-rendered and thin: reads come from runs.selectors / runs.series, writes go through
runs.services (the same functions the REST API calls), and live changes reach the pages over
the `/ws/runs/` websockets, where a little JS redraws charts and refetches panels.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from nanochat_site import limits
from runs import artifacts, exports, lineage, probes, scaling, selectors, series, services
from runs.follow import LOG_FILE, log_tail
from runs.forms import DatasetForm, ProbePromptsForm, RunForm, RunNotesForm
from runs.model_export import ExportUnavailable, can_download, download_response
from runs.models import Checkpoint, Dataset, Kind, Run, Status, Tokenizer
from runs.predictions import memory_prediction
from runs.programs import PROGRAMS
from runs.wandb_info import wandb_info
from training.flags import ConfigError

RUNS_PER_PAGE = 50
LOG_LINES = 200
CHART_POINTS = 1000
DEFAULT_CHARTS = (
    "train/loss", "val/bpb", "train/lr_mult", "train/tok_per_sec", "train/mfu",
    "train/grad_norm", "moe/aux_loss",
)  # fmt: skip
# Charts of several metrics, one line each: (title, the members' common prefix + a number).
CHART_GROUPS = (
    # A MoE router's balance per layer: 1.0 = every expert equally loaded, E = all on one.
    ("Expert load (max/mean per layer)", "moe/load_max/l"),
)


def _text_filter(request, name: str) -> str:
    """A text filter from the query string; one no database can hold (a NUL) is ignored and
    the page says so, rather than failing in the database driver."""
    try:
        return limits.query_text(request.GET, name)
    except limits.QueryParamError as exc:
        _ignored(request, exc)
        return ""


def _ignored(request, exc: limits.QueryParamError) -> None:
    messages.warning(request, f"Ignored the {exc.field} filter: it {exc.message}.")


def submittable_kinds() -> list[str]:
    return [kind for kind, p in PROGRAMS.items() if p.submit_via == "/api/runs/"]


# ---- home ----------------------------------------------------------------------------------


@login_required
@require_GET
def home(request):
    active = selectors.attach_families(selectors.active_runs())
    context = {
        "running": [r for r in active if r.status == Status.RUNNING],
        "queued": [r for r in active if r.status == Status.QUEUED],
        "checkpoints": selectors.chat_checkpoints(),
        "highlights": selectors.eval_highlights(),
        "columns": list(selectors.LEADERBOARD_COLUMNS),
        "recent": selectors.attach_families(selectors.recent_finished_runs(8)),
        "empty": not Run.objects.exists(),
        "kinds": submittable_kinds(),
        "quickstart_available": "pipeline" in PROGRAMS,
    }
    return render(request, "runs/home.html", context)


@login_required
@require_POST
def quick_start(request):
    """Start the demo pipeline; its page opens the chat when the fine-tuned model is ready."""
    try:
        run = services.quick_start(request.user)
    except ConfigError as exc:
        messages.error(request, str(exc))
        return redirect("home")
    messages.success(request, "The demo pipeline is running: each stage appears below.")
    return redirect(reverse("run-detail", args=[run.pk]) + "?then=chat")


# ---- runs ----------------------------------------------------------------------------------


@login_required
@require_GET
def run_list(request):
    params = {k: _text_filter(request, k) for k in ("kind", "status", "owner", "search", "tag")}
    params["mine"] = request.GET.get("mine") == "1"
    runs = selectors.filter_runs(selectors.run_list(), params, request.user)
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    page.object_list = selectors.attach_families(page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "page": page,
        "params": params,
        "query": query.urlencode(),
        "kinds": Kind.choices,
        "statuses": Status.choices,
        "new_kinds": submittable_kinds(),
    }
    return render(request, "runs/run_list.html", context)


@login_required
def run_new(request, kind: str):
    program = PROGRAMS.get(kind)
    if program is None or program.submit_via != "/api/runs/":
        raise Http404(f"no run kind {kind!r} can be started here")
    memory = None
    if request.method == "POST":
        form = RunForm(program, request.POST)
        status = 400
        if form.is_valid() and "preview" in request.POST:  # "Check memory": nothing is queued
            memory = form.memory()
            status = 200 if form.is_valid() else 400
        elif form.is_valid():
            run = form.submit(request.user)
            if run is not None:
                messages.success(request, f"Run {run.pk} queued.")
                return redirect("run-detail", run_id=run.pk)
    else:
        initial = {k: v for k, v in request.GET.items() if k in RunForm(program).fields}
        form = RunForm(program, initial=initial)
        status = 200
        memory = _preset_memory(program, initial.get("preset", ""))
    presets = {name: program.flags.load_config_file(name) for name in program.flags.presets()}
    context = {"form": form, "program": program, "kinds": submittable_kinds(), "presets": presets,
               "memory": memory}  # fmt: skip
    return render(request, "runs/run_new.html", context, status=status)


def _preset_memory(program, preset: str) -> dict | None:
    """What a preset (or the defaults) would need per GPU, before anything is filled in."""
    try:
        config = program.validate(preset, {})
    except ConfigError:
        return None
    return memory_prediction(program.kind, config)


def _run_context(request, run: Run) -> dict:
    """What the run page's panels show (also refetched alone as they change)."""
    program = PROGRAMS.get(run.kind)
    selectors.attach_families([run])
    is_pipeline = run.kind == Kind.PIPELINE
    return {
        "run": run,
        "can_manage": services.can_manage(request.user, run),
        "resumable": bool(program and program.resumable),
        # A pipeline shows what its stages made, each row naming its stage.
        "is_pipeline": is_pipeline,
        "checkpoints": selectors.run_checkpoints(run).order_by("run_id", "-step"),
        "eval_results": selectors.run_eval_results(run).order_by("run_id", "task", "metric"),
        "best_stage": selectors.best_bpb_stage(run) if is_pipeline else None,
        "samples": selectors.samples_by_step(run),
        "reports": run.reports.all(),
        "config": sorted(run.config.items()),
        "optimizer_groups": selectors.optimizer_groups(run),
        "follow_up": {k: k in PROGRAMS for k in ("sft", "mid", "rl", "base_eval", "chat_eval")},
        "stage_runs": run.stage_runs.order_by("id"),
        "probes": probes.timeline(run),
        "chat_checkpoint": chat_checkpoint_of(run),
        "memory": memory_prediction(
            run.kind,
            run.config or {},
            tokenizer=run.tokenizer,
            parent_checkpoint=run.parent_checkpoint,
            nproc_per_node=run.nproc_per_node,
        ),  # fmt: skip
    }


def chat_checkpoint_of(run: Run) -> Checkpoint | None:
    """The checkpoint to chat with after this run: its own latest chat-stage one, or for a
    pipeline its stages' (RL before SFT before mid)."""
    found = selectors.run_checkpoints(run).filter(stage__in=["rl", "sft", "mid"])
    return min(found.order_by("-step", "-id"), key=lambda c: selectors.STAGE_ORDER[c.stage],
               default=None)  # fmt: skip


def chart_groups(names: list[str]) -> tuple[list[dict], list[str]]:
    """[{title, prefix, names}] per CHART_GROUPS entry (its members by number: layer 0, 1, …,
    10), and the names charted alone (those of no group)."""
    groups, grouped = [], set()
    for title, prefix in CHART_GROUPS:
        members = [n for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()]
        members.sort(key=lambda n: int(n[len(prefix) :]))
        groups.append({"title": title, "prefix": prefix, "names": members})
        grouped.update(members)
    return groups, [n for n in names if n not in grouped]


@login_required
@require_GET
def run_detail(request, run_id: int):
    run = get_object_or_404(selectors.run_list(), pk=run_id)
    context = _run_context(request, run)
    if request.GET.get("panels") == "1":
        # What the page refetches when a checkpoint, sample, eval or report arrives.
        return render(request, "runs/_run_panels.html", context)
    names = series.metric_names(run.pk)
    groups, single = chart_groups(names)
    context["metric_names"] = single
    context["chart_groups"] = [g for g in groups if g["names"]]
    context["default_charts"] = [n for n in DEFAULT_CHARTS if n in single] or single[:4]
    context["default_charts"] += [g["title"] for g in context["chart_groups"]]
    context["chart_config"] = {
        "run": run.pk,
        "names": names,
        "groups": groups,
        "shown": context["default_charts"],
        "metrics_url": reverse("runs-api:run-metrics", args=[run.pk]),
        "log_url": reverse("run-log", args=[run.pk]),
        "panels_url": reverse("run-detail", args=[run.pk]) + "?panels=1",
        "socket": f"/ws/runs/{run.pk}/",
        "max_points": CHART_POINTS,
        "active": run.is_active,
    }
    context["log"] = log_tail(Path(run.run_dir) / LOG_FILE, LOG_LINES) if run.run_dir else ""
    context["wandb"] = wandb_info(run)
    context["open_chat"] = request.GET.get("then") == "chat"
    if run.kind in probes.KINDS and context["can_manage"]:
        text = "\n".join(run.probe_prompts)
        context["probe_form"] = ProbePromptsForm(initial={"probe_prompts": text})
    if context["can_manage"]:
        tags = ", ".join(tag.name for tag in run.tags.all())
        context["notes_form"] = RunNotesForm(initial={"tags": tags, "note": run.note})
    return render(request, "runs/run_detail.html", context)


@login_required
@require_GET
def run_log(request, run_id: int):
    """The log tail as plain text (polled by the run page while the run is active)."""
    run = get_object_or_404(Run, pk=run_id)
    text = log_tail(Path(run.run_dir) / LOG_FILE, LOG_LINES) if run.run_dir else ""
    return HttpResponse(text, content_type="text/plain; charset=utf-8")


ACTIONS = {
    "cancel": (services.cancel_run, "Cancel requested for run {id}."),
    "resume": (services.resume_run, "Run {id} resumes from its last checkpoint."),
    "retry": (services.retry_run, "Run {id} queued again."),
}


@login_required
@require_POST
def run_action(request, run_id: int, action: str):
    run = get_object_or_404(Run, pk=run_id)
    try:
        if action == "delete":
            services.delete_run(run, request.user)
            messages.success(request, f"Run {run_id} deleted.")
            return redirect("run-list")
        if action not in ACTIONS:
            raise Http404(f"unknown action {action!r}")
        service, done = ACTIONS[action]
        result = service(run, request.user)
        messages.success(request, done.format(id=result.pk))
        return redirect("run-detail", run_id=result.pk)
    except (services.PermissionDenied, services.Conflict, ConfigError) as exc:
        messages.error(request, str(exc))
        return redirect("run-detail", run_id=run_id)


@login_required
@require_POST
def run_probes(request, run_id: int):
    """The owner sets the run's probe prompts (one per line) from its page."""
    run = get_object_or_404(Run, pk=run_id)
    form = ProbePromptsForm(request.POST)
    try:
        if not form.is_valid():
            raise ConfigError({"probe_prompts": "; ".join(form.errors.get("probe_prompts", []))})
        services.set_probe_prompts(run, request.user, form.cleaned_data["probe_prompts"])
        messages.success(request, "Probe prompts saved: the next checkpoints answer them.")
    except (services.PermissionDenied, ConfigError) as exc:
        messages.error(request, str(exc))
    return redirect(reverse("run-detail", args=[run_id]) + "#probes-panel")


@login_required
@require_POST
def run_notes(request, run_id: int):
    """The owner changes the run's tags and note from its page (the API's PATCH does the same
    through the same service)."""
    run = get_object_or_404(Run, pk=run_id)
    form = RunNotesForm(request.POST)
    try:
        if not form.is_valid():
            raise ConfigError({k: "; ".join(v) for k, v in form.errors.items()})
        data = form.cleaned_data
        services.set_tags_note(run, request.user, tags=data["tags"], note=data["note"])
        messages.success(request, "Tags and note saved.")
    except (services.PermissionDenied, ConfigError) as exc:
        messages.error(request, str(exc))
    return redirect(reverse("run-detail", args=[run_id]) + "#run-notes")


# The compare page's x axes (value: what the picker says).
COMPARE_AXES = {
    "step": "step",
    "tokens": "training tokens",
    "flops": "training FLOPs",
    "elapsed": "time since start",
}
COMPARE_TAGGED_RUNS = 20  # the most runs one ?tag= adds to a comparison
COMPARE_IDS_IN_FILENAME = 10  # more runs: the download is named by their count


@login_required
@require_GET
def compare(request):
    raw = ",".join(request.GET.getlist("ids"))
    ids = []
    for item in filter(str.strip, raw.replace(" ", ",").split(",")):
        try:
            ids.append(limits.to_int(item, "ids", lo=1))
        except limits.QueryParamError as exc:
            _ignored(request, exc)
    # ?tag=x adds the newest runs with that tag: a sweep tagged once is compared in one link.
    tag = _text_filter(request, "tag")
    if tag:
        ids += selectors.runs_tagged(tag, COMPARE_TAGGED_RUNS)
    runs = selectors.attach_families(selectors.runs_by_ids(ids))
    scales = selectors.training_scales(runs)
    names: list[str] = []
    for run in runs:
        names += [n for n in series.metric_names(run.pk) if n not in names]
    chosen = [n for n in request.GET.getlist("metrics") if n in names]
    chosen = chosen or [n for n in ("train/loss", "val/bpb") if n in names] or names[:2]
    finals = selectors.final_metrics(runs, chosen)
    # ?x=flops (or tokens, elapsed) opens the charts on that axis, so a comparison is a link.
    x_axis = request.GET.get("x", "step")
    context = {
        "x_axis": x_axis if x_axis in COMPARE_AXES else "step",
        "tag": tag,
        "axes": COMPARE_AXES,
        "runs": runs,
        "ids": ",".join(str(r.pk) for r in runs),
        "names": names,
        "chosen": chosen,
        "final_rows": [(n, [finals[r.pk][n] for r in runs]) for n in chosen],
        "best_rows": [("best val bpb", [r.best_val_bpb for r in runs])],
        "amount_rows": training_amount_rows(runs, scales),
        "diff": selectors.config_diff(runs),
        "scaling": scaling_context(runs),
        "recent": selectors.run_list().exclude(pk__in=ids)[:30],
        "chart_config": {
            "runs": [
                {
                    "id": r.pk,
                    "label": f"#{r.pk} {r}" + (f" ({r.model_label})" if r.model_label else ""),
                    "tokens_per_step": scales[r.pk].tokens_per_step,
                    "flops_per_step": scales[r.pk].flops_per_step,
                }
                for r in runs
            ],
            "metrics": chosen,
            "metrics_url": reverse("runs-api:run-metrics", args=[0]).replace("/0/", "/{id}/"),
            "max_points": CHART_POINTS,
        },
    }
    if request.GET.get("download") == "csv":
        return compare_csv(context)
    return render(request, "runs/compare.html", context)


def compare_csv(context: dict):
    """The compare page's final metrics and config diff as CSV (?download=csv on the page's
    own query, so the file has the runs and metrics the page shows); named by run ids."""
    ids = [r.pk for r in context["runs"]]
    label = "-".join(map(str, ids)) if len(ids) <= COMPARE_IDS_IN_FILENAME else f"{len(ids)}-runs"
    header, rows = exports.compare_table(context)
    return exports.csv_download(header, rows, f"compare-{label or 'none'}.csv")


def scaling_context(runs) -> dict:
    """The compare page's scaling view: fits per family, each run's residuals, the runs
    missing numbers and the charts' data (static/js/scaling.js draws them)."""
    view = scaling.scaling_view(selectors.scaling_points(runs))
    metrics, axes = dict(scaling.METRICS), dict(scaling.AXES)
    pairs = [(m, a) for m in metrics for a in axes]
    keys = [f"{m}/{a}" for m, a in pairs]
    for fit in view.fits:
        fit.label = f"{metrics[fit.metric]} vs {axes[fit.axis]}"
        fit.family_label = selectors.family_label(fit.family)
    # Residual columns only for the fits that drew a line.
    fitted = [i for i, key in enumerate(keys) if any(key in r for r in view.residuals.values())]
    for point in view.points:
        point.family_label = selectors.family_label(point.family)
        point.residual_cells = [view.residuals[point.run_id].get(keys[i]) for i in fitted]
    return {
        "view": view,
        "residual_columns": [f"{metrics[pairs[i][0]]} vs {axes[pairs[i][1]]}" for i in fitted],
        "charts": scaling.chart_data(view),
    }


def training_amount_rows(runs, scales) -> list[tuple[str, list[str]]]:
    """The compare table's rows of how much each run trained (what the tokens and FLOPs x axes
    multiply the steps by): [(row, [text per run])], '–' where a run did not say."""
    return [
        ("tokens per step", [_count(scales[r.pk].tokens_per_step) for r in runs]),
        ("FLOPs per token", [_flops(scales[r.pk].flops_per_token) for r in runs]),
        ("training tokens", [_count(scales[r.pk].tokens_at(r.step)) for r in runs]),
        ("training FLOPs", [_flops(scales[r.pk].flops_at(r.step)) for r in runs]),
    ]


def _count(value: int | None) -> str:
    """4,091,904; a dash when unknown."""
    return "–" if value is None else f"{value:,}"


def _flops(value: float | None) -> str:
    """4.91e+12; a dash when unknown."""
    return "–" if value is None else f"{value:.3g}"


# ---- artifacts -----------------------------------------------------------------------------


@login_required
def datasets(request):
    form = DatasetForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        dataset = _submit_dataset(form, request.user, request.FILES.getlist("files"))
        if dataset is not None:
            messages.success(request, f"Dataset {dataset.name} is being built.")
            return redirect("datasets")
    rows = artifacts.with_build_run(Dataset.objects.select_related("owner"))
    status = 400 if request.method == "POST" else 200
    return render(request, "runs/datasets.html", {"datasets": rows, "form": form}, status=status)


def _submit_dataset(form: DatasetForm, user, uploads: list) -> Dataset | None:
    """The new dataset, or None with the form's errors set (uploads over UPLOAD_MAX_BYTES are
    refused here, before anything is created for them)."""
    try:
        limits.check_upload_sizes(uploads)
    except ConfigError as exc:
        form.add_service_errors(exc)
        return None
    return form.submit(user, uploads)


@login_required
@require_GET
def tokenizers(request):
    rows = artifacts.with_build_run(Tokenizer.objects.select_related("owner", "dataset"))
    kinds, rows = selectors.compression_table(rows)
    context = {"tokenizers": rows, "text_kinds": kinds, "can_train": "tokenizer" in PROGRAMS}
    return render(request, "runs/tokenizers.html", context)


@login_required
@require_GET
def checkpoints(request):
    rows = Checkpoint.objects.select_related("run", "tokenizer")
    stage = _text_filter(request, "stage")
    if stage:
        rows = rows.filter(stage=stage)
    model = _text_filter(request, "model")
    if model:
        rows = rows.filter(selectors.family_q(model))
    page = Paginator(rows, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    for checkpoint in page.object_list:
        checkpoint.family = selectors.checkpoint_family(checkpoint)
        checkpoint.family_label = selectors.family_label(checkpoint.family)
    context = {"page": page, "stage": stage, "stages": Checkpoint.Stage.choices,
               "model": model, "families": selectors.families()}  # fmt: skip
    return render(request, "runs/checkpoints.html", context)


@login_required
@require_GET
def checkpoint_lineage(request, ckpt_id: int):
    """The lineage ladder of a checkpoint: base → … → it, scores and deltas, and children."""
    checkpoint = get_object_or_404(Checkpoint.objects.select_related("run"), pk=ckpt_id)
    ladder = lineage.lineage(checkpoint)
    rows = [
        {"step": step, "cells": [(t, step.scores.get(t), step.deltas.get(t)) for t in ladder.tasks]}
        for step in ladder.steps
    ]
    family = selectors.checkpoint_family(checkpoint)
    context = {"lineage": ladder, "rows": rows, "family": family,
               "family_label": selectors.family_label(family)}  # fmt: skip
    return render(request, "runs/lineage.html", context)


@login_required
@require_GET
def checkpoint_export(request, ckpt_id: int):
    """The checkpoint as a Hugging Face folder, zipped and streamed (runs/model_export.py)."""
    checkpoint = get_object_or_404(Checkpoint.objects.select_related("run"), pk=ckpt_id)
    if not can_download(request.user, checkpoint):
        raise Http404("no such checkpoint")
    try:
        return download_response(checkpoint)
    except ExportUnavailable as exc:
        if exc.status == 404:
            raise Http404(exc.message) from exc
        return HttpResponse(
            exc.message, status=exc.status, content_type="text/plain; charset=utf-8"
        )


@login_required
@require_GET
def leaderboard(request, ratings: dict | None = None):
    """The eval leaderboard; with `ratings` (arena/views.py serves the page with the arena's,
    from the floor above this one) it has the Arena column too."""
    sort = request.GET.get("sort", "ChatCORE")
    model = _text_filter(request, "model")
    tag = _text_filter(request, "tag")
    rows = selectors.leaderboard(sort, model=model, ratings=ratings, tag=tag)
    columns = [*selectors.LEADERBOARD_COLUMNS]
    if ratings is not None:
        columns.append(selectors.ARENA_COLUMN)
    if request.GET.get("download") == "csv":
        # The same sort and model filter as the page: the file is the table being looked at.
        header, table = exports.leaderboard_table(rows, columns, selectors.ARENA_COLUMN)
        return exports.csv_download(header, table, "leaderboard.csv")
    context = {"rows": rows, "columns": columns, "sort": sort, "tag": tag,
               "model": model, "families": selectors.families()}  # fmt: skip
    return render(request, "runs/leaderboard.html", context)


@login_required
@require_GET
def reports(request):
    runs = selectors.run_list().filter(reports__isnull=False).distinct()
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "runs/reports.html", {"page": page})


@login_required
@require_GET
def report_detail(request, run_id: int):
    run = get_object_or_404(selectors.run_list(), pk=run_id)
    sections = list(run.reports.all())
    if not sections:
        raise Http404("this run has no report yet")
    return render(request, "runs/report_detail.html", {"run": run, "sections": sections})
