"""The new-run form and the runs API show a training run's predicted memory per GPU, and a
GPU run that cannot fit one sequence per pass is refused with the numbers."""

from __future__ import annotations

import pytest
from django.urls import reverse

from runs.models import Run
from training import base_train, memory
from training.memory import REFERENCE_GPU, estimate_step

pytestmark = pytest.mark.django_db

H200_BYTES = memory.gpu("H200").capacity_bytes


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """This machine has no GPU; tests that want one set it explicitly."""
    monkeypatch.setattr(memory, "device_capacity", lambda device: None)


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device: H200_BYTES)
    monkeypatch.setattr(memory, "device_name", lambda device: "NVIDIA H200")


def expected_text(preset: str, vocab: int, capacity: int, world: int = 1) -> str:
    """What a user should read, from training.memory directly: '≈ N of C GiB per GPU'."""
    config = base_train.FLAGS.validate(base_train.FLAGS.load_config_file(preset))
    model = base_train.model_config_for(config, vocab)
    batch, estimate = memory.auto_device_batch(model, capacity_bytes=capacity, world_size=world)
    return f"{estimate.describe(capacity)}", batch


def test_form_shows_the_presets_prediction_for_a_reference_gpu(client, alice):
    client.force_login(alice)
    html = client.get(reverse("run-new", args=["base"]) + "?preset=d20").content.decode()
    text, batch = expected_text("d20", memory.DEFAULT_VOCAB, REFERENCE_GPU.capacity_bytes)
    assert text.startswith("≈ ") and text.endswith(" of 80 GiB per GPU")
    assert f"Memory: {text} (reference H100-80GB: no GPU on this server)" in html
    assert f"device batch {batch} (auto)" in html
    assert "65,536-token vocabulary assumed" in html
    assert 'name="device_batch_size"' in html and 'placeholder="auto"' in html


def test_check_memory_shows_the_prediction_and_queues_nothing(
    client, alice, ready_dataset, ready_tokenizer, h200
):
    client.force_login(alice)
    data = {"preset": "d20", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
            "nproc_per_node": 8, "preview": "1"}  # fmt: skip
    response = client.post(reverse("run-new", args=["base"]), data)
    assert response.status_code == 200
    text, batch = expected_text("d20", ready_tokenizer.vocab_size, H200_BYTES, world=8)
    assert text.endswith(" of 140 GiB per GPU")
    assert f"Memory: {text} (NVIDIA H200), device batch {batch} (auto)" in response.content.decode()
    assert not Run.objects.exists()


def test_form_refuses_a_gpu_run_that_cannot_fit_one_sequence(
    client, alice, ready_dataset, ready_tokenizer
):
    client.force_login(alice)
    data = {"preset": "d20", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
            "nproc_per_node": 1, "depth": 48, "device_batch_size": "auto"}  # fmt: skip
    response = client.post(reverse("run-new", args=["base"]), data)
    assert response.status_code == 400
    html = response.content.decode()
    assert 'data-error-for="device_batch_size"' in html
    config = base_train.FLAGS.validate({**base_train.FLAGS.load_config_file("d20"), "depth": 48})
    need = estimate_step(base_train.model_config_for(config, 512), device_batch_size=1).total
    assert f"need {need / memory.GIB:.1f} GiB per GPU" in html
    assert "of the 79.6 GiB this GPU has" in html
    assert not Run.objects.exists()


def test_api_answers_the_prediction_and_refuses_what_cannot_fit(
    api, alice, ready_dataset, ready_tokenizer, h200
):
    body = {"kind": "base", "preset": "d20", "dataset": ready_dataset.pk,
            "tokenizer": ready_tokenizer.pk, "nproc_per_node": 8}  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()["memory"]
    text, batch = expected_text("d20", ready_tokenizer.vocab_size, H200_BYTES, world=8)
    assert data["text"] == f"{text} (NVIDIA H200), device batch {batch} (auto)"
    assert data["fits"] is True and data["device_batch_size"] == batch
    assert data["capacity_bytes"] == H200_BYTES
    run_id = response.json()["id"]
    assert api(alice).get(f"/api/runs/{run_id}/").json()["memory"]["text"] == data["text"]

    body["config"] = {"depth": 64}
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400
    message = response.json()["config.device_batch_size"][0]
    assert message.startswith("device_batch_size: even 1 sequence(s) per forward pass need ")
    assert "of the 140.4 GiB this GPU has" in message
    assert Run.objects.count() == 1


def test_cpu_runs_are_predicted_per_process_against_the_machine(
    api, alice, ready_dataset, ready_tokenizer
):
    body = {"kind": "base", "preset": "tiny", "dataset": ready_dataset.pk,
            "tokenizer": ready_tokenizer.pk}  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()["memory"]
    assert "GiB per process (this server's memory), device batch 4 (given)" in data["text"]


def test_run_page_shows_the_prediction(client, alice, make_run):
    run = make_run(alice)
    client.force_login(alice)
    html = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert 'id="memory-prediction"' in html and "GiB per" in html


def test_a_finetune_whose_parent_cannot_fit_one_row_is_refused(api, alice, finished_run, h200):
    # The parent checkpoint's model decides mid/SFT memory: a depth-64 model cannot hold one
    # 2048-token row on a 141 GB card, so the run is refused before it is queued.
    parent = finished_run.checkpoints.first()
    parent.model_config = base_train.model_config_for(
        base_train.FLAGS.validate({"depth": 64}), 65536
    ).to_dict()
    parent.save(update_fields=["model_config"])
    body = {"kind": "sft", "parent_checkpoint": parent.pk}
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    message = response.json()["config.device_batch_size"][0]
    assert message.startswith("device_batch_size: even 1 ")
    assert "of the 140.4 GiB this GPU has" in message
    assert not Run.objects.filter(kind="sft").exists()

    # A model that fits is accepted, at the batch the memory model picks.
    parent.model_config = base_train.model_config_for(
        base_train.FLAGS.validate({"depth": 4}), 65536
    ).to_dict()
    parent.save(update_fields=["model_config"])
    assert api(alice).post("/api/runs/", body, format="json").status_code == 201


@pytest.mark.parametrize("model_config", [{"n_layer": 2}, {"n_layer": 2, "bogus": 1}])
def test_a_parent_with_a_partial_model_config_is_left_to_the_stage(
    api, alice, finished_run, h200, model_config
):
    # Older or hand-made checkpoint rows may hold only part of a model config: the memory check
    # cannot predict anything for them and must not turn that into a server error.
    parent = finished_run.checkpoints.first()
    parent.model_config = model_config
    parent.save(update_fields=["model_config"])
    body = {"kind": "sft", "parent_checkpoint": parent.pk}
    assert api(alice).post("/api/runs/", body, format="json").status_code == 201
