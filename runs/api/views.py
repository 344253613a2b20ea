"""Views of the runs API: parse the request, call runs.services, serialize the result.

Who may do what is decided by the services (can_manage, retry rules) and runs.artifacts, whose
exceptions become 400/403/409 answers in ServiceErrorsMixin; reading needs only a signed-in
user (the REST_FRAMEWORK default permission).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.response import Response
from rest_framework.views import APIView

from nanochat_site import limits
from runs import artifacts, exports, lineage, model_export, selectors, services
from runs.api import serializers as s
from runs.api.errors import ConflictError, ServiceErrorsMixin
from runs.api.responses import with_errors
from runs.follow import LOG_FILE, log_tail
from runs.models import Checkpoint, Dataset, EvalResult, Report, Run, Tokenizer
from runs.programs import PROGRAMS
from runs.series import metric_names, series


def query(request, serializer_class) -> dict:
    """Validated query parameters; a bad one (NUL in a text, an integer no database column
    holds) is a 400 naming it."""
    params = serializer_class(data=request.query_params)
    params.is_valid(raise_exception=True)
    if errors := limits.out_of_range(params.validated_data):
        raise ValidationError({name: [message] for name, message in errors.items()})
    return params.validated_data


class ServiceUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Busy; try again later."
    default_code = "unavailable"


class JSONErrorsNegotiation(DefaultContentNegotiation):
    """For downloads: the file is the answer whatever the Accept header says, and an error is
    JSON like every other (DRF would answer 406 to `Accept: text/csv`, having no such renderer,
    and read `?format=` as a renderer's name)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def metrics_export_schema(fmt: str, description: str):
    media = exports.METRIC_FORMATS[fmt].split(";")[0]
    return extend_schema(
        parameters=[s.MetricsExportQuerySerializer],
        responses={
            (200, media): OpenApiResponse(OpenApiTypes.STR, description=description),
            **with_errors(400, 404),
        },
    )


class ProgramsView(APIView):
    """Every kind of run: its inputs, presets and the settings a user may change."""

    @extend_schema(responses={200: s.ProgramSerializer(many=True), **with_errors()})
    def get(self, request):
        return Response(s.ProgramSerializer(PROGRAMS.values(), many=True).data)


@extend_schema_view(
    post=extend_schema(
        auth=[],
        responses={
            200: inline_serializer("Token", {"token": serializers.CharField()}),
            **with_errors(400, signed_in=False),
        },
    )
)
class TokenView(ObtainAuthToken):
    """A user's API token for their username and password (400 when they do not match)."""

    parser_classes = APIView.parser_classes  # the site's bounded ones, not DRF's own list


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.RunDetailSerializer, **with_errors(404)})
)
class RunViewSet(
    ServiceErrorsMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Training runs: submit, follow, tag and annotate, cancel, resume, retry, delete."""

    queryset = Run.objects.select_related(
        "owner", "dataset", "tokenizer", "parent_checkpoint"
    ).prefetch_related("tags")

    def get_serializer_class(self):
        return s.RunSummarySerializer if self.action == "list" else s.RunDetailSerializer

    def get_queryset(self):
        runs = super().get_queryset()
        if self.action != "list":
            return runs
        params = query(self.request, s.RunFilterSerializer)
        return selectors.filter_runs(runs, params, self.request.user)

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        return None if page is None else selectors.attach_families(page)

    def _detail(self, run: Run, code: int = status.HTTP_200_OK) -> Response:
        run = self.get_queryset().get(pk=run.pk)
        return Response(s.RunDetailSerializer(run, context={"request": self.request}).data, code)

    @extend_schema(
        parameters=[s.RunFilterSerializer],
        responses={200: s.RunSummarySerializer(many=True), **with_errors(400, 404)},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(
        request=s.RunCreateSerializer, responses={201: s.RunDetailSerializer, **with_errors(400)}
    )
    def create(self, request):
        """Validate and queue a run (datasets: POST /api/datasets/)."""
        params = s.RunCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        run = services.submit_run(request.user, **params.validated_data)
        return self._detail(run, status.HTTP_201_CREATED)

    @extend_schema(
        request=s.RunNotesSerializer,
        responses={200: s.RunDetailSerializer, **with_errors(400, 404)},
    )
    def partial_update(self, request, pk=None):
        """Change the run's tags and/or note (owner or staff; others 403)."""
        params = s.RunNotesSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        run = services.set_tags_note(self.get_object(), request.user, **params.validated_data)
        return self._detail(run)

    @extend_schema(responses={204: None, **with_errors(404, 409)})
    def destroy(self, request, pk=None):
        """Delete a finished run with its rows and directory (owner or staff)."""
        services.delete_run(self.get_object(), request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: s.RunDetailSerializer, **with_errors(404, 409)})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel a queued run at once, or ask its worker to stop a running one."""
        return self._detail(services.cancel_run(self.get_object(), request.user))

    @extend_schema(request=None, responses={200: s.RunDetailSerializer, **with_errors(404, 409)})
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        """Continue a failed or cancelled run from its last checkpoint."""
        return self._detail(services.resume_run(self.get_object(), request.user))

    @extend_schema(request=None, responses={201: s.RunDetailSerializer, **with_errors(404, 409)})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        """Run it again from scratch: a new run (datasets and tokenizers: rebuilt in place)."""
        run = services.retry_run(self.get_object(), request.user)
        return self._detail(run, status.HTTP_201_CREATED)

    @extend_schema(
        parameters=[s.MetricsQuerySerializer],
        responses={200: s.MetricsSerializer, **with_errors(400, 404)},
    )
    @action(detail=True, methods=["get"])
    def metrics(self, request, pk=None):
        """Metric series by name, downsampled to at most max_points (min and max kept)."""
        run = self.get_object()
        params = query(request, s.MetricsQuerySerializer)
        every = metric_names(run.pk)
        names = [n for n in params.get("names", "").split(",") if n] or every
        data = series(run.pk, names, params["max_points"], params.get("after_step"))
        return Response({"run": run.pk, "names": every, "series": data})

    def _metrics_download(self, request, fmt: str):
        run = self.get_object()
        params = query(request, s.MetricsExportQuerySerializer)
        try:
            names = exports.parse_names(params.get("names"), metric_names(run.pk))
        except exports.ExportError as exc:
            raise ValidationError({exc.field: [exc.message]}) from exc
        return exports.metrics_download(run.pk, names, fmt)

    @metrics_export_schema("csv", "columns name, step, value, time; by name, then step")
    @action(detail=True, methods=["get"], url_path="metrics/csv", url_name="metrics-csv",
            content_negotiation_class=JSONErrorsNegotiation)  # fmt: skip
    def metrics_csv(self, request, pk=None):
        """Every point of the run's metrics (or of `names`) as CSV, streamed, not downsampled."""
        return self._metrics_download(request, "csv")

    @metrics_export_schema("jsonl", 'one {"name", "step", "value", "time"} object per line')
    @action(detail=True, methods=["get"], url_path="metrics/jsonl", url_name="metrics-jsonl",
            content_negotiation_class=JSONErrorsNegotiation)  # fmt: skip
    def metrics_jsonl(self, request, pk=None):
        """Every point of the run's metrics (or of `names`) as JSON lines, streamed."""
        return self._metrics_download(request, "jsonl")

    @extend_schema(
        parameters=[s.LogQuerySerializer], responses={200: s.LogSerializer, **with_errors(400, 404)}
    )
    @action(detail=True, methods=["get"])
    def log(self, request, pk=None):
        """The last lines of the run's log file."""
        run = self.get_object()
        params = query(request, s.LogQuerySerializer)
        text = log_tail(Path(run.run_dir) / LOG_FILE, params["lines"]) if run.run_dir else ""
        return Response({"lines": text.splitlines()})

    @extend_schema(
        parameters=[s.EventsQuerySerializer],
        responses={200: s.EventsSerializer, **with_errors(400, 404)},
    )
    @action(detail=True, methods=["get"])
    def events(self, request, pk=None):
        """The run's events in order; pass next_after as `after` to read on."""
        run = self.get_object()
        params = query(request, s.EventsQuerySerializer)
        rows = run.events.filter(seq__gt=params["after"]).order_by("seq")
        if params.get("type"):
            rows = rows.filter(type=params["type"])
        rows = list(rows[: params["limit"]])
        next_after = rows[-1].seq if rows else params["after"]
        events = s.EventSerializer(rows, many=True).data
        return Response({"events": events, "next_after": next_after})

    @extend_schema(responses={200: s.SamplesSerializer, **with_errors(404)})
    @action(detail=True, methods=["get"])
    def samples(self, request, pk=None):
        """Text the model generated during training."""
        run = self.get_object()
        samples = s.SampleSerializer(run.samples.all(), many=True).data
        return Response({"run": run.pk, "samples": samples})

    @extend_schema(responses={200: s.RunReportSerializer, **with_errors(404)})
    @action(detail=True, methods=["get"])
    def report(self, request, pk=None):
        """The run's report: its markdown sections in order, and joined."""
        run = self.get_object()
        sections = list(run.reports.all())
        return Response({
            "run": run.pk,
            "markdown": "\n\n".join(section.markdown for section in sections),
            "sections": s.ReportSerializer(sections, many=True).data,
        })  # fmt: skip


class ArtifactViewSet(
    ServiceErrorsMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Shared by datasets and tokenizers: list, show, create through a build run, delete."""

    create_serializer_class: type
    remove: Callable[..., None]  # artifacts.delete_dataset or delete_tokenizer

    def get_queryset(self):
        return artifacts.with_build_run(super().get_queryset())

    def get_serializer_class(self):
        return self.create_serializer_class if self.action == "create" else self.serializer_class

    def created(self, obj) -> Response:
        obj = self.get_queryset().get(pk=obj.pk)
        data = self.serializer_class(obj, context={"request": self.request}).data
        return Response(data, status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, **with_errors(404, 409)})
    def destroy(self, request, pk=None):
        self.remove(self.get_object(), request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema_view(
    list=extend_schema(responses={200: s.DatasetSerializer(many=True), **with_errors(404)}),
    retrieve=extend_schema(responses={200: s.DatasetSerializer, **with_errors(404)}),
)
class DatasetViewSet(ArtifactViewSet):
    """Datasets: built from the offline corpus, downloaded, uploaded or found on the server."""

    queryset = Dataset.objects.select_related("owner")
    serializer_class = s.DatasetSerializer
    create_serializer_class = s.DatasetCreateSerializer
    remove = staticmethod(artifacts.delete_dataset)

    @extend_schema(
        request={
            "application/json": s.DatasetCreateSerializer,
            "multipart/form-data": s.DatasetCreateSerializer,
        },
        responses={201: s.DatasetSerializer, **with_errors(400)},
    )
    def create(self, request):
        params = s.DatasetCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        limits.check_upload_sizes(data["files"])
        dataset = services.create_dataset(
            request.user, data["name"], data["source"], options=data["options"],
            uploads=data["files"], path=data["path"],
        )  # fmt: skip
        return self.created(dataset)


@extend_schema_view(
    list=extend_schema(responses={200: s.TokenizerSerializer(many=True), **with_errors(404)}),
    retrieve=extend_schema(responses={200: s.TokenizerSerializer, **with_errors(404)}),
)
class TokenizerViewSet(ArtifactViewSet):
    """Tokenizers: trained on a dataset by a tokenizer run."""

    queryset = Tokenizer.objects.select_related("owner", "dataset")
    serializer_class = s.TokenizerSerializer
    create_serializer_class = s.TokenizerCreateSerializer
    remove = staticmethod(artifacts.delete_tokenizer)

    @extend_schema(
        request=s.TokenizerCreateSerializer,
        responses={201: s.TokenizerSerializer, **with_errors(400)},
    )
    def create(self, request):
        params = s.TokenizerCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        run = services.create_tokenizer(
            request.user, data["name"], data.get("dataset"), data["config"]
        )
        return self.created(run.tokenizer)


@extend_schema_view(
    retrieve=extend_schema(responses={200: s.CheckpointSerializer, **with_errors(404)})
)
class CheckpointViewSet(viewsets.ReadOnlyModelViewSet):
    """Saved model weights, one row per saved step."""

    queryset = Checkpoint.objects.select_related("tokenizer", "run")
    serializer_class = s.CheckpointSerializer

    def get_queryset(self):
        checkpoints = super().get_queryset()
        if self.action == "list":
            params = query(self.request, s.CheckpointFilterSerializer)
            if "model" in params:
                checkpoints = checkpoints.filter(selectors.family_q(params.pop("model")))
            checkpoints = checkpoints.filter(**params)
        return checkpoints

    @extend_schema(
        parameters=[s.CheckpointFilterSerializer],
        responses={200: s.CheckpointSerializer(many=True), **with_errors(400, 404)},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: s.LineageSerializer, **with_errors(404)})
    @action(detail=True, methods=["get"])
    def lineage(self, request, pk=None):
        """The checkpoint's chain (base → mid → SFT → RL through each run's parent checkpoint)
        with each step's scores and their change from the step before, and its children."""
        checkpoint = self.get_object()
        return Response(s.LineageSerializer(lineage.lineage(checkpoint)).data)

    @extend_schema(
        responses={
            (200, model_export.ZIP_TYPE): OpenApiResponse(
                OpenApiTypes.BINARY,
                description="a Hugging Face folder, zipped: model.safetensors, config.json, "
                "generation_config.json, the tokenizer, README.md (model card) and, for models "
                "transformers has no class for, their modeling code",
            ),
            **with_errors(404, 409, 503),
        }
    )
    @action(detail=True, methods=["get"], content_negotiation_class=JSONErrorsNegotiation)
    def export(self, request, pk=None):
        """The checkpoint as a Hugging Face folder (AutoModelForCausalLM / AutoTokenizer load
        it), zipped and streamed."""
        checkpoint = self.get_object()
        if not model_export.can_download(request.user, checkpoint):
            raise NotFound("no such checkpoint")
        try:
            return model_export.download_response(checkpoint)
        except model_export.ExportUnavailable as exc:
            if exc.status == 404:
                raise NotFound(exc.message) from exc
            if exc.status == 409:
                raise ConflictError(exc.message) from exc
            raise ServiceUnavailable(exc.message) from exc


class EvalResultViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Evaluation scores, by task and metric."""

    queryset = EvalResult.objects.all()
    serializer_class = s.EvalResultSerializer

    def get_queryset(self):
        return super().get_queryset().filter(**query(self.request, s.EvalFilterSerializer))

    @extend_schema(
        parameters=[s.EvalFilterSerializer],
        responses={200: s.EvalResultSerializer(many=True), **with_errors(400, 404)},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)


@extend_schema_view(retrieve=extend_schema(responses={200: s.ReportSerializer, **with_errors(404)}))
class ReportViewSet(viewsets.ReadOnlyModelViewSet):
    """Report sections written by runs (a run's whole report: /api/runs/{id}/report/)."""

    queryset = Report.objects.all()
    serializer_class = s.ReportSerializer

    def get_queryset(self):
        reports = super().get_queryset()
        if self.action == "list":
            reports = reports.filter(**query(self.request, s.ReportFilterSerializer))
        return reports

    @extend_schema(
        parameters=[s.ReportFilterSerializer],
        responses={200: s.ReportSerializer(many=True), **with_errors(400, 404)},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)
