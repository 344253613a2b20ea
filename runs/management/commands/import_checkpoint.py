"""`manage.py import_checkpoint <folder> --owner <user>`: an exported model back into the site.

The folder is one `python -m engine.export export` (or the checkpoints page's HF zip, unzipped)
wrote. It is checked and converted into the data home (`imports/checkpoint-<id>/`) and
registered as a checkpoint owned by the user, so it appears in the chat picker and the
checkpoints page like one a run saved.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from engine.hf_export import ExportError
from runs.model_export import import_checkpoint
from runs.models import Checkpoint


class Command(BaseCommand):
    help = "Import a Hugging Face folder exported by nanochat-site as a checkpoint."

    def add_arguments(self, parser):
        parser.add_argument(
            "folder", help="the exported folder (config.json, model.safetensors, ...)"
        )
        parser.add_argument("--owner", required=True, help="username of the user it belongs to")
        parser.add_argument(
            "--stage",
            default=Checkpoint.Stage.SFT,
            choices=Checkpoint.Stage.values,
            help="the stage to list it under (default: %(default)s, a chat model)",
        )

    def handle(self, *args, folder, owner, stage, **options):
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"no user named {owner!r}")
        try:
            checkpoint = import_checkpoint(folder, user, stage)
        except (ExportError, FileNotFoundError) as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"imported checkpoint {checkpoint.pk} ({checkpoint.stage}, step {checkpoint.step}) "
            f"into {checkpoint.path}"
        )
