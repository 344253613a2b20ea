"""The arena's REST API, under /api/arena/ (the runs API's conventions: token or session,
a signed-in user for everything, errors as runs/api/responses.py describes them).

    GET  battles/            your battles, newest first (another user's are not listed)
    POST battles/            a battle: both replies are generated before the answer (201);
                             503 when no engine worker answers
    GET  battles/{id}/       one of your battles (404 for another user's)
    POST battles/{id}/vote/  your one vote: {"outcome": "a"|"b"|"tie"|"both_bad"}; the answer
                             reveals the checkpoints; 409 while generating or once voted
    GET  ratings/            every rated checkpoint, best first

A battle's `reveal` is null until its vote: the API never names A and B before. Input is
checked by chat/limits.py, like a chat message (the same lengths and sampling bounds).
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from arena import services
from arena.consumers import checkpoint_choice
from arena.models import Battle, Vote
from chat import limits
from chat.limits import FieldError
from chat.protocol import EngineError
from chat.services import chat_limits
from nanochat_site.limits import BoundedJSONParser
from runs.api.errors import ConflictError
from runs.api.responses import with_errors

LIMITS = chat_limits()


class EngineUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "no engine worker could generate the replies; try again"
    default_code = "engine_unavailable"


ENGINE_ERROR = OpenApiResponse(
    {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]},
    description="no engine worker could generate both replies (nothing is saved)",
)


class RevealSideSerializer(serializers.Serializer):
    checkpoint = serializers.IntegerField(allow_null=True, help_text="null once deleted")
    label = serializers.CharField()


class RevealSerializer(serializers.Serializer):
    outcome = serializers.ChoiceField(Vote.Outcome.choices)
    a = RevealSideSerializer()
    b = RevealSideSerializer()


class BattleSerializer(serializers.ModelSerializer):
    reveal = serializers.SerializerMethodField()

    class Meta:
        model = Battle
        fields = ["id", "status", "prompt", "sampling", "reply_a", "reply_b", "stats_a",
                  "stats_b", "created", "reveal"]  # fmt: skip

    @extend_schema_field(RevealSerializer(allow_null=True))
    def get_reveal(self, battle: Battle):
        """The vote and the checkpoints behind A and B; null before the vote."""
        return services.reveal(battle)


class BattleCreateSerializer(serializers.Serializer):
    """For the schema; the values are checked by chat/limits.py."""

    content = serializers.CharField(max_length=LIMITS.max_message_chars)
    checkpoints = serializers.ListField(
        child=serializers.IntegerField(min_value=1, allow_null=True),
        max_length=2,
        required=False,
        allow_null=True,
        help_text="up to two checkpoint ids (null: draw one); shown in a random order",
    )
    temperature = serializers.FloatField(
        min_value=LIMITS.min_temperature, max_value=LIMITS.max_temperature, required=False,
        allow_null=True,
    )  # fmt: skip
    top_k = serializers.IntegerField(
        min_value=0, max_value=LIMITS.max_top_k, required=False, allow_null=True
    )
    max_tokens = serializers.IntegerField(
        min_value=1, max_value=LIMITS.max_max_tokens, required=False, allow_null=True
    )


class VoteSerializer(serializers.Serializer):
    outcome = serializers.ChoiceField(Vote.Outcome.choices)


class RatingSerializer(serializers.Serializer):
    checkpoint = serializers.IntegerField()
    label = serializers.CharField()
    rating = serializers.FloatField()
    low = serializers.FloatField(help_text="95% bootstrap interval")
    high = serializers.FloatField()
    votes = serializers.IntegerField()


def translate(exc: Exception) -> Exception:
    if isinstance(exc, FieldError):
        return exceptions.ValidationError({exc.field or "non_field_errors": [exc.message]})
    if isinstance(exc, services.NotFound):
        return exceptions.NotFound(str(exc))
    if isinstance(exc, services.Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, EngineError):
        return EngineUnavailable(str(exc))
    return exc


def json_object(request) -> dict:
    if not isinstance(request.data, dict):
        raise FieldError(None, "the body must be a JSON object")
    return request.data


class BattleViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your arena battles: start one, read it, vote on it."""

    queryset = Battle.objects.none()  # for the schema: get_queryset gives the user's own
    serializer_class = BattleSerializer
    parser_classes = [BoundedJSONParser]

    def get_queryset(self):
        return services.battles_of(self.request.user)

    def handle_exception(self, exc):
        return super().handle_exception(translate(exc))

    @extend_schema(responses={200: BattleSerializer(many=True), **with_errors(404)})
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: BattleSerializer, **with_errors(404)})
    def retrieve(self, request, *args, **kwargs):
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        request=BattleCreateSerializer,
        responses={201: BattleSerializer, 503: ENGINE_ERROR, **with_errors(400)},
    )
    def create(self, request):
        """Generate both replies (blind) and answer the battle, ready for its vote."""
        data = json_object(request)
        content = limits.content(data, LIMITS)
        sampling = limits.sampling(data, LIMITS)
        pending = services.begin_battle(request.user, content, checkpoint_choice(data), sampling)
        try:
            finals = async_to_sync(services.generate)(pending)
        except BaseException:
            services.abandon_battle(pending)
            raise
        battle = services.finish_battle(pending, finals)
        return Response(BattleSerializer(battle).data, status.HTTP_201_CREATED)

    @extend_schema(
        request=VoteSerializer,
        responses={200: BattleSerializer, **with_errors(400, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def vote(self, request, pk=None):
        """Vote once; the answer reveals which checkpoint was A and which B."""
        battle = self.get_object()
        battle = services.vote(request.user, battle.pk, json_object(request).get("outcome"))
        return Response(BattleSerializer(battle).data)


class RatingsView(APIView):
    """Arena ratings of every checkpoint with a counted vote, best first: Bradley–Terry on an
    Elo-like scale with a 95% bootstrap interval (arena/ratings.py)."""

    @extend_schema(responses={200: RatingSerializer(many=True), **with_errors()})
    def get(self, request):
        return Response(RatingSerializer(services.rating_rows(), many=True).data)
