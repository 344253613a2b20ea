"""REST API of the signed-in user's alerts, mounted at /api/alerts/ (alerts/services.py holds
every rule; these views parse, call it and serialize).

    GET   settings/            your channels and which run endings notify you
    PATCH settings/            change some of them (400 names each bad field)
    GET   rules/               your threshold rules; POST one: {"metric", "comparison", "value",
                               "tag"?, "enabled"?}
    GET   rules/{id}/          one rule; PATCH to change it, DELETE to remove it
    GET   deliveries/          what was sent (newest first, paginated); deliveries/{id}/ one
    POST  test/                a test notification on every enabled channel (202; 429 when
                               one was sent seconds ago)

Another user's rule or delivery answers 404 exactly like a missing one.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from alerts import services
from alerts.models import METRIC_MAX_LENGTH, TAG_MAX_LENGTH, URL_MAX_LENGTH, AlertRule, Delivery
from nanochat_site.limits import BoundedJSONParser
from runs.api.errors import translate as translate_runs
from runs.api.responses import with_errors

THROTTLED = OpenApiResponse(
    inline_serializer("AlertThrottled", {"detail": serializers.CharField()}),
    description="a test notification was sent seconds ago (see Retry-After)",
)

# ---- serializers (shapes for the schema; alerts/services.py checks the values) -------------


class SettingsOut(serializers.Serializer):
    webhook_enabled = serializers.BooleanField()
    webhook_url = serializers.CharField(help_text="http(s) URL that receives a JSON POST")
    email_enabled = serializers.BooleanField()
    email = serializers.CharField(help_text="blank: the account's address")
    email_to = serializers.CharField(help_text="where e-mail goes (blank: nowhere)")
    on_succeeded = serializers.BooleanField()
    on_failed = serializers.BooleanField()
    on_cancelled = serializers.BooleanField()
    include_stages = serializers.BooleanField(help_text="also the stages of a pipeline")
    updated = serializers.DateTimeField()


class SettingsPatch(serializers.Serializer):
    webhook_enabled = serializers.BooleanField(required=False)
    webhook_url = serializers.CharField(required=False, allow_blank=True, max_length=URL_MAX_LENGTH)
    email_enabled = serializers.BooleanField(required=False)
    email = serializers.CharField(required=False, allow_blank=True, max_length=254)
    on_succeeded = serializers.BooleanField(required=False)
    on_failed = serializers.BooleanField(required=False)
    on_cancelled = serializers.BooleanField(required=False)
    include_stages = serializers.BooleanField(required=False)


class RuleOut(serializers.Serializer):
    id = serializers.IntegerField()
    metric = serializers.CharField()
    comparison = serializers.ChoiceField(AlertRule.Comparison.choices)
    value = serializers.FloatField()
    tag = serializers.CharField(help_text="blank: every run of yours")
    enabled = serializers.BooleanField()
    created = serializers.DateTimeField()


class RuleIn(serializers.Serializer):
    metric = serializers.CharField(max_length=METRIC_MAX_LENGTH, help_text="e.g. val/bpb")
    comparison = serializers.ChoiceField(AlertRule.Comparison.choices)
    value = serializers.FloatField()
    tag = serializers.CharField(required=False, allow_blank=True, max_length=TAG_MAX_LENGTH)
    enabled = serializers.BooleanField(required=False)


class RulePatch(RuleIn):
    metric = serializers.CharField(max_length=METRIC_MAX_LENGTH, required=False)
    comparison = serializers.ChoiceField(AlertRule.Comparison.choices, required=False)
    value = serializers.FloatField(required=False)


class AttemptOut(serializers.Serializer):
    at = serializers.CharField()
    ok = serializers.BooleanField()
    detail = serializers.CharField()


class DeliveryOut(serializers.Serializer):
    id = serializers.IntegerField()
    created = serializers.DateTimeField()
    event = serializers.CharField(source="notification.event")
    text = serializers.CharField(source="notification.text")
    payload = serializers.DictField(source="notification.payload", help_text="the webhook body")
    run = serializers.IntegerField(source="notification.run_id", allow_null=True)
    rule = serializers.IntegerField(source="notification.rule_id", allow_null=True)
    channel = serializers.ChoiceField(Delivery.Channel.choices)
    target = serializers.CharField()
    status = serializers.ChoiceField(Delivery.Status.choices)
    attempts = serializers.IntegerField()
    history = AttemptOut(many=True)
    last_error = serializers.CharField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    sent_at = serializers.DateTimeField(allow_null=True)


class TestOut(serializers.Serializer):
    notification = serializers.IntegerField()
    deliveries = DeliveryOut(many=True)


def translate(exc: Exception) -> Exception:
    if isinstance(exc, services.NotFound):
        return exceptions.NotFound(str(exc))
    if isinstance(exc, services.TooSoon):
        return exceptions.Throttled(wait=exc.retry_after, detail=str(exc))
    return translate_runs(exc)


class AlertsView:
    parser_classes = [BoundedJSONParser]

    def handle_exception(self, exc):
        return super().handle_exception(translate(exc))


# ---- views ---------------------------------------------------------------------------------


class SettingsView(AlertsView, APIView):
    """Your alert channels (webhook, e-mail) and which run endings notify you."""

    @extend_schema(responses={200: SettingsOut, **with_errors()})
    def get(self, request):
        return Response(SettingsOut(services.settings_of(request.user)).data)

    @extend_schema(request=SettingsPatch, responses={200: SettingsOut, **with_errors(400)})
    def patch(self, request):
        """Change the fields given; a URL must reach a public host (or an allowed one)."""
        found = services.update_settings(request.user, request.data)
        return Response(SettingsOut(found).data)


class RuleViewSet(AlertsView, viewsets.ViewSet):
    """Your threshold rules: notify when a metric of one of your runs first crosses a value."""

    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    queryset = AlertRule.objects.none()  # for the schema (an integer id); never read

    @extend_schema(responses={200: RuleOut(many=True), **with_errors()})
    def list(self, request):
        return Response(RuleOut(services.rules_of(request.user), many=True).data)

    @extend_schema(request=RuleIn, responses={201: RuleOut, **with_errors(400)})
    def create(self, request):
        rule = services.create_rule(request.user, request.data)
        return Response(RuleOut(rule).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: RuleOut, **with_errors(404)})
    def retrieve(self, request, pk=None):
        return Response(RuleOut(services.rule_of(request.user, pk)).data)

    @extend_schema(request=RulePatch, responses={200: RuleOut, **with_errors(400, 404)})
    def partial_update(self, request, pk=None):
        return Response(RuleOut(services.update_rule(request.user, pk, request.data)).data)

    @extend_schema(responses={204: None, **with_errors(404)})
    def destroy(self, request, pk=None):
        services.delete_rule(request.user, pk)
        return Response(status=status.HTTP_204_NO_CONTENT)


class DeliveryViewSet(AlertsView, mixins.ListModelMixin, viewsets.GenericViewSet):
    """What was sent to you, on which channel, after how many attempts (read-only)."""

    queryset = Delivery.objects.none()  # for the schema: get_queryset gives the user's own
    serializer_class = DeliveryOut

    def get_queryset(self):
        return services.deliveries_of(self.request.user)

    @extend_schema(responses={200: DeliveryOut(many=True), **with_errors(404)})
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: DeliveryOut, **with_errors(404)})
    def retrieve(self, request, pk=None):
        return Response(DeliveryOut(services.delivery_of(request.user, pk)).data)


class TestView(AlertsView, APIView):
    """Send a test notification on every channel you turned on."""

    @extend_schema(request=None, responses={202: TestOut, 429: THROTTLED, **with_errors(400)})
    def post(self, request):
        made = services.send_test(request.user)
        deliveries = list(made.deliveries.select_related("notification").order_by("pk"))
        body = {"notification": made.pk, "deliveries": DeliveryOut(deliveries, many=True).data}
        return Response(body, status=status.HTTP_202_ACCEPTED)
