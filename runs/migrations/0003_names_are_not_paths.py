"""Dataset and tokenizer names become display names only; new rows get id-based directories.

Rows made before this keep their recorded paths (`datasets/<name>`, `tokenizers/<name>`), which
stay valid for reading and are still recognised as theirs when deleted (runs.layout.legacy_dir).
Nothing moves on disk. A name that the display-name rules now refuse ("." or "..", empty, or
holding control characters) is renamed `dataset-<id>` / `tokenizer-<id>` so it can be shown and
resubmitted; such a row's path (the top-level folder itself, or the data home) is left as it
was and can never be deleted through it.
"""

import unicodedata

from django.db import migrations


def _unusable(name: str) -> bool:
    stripped = name.strip()
    return (
        not stripped
        or stripped in (".", "..")
        or any(unicodedata.category(c).startswith("C") for c in name)
    )


def rename_unusable(apps, schema_editor):
    for model_name, prefix in (("Dataset", "dataset"), ("Tokenizer", "tokenizer")):
        model = apps.get_model("runs", model_name)
        for row in model.objects.all().only("pk", "name"):
            if _unusable(row.name):
                new, n = f"{prefix}-{row.pk}", 1
                while model.objects.filter(name=new).exists():
                    n += 1
                    new = f"{prefix}-{row.pk}-{n}"
                model.objects.filter(pk=row.pk).update(name=new)


class Migration(migrations.Migration):
    dependencies = [("runs", "0002_run_pipeline")]

    operations = [migrations.RunPython(rename_unusable, migrations.RunPython.noop)]
