"""The Hugging Face zip of a checkpoint (page and API) and `manage.py import_checkpoint`.

A real tiny GPT checkpoint is written where its run keeps checkpoints; the downloads are read
back as zips. Reading a checkpoint needs only a signed-in user (every user sees every run and
artifact), and the download follows the same rule; anonymous requests are refused.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import zipfile

import pytest
import torch
from django.core.management import CommandError, call_command
from django.test import override_settings

from chat.services import checkpoints_for_picker
from engine.checkpoint import load_model, load_tokenizer_for, save_checkpoint, tokenizer_dir
from engine.hf_export import export_checkpoint
from engine.models.gpt import GPTConfig
from engine.models.registry import build_model
from engine.tokenizer import Tokenizer
from runs import layout, model_export
from runs.models import Checkpoint, EvalResult, Status
from tests.runs.conftest import add_checkpoint

pytestmark = pytest.mark.django_db

STEP = 30
# Always in the zip; tokenizer.json, tokenizer_config.json and special_tokens_map.json join
# them once engine/hf_tokenizer.py is there.
REQUIRED = {
    "model.safetensors", "config.json", "generation_config.json", "README.md",
    "nanochat_tokenizer.json", "configuration_nanochat_site.py", "nanochat_site_common.py",
    "modeling_nanochat_gpt.py",
}  # fmt: skip
HF_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(autouse=True)
def clean_data_home(monkeypatch):
    """Imports and export folders live in the session's data home, which outlives a test's
    database rollback (and SQLite reuses ids): each test starts without them, and with export
    slots of its own (a failed test may leave a response unclosed)."""
    monkeypatch.setattr(model_export, "_slots", None)
    yield
    for folder in (layout.data_home() / "imports", model_export.export_tmp_root()):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello world, the quick brown fox 🦊", "def f(x):\n    return x * 2"] * 40
    return Tokenizer.train(texts, vocab_size=300)


@pytest.fixture
def checkpoint(alice, make_run, tokenizer):
    """alice's run with a real checkpoint on disk at STEP and one eval score."""
    run = make_run(alice, Status.SUCCEEDED, name="tiny *chat* run")
    row = add_checkpoint(run, STEP)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)  # fmt: skip
    save_checkpoint(row.path, STEP, model_state=build_model(config).state_dict(),
                    model_config=config, meta={"val_bpb": 1.5})  # fmt: skip
    tokenizer.save(tokenizer_dir(row.path))
    EvalResult.objects.create(run=run, checkpoint=row, task="ARC-Easy", metric="acc", value=0.42)
    return row


def unzip(response) -> zipfile.ZipFile:
    """The response's zip, read to the end (where the test client closes the response, as a
    server does once it has sent it)."""
    data = b"".join(response.streaming_content)
    return zipfile.ZipFile(io.BytesIO(data))


def assert_export_zip(response, checkpoint):
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    root = f"checkpoint-{checkpoint.pk}-step-{STEP}-hf"
    assert f'filename="{root}.zip"' in response["Content-Disposition"]
    archive = unzip(response)
    assert archive.testzip() is None
    names = {name.removeprefix(root + "/") for name in archive.namelist()}
    assert all(name.startswith(root + "/") for name in archive.namelist())
    assert REQUIRED <= names <= REQUIRED | HF_TOKENIZER_FILES
    config = json.loads(archive.read(f"{root}/config.json"))
    assert config["nanochat"]["step"] == STEP
    card = archive.read(f"{root}/README.md").decode()
    assert "ARC-Easy" in card and "0.4200" in card
    assert "tiny \\*chat\\* run" in card  # user text escaped, not markdown
    # The temporary export folder is gone once the response is closed.
    assert not any(model_export.export_tmp_root().glob("export-*"))
    return archive


def test_owner_downloads_the_zip_from_the_checkpoints_page(client, alice, checkpoint):
    client.force_login(alice)
    page = client.get("/checkpoints/")
    assert f"/checkpoints/{checkpoint.pk}/export.zip" in page.content.decode()
    assert_export_zip(client.get(f"/checkpoints/{checkpoint.pk}/export.zip"), checkpoint)


def test_another_signed_in_user_may_download_as_they_may_read(client, bob, checkpoint):
    client.force_login(bob)
    assert client.get(f"/api/checkpoints/{checkpoint.pk}/").status_code == 200
    assert_export_zip(client.get(f"/checkpoints/{checkpoint.pk}/export.zip"), checkpoint)


def test_anonymous_is_refused(client, checkpoint):
    page = client.get(f"/checkpoints/{checkpoint.pk}/export.zip")
    assert page.status_code == 302 and "/login" in page["Location"]
    assert client.get(f"/api/checkpoints/{checkpoint.pk}/export/").status_code in (401, 403)
    assert not model_export.export_tmp_root().exists() or not any(
        model_export.export_tmp_root().iterdir()
    )


def test_api_download_by_token_whatever_it_accepts(api, alice, checkpoint):
    response = api(alice, token=True).get(
        f"/api/checkpoints/{checkpoint.pk}/export/", HTTP_ACCEPT="application/zip"
    )
    archive = assert_export_zip(response, checkpoint)
    root = f"checkpoint-{checkpoint.pk}-step-{STEP}-hf"
    weights = archive.read(f"{root}/model.safetensors")
    assert len(weights) > 10_000


def test_unknown_checkpoint_and_missing_files_are_404(api, alice, checkpoint, tmp_path):
    client = api(alice)
    assert client.get("/api/checkpoints/999999/export/").status_code == 404
    gone = Checkpoint.objects.create(stage="base", step=1, path=str(tmp_path / "nothing"))
    response = client.get(f"/api/checkpoints/{gone.pk}/export/")
    assert response.status_code == 404
    assert response.json() == {"detail": "the checkpoint's files are no longer on disk"}


def test_a_checkpoint_over_the_size_limit_is_refused(api, alice, checkpoint, client):
    with override_settings(HF_EXPORT_MAX_BYTES=1000):
        response = api(alice).get(f"/api/checkpoints/{checkpoint.pk}/export/")
        assert response.status_code == 409
        assert "python -m engine.export" in response.json()["detail"]
        client.force_login(alice)
        assert client.get(f"/checkpoints/{checkpoint.pk}/export.zip").status_code == 409


def test_exports_beyond_the_concurrency_limit_wait_their_turn(api, alice, checkpoint, monkeypatch):
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(model_export, "_slots", slots)
    first = api(alice).get(f"/api/checkpoints/{checkpoint.pk}/export/")
    assert first.status_code == 200  # holds the only slot until it is closed
    busy = api(alice).get(f"/api/checkpoints/{checkpoint.pk}/export/")
    assert busy.status_code == 503
    unzip(first)  # read and closed: the slot is free again
    assert api(alice).get(f"/api/checkpoints/{checkpoint.pk}/export/").status_code == 200


def test_stale_export_folders_are_swept(checkpoint, api, alice):
    root = model_export.export_tmp_root()
    stale = root / "export-stale"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    unzip(api(alice).get(f"/api/checkpoints/{checkpoint.pk}/export/"))
    assert not stale.exists()


# ---- manage.py import_checkpoint -----------------------------------------------------------


@pytest.fixture
def export_folder(checkpoint, tmp_path):
    folder = tmp_path / "hf"
    export_checkpoint(checkpoint.path, folder, step=STEP)
    return folder


def test_import_command_registers_a_chat_checkpoint(export_folder, bob, checkpoint):
    out = io.StringIO()
    call_command("import_checkpoint", str(export_folder), owner="bob", stdout=out)
    imported = Checkpoint.objects.exclude(pk=checkpoint.pk).get()
    assert imported.owner == bob and imported.stage == "sft" and imported.step == STEP
    assert imported.path == str(layout.import_dir(imported.pk))
    assert imported.val_bpb == 1.5 and imported.size_bytes > 0
    assert f"imported checkpoint {imported.pk}" in out.getvalue()
    assert checkpoints_for_picker().first() == imported  # chat models first, newest first
    model, meta = load_model(imported.path, STEP)
    original, _ = load_model(checkpoint.path, STEP)
    for key, value in original.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])
    text = "def f(x): 🦊"
    assert load_tokenizer_for(imported.path).encode(text) == load_tokenizer_for(
        checkpoint.path
    ).encode(text)
    # Nothing is left in the staging area.
    assert [p.name for p in (layout.data_home() / "imports").iterdir()] == [
        layout.import_dir(imported.pk).name
    ]


def test_import_command_refusals_leave_nothing_behind(export_folder, alice, tmp_path):
    before = Checkpoint.objects.count()
    with pytest.raises(CommandError, match="no user named 'nobody'"):
        call_command("import_checkpoint", str(export_folder), owner="nobody")
    (export_folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CommandError, match="not a readable safetensors file"):
        call_command("import_checkpoint", str(export_folder), owner="alice")
    with pytest.raises(CommandError, match="is missing"):
        call_command("import_checkpoint", str(tmp_path), owner="alice")
    assert Checkpoint.objects.count() == before
    imports = layout.data_home() / "imports"
    assert not imports.exists() or not any(imports.iterdir())
