"""REST API of feedback and conversation datasets, mounted at /api/chat/ (chat/corrections.py
holds every rule; these views only parse, call it and serialize).

Everything is the signed-in user's own: another user's reply, dataset or entry answers 404
exactly like a missing one.
"""

from __future__ import annotations

from django.http import StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import corrections
from chat.limits import FieldError
from chat.services import chat_limits
from runs.api.errors import translate
from runs.api.responses import with_errors

# ---- serializers (shapes for the schema; chat/corrections.py validates the values) ---------


class FeedbackIn(serializers.Serializer):
    rating = serializers.IntegerField(min_value=-1, max_value=1, required=False)
    correction = serializers.CharField(required=False, trim_whitespace=False, max_length=100_000)


class FeedbackOut(serializers.Serializer):
    message = serializers.IntegerField()
    content = serializers.CharField()
    rating = serializers.IntegerField()
    corrected = serializers.BooleanField()
    original_content = serializers.CharField(allow_null=True)


class DatasetIn(serializers.Serializer):
    name = serializers.CharField(max_length=1000, trim_whitespace=False)
    checkpoint = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)


class DatasetPatch(DatasetIn):
    name = serializers.CharField(max_length=1000, trim_whitespace=False, required=False)


class EntryOut(serializers.Serializer):
    id = serializers.IntegerField()
    conversation = serializers.IntegerField(source="conversation_id", allow_null=True)
    message = serializers.IntegerField(source="message_id", allow_null=True)
    messages = serializers.ListField(child=serializers.DictField())
    updated = serializers.DateTimeField()


class DatasetOut(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    checkpoint = serializers.IntegerField(source="source_checkpoint_id", allow_null=True)
    entries = serializers.IntegerField(source="entries.count")
    created = serializers.DateTimeField()
    updated = serializers.DateTimeField()


class DatasetDetailOut(DatasetOut):
    entries = EntryOut(many=True, source="entries.all")  # type: ignore[assignment]


class EntryIn(serializers.Serializer):
    conversation = serializers.IntegerField(min_value=1, max_value=2**31 - 1)


class CollectIn(serializers.Serializer):
    checkpoint = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)


class EntryPatch(serializers.Serializer):
    messages = serializers.ListField(child=serializers.DictField(), max_length=1000)


class FinetuneIn(serializers.Serializer):
    preset = serializers.CharField(max_length=100, required=False)
    weight = serializers.IntegerField(min_value=1, max_value=corrections.MAX_WEIGHT, required=False)


class RunOut(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    config = serializers.DictField()
    url = serializers.CharField()


# ---- views ------------------------------------------------------------------------------------


class CorrectionsView(APIView):
    """Answers corrections' exceptions like DRF's own: FieldError and ConfigError 400,
    NotFound 404."""

    def handle_exception(self, exc):
        if isinstance(exc, FieldError):
            exc = exceptions.ValidationError({exc.field: [exc.message]})
        elif isinstance(exc, corrections.NotFound):
            exc = exceptions.NotFound(str(exc))
        return super().handle_exception(translate(exc))

    def body(self, serializer_class) -> dict:
        data = serializer_class(data=self.request.data)
        data.is_valid(raise_exception=True)
        return data.validated_data


def feedback_out(message_id: int, user) -> dict:
    message = corrections.get_reply(user, message_id)
    return {
        "message": message.pk,
        "content": message.content,
        **corrections.feedback_data(corrections.feedback_of(message)),
    }


class FeedbackView(CorrectionsView):
    @extend_schema(request=FeedbackIn, responses={200: FeedbackOut, **with_errors(400, 404)})
    def post(self, request, message_id: int):
        """Rate one of your replies (-1, 0, 1) and/or correct its text (the original is kept)."""
        data = self.body(FeedbackIn)
        corrections.give_feedback(
            request.user, message_id, rating=data.get("rating"),
            correction=data.get("correction"), lim=chat_limits(),
        )  # fmt: skip
        return Response(feedback_out(message_id, request.user))


class DatasetListView(CorrectionsView):
    @extend_schema(responses={200: DatasetOut(many=True), **with_errors()})
    def get(self, request):
        """Your conversation datasets."""
        return Response(DatasetOut(corrections.datasets_of(request.user), many=True).data)

    @extend_schema(request=DatasetIn, responses={201: DatasetOut, **with_errors(400)})
    def post(self, request):
        """Create a dataset (a name; the checkpoint its conversations were had with)."""
        data = self.body(DatasetIn)
        dataset = corrections.create_dataset(request.user, data["name"], data.get("checkpoint"))
        return Response(DatasetOut(dataset).data, status=status.HTTP_201_CREATED)


class DatasetView(CorrectionsView):
    @extend_schema(responses={200: DatasetDetailOut, **with_errors(404)})
    def get(self, request, dataset_id: int):
        """One of your datasets with its entries."""
        dataset = corrections.get_dataset(request.user, dataset_id)
        return Response(DatasetDetailOut(dataset).data)

    @extend_schema(request=DatasetPatch, responses={200: DatasetOut, **with_errors(400, 404)})
    def patch(self, request, dataset_id: int):
        """Rename a dataset or change its checkpoint."""
        data = self.body(DatasetPatch)
        dataset = corrections.update_dataset(
            request.user, dataset_id, name=data.get("name"), checkpoint_id=data.get("checkpoint")
        )
        return Response(DatasetOut(dataset).data)

    @extend_schema(responses={204: None, **with_errors(404)})
    def delete(self, request, dataset_id: int):
        """Delete a dataset (its entries; not the conversations)."""
        corrections.delete_dataset(request.user, dataset_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class EntryListView(CorrectionsView):
    @extend_schema(request=EntryIn, responses={201: EntryOut, **with_errors(400, 404)})
    def post(self, request, dataset_id: int):
        """Add one of your conversations (up to its last upvoted or corrected reply)."""
        data = self.body(EntryIn)
        entry = corrections.add_conversation(request.user, dataset_id, data["conversation"])
        return Response(EntryOut(entry).data, status=status.HTTP_201_CREATED)


class CollectView(CorrectionsView):
    @extend_schema(request=CollectIn, responses={200: EntryOut(many=True), **with_errors(400, 404)})
    def post(self, request, dataset_id: int):
        """Add all your conversations with the checkpoint that have a good reply."""
        data = self.body(CollectIn)
        entries = corrections.collect(request.user, dataset_id, data.get("checkpoint"))
        return Response(EntryOut(entries, many=True).data)


class EntryView(CorrectionsView):
    @extend_schema(request=EntryPatch, responses={200: EntryOut, **with_errors(400, 404)})
    def patch(self, request, dataset_id: int, entry_id: int):
        """Replace an entry's messages (checked like the SFT loader checks them)."""
        data = self.body(EntryPatch)
        entry = corrections.update_entry(
            request.user, dataset_id, entry_id, data["messages"], chat_limits()
        )
        return Response(EntryOut(entry).data)

    @extend_schema(responses={204: None, **with_errors(404)})
    def delete(self, request, dataset_id: int, entry_id: int):
        """Remove an entry from its dataset."""
        corrections.remove_entry(request.user, dataset_id, entry_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ExportView(CorrectionsView):
    @extend_schema(
        responses={
            (200, "application/jsonl"): OpenApiResponse(
                OpenApiTypes.STR, description="CustomJSON: one conversation per line"
            ),
            **with_errors(404),
        }
    )
    def get(self, request, dataset_id: int):
        """The dataset as the JSONL file chat SFT reads (`customjson:<file>`)."""
        dataset = corrections.get_dataset(request.user, dataset_id)
        return jsonl_download(dataset)


def jsonl_download(dataset) -> StreamingHttpResponse:
    """The export as a file download (the page's link and the API answer alike)."""
    response = StreamingHttpResponse(
        corrections.export_lines(dataset), content_type="application/jsonl"
    )
    filename = corrections.export_filename(dataset)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


class FinetuneView(CorrectionsView):
    @extend_schema(request=FinetuneIn, responses={201: RunOut, **with_errors(400, 404)})
    def post(self, request, dataset_id: int):
        """Start an SFT run from the dataset's checkpoint, the dataset upweighted in its mixture."""
        data = self.body(FinetuneIn)
        run = corrections.finetune(
            request.user, dataset_id, preset=data.get("preset", corrections.DEFAULT_PRESET),
            weight=data.get("weight", corrections.DEFAULT_WEIGHT),
        )  # fmt: skip
        out = {"id": run.pk, "status": run.status, "config": run.config,
               "url": reverse("run-detail", args=[run.pk])}  # fmt: skip
        return Response(out, status=status.HTTP_201_CREATED)
