"""Issue 13, reproduction 4 and the config part of 6: validation that cannot allocate.

Through the real API as a non-staff user: configs that used to build a model inside the request
(depth 10^6), that were accepted with 201 (vocabularies, shard counts, iterations and intervals
far beyond anything trainable, integers past a 64-bit column), or that made the database fail
(a NUL in a string) are refused with a 400 naming the field, quickly, and nothing is saved.
"""

from __future__ import annotations

import json
import time

import pytest

from runs.models import Run, Tokenizer

pytestmark = pytest.mark.django_db

INT64_OVERFLOW = 2**63
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
def client(api, alice):
    assert not alice.is_staff
    return api(alice)


def base(inputs, **config):
    return {"kind": "base", "preset": "tiny", "dataset": inputs[0].pk,
            "tokenizer": inputs[1].pk, "config": config}  # fmt: skip


@pytest.fixture
def inputs(ready_dataset, ready_tokenizer):
    return ready_dataset, ready_tokenizer


def post(client, url: str, body: dict):
    """POST `body` as JSON with every non-ASCII character escaped, as a browser or `requests`
    may send it (the test client's own renderer cannot encode a lone surrogate)."""
    return client.post(url, json.dumps(body), content_type="application/json")


def refused(response, field: str) -> list[str]:
    """The 400's messages for `field` (asserting there are some)."""
    assert response.status_code == 400, response.content[:500]
    errors = response.json()
    assert field in errors, errors
    assert errors[field] and all(isinstance(m, str) and m for m in errors[field])
    return errors[field]


def test_a_million_layers_is_refused_in_under_a_second(client, inputs):
    started = time.monotonic()
    response = post(client, "/api/runs/", base(inputs, depth=10**6))
    elapsed = time.monotonic() - started
    refused(response, "config.depth")
    assert elapsed < 1.0, f"took {elapsed:.2f} s: the request did work that grows with depth"
    assert not Run.objects.exists()


def test_a_model_too_big_within_the_ranges_is_refused_by_arithmetic(client, inputs):
    # Each value is inside its flag's range; together they make ~1e14 parameters, which only
    # the closed-form count can see without building anything.
    body = base(inputs, depth=256, aspect_ratio=1024, head_dim=128)
    started = time.monotonic()
    response = post(client, "/api/runs/", body)
    elapsed = time.monotonic() - started
    assert "parameters" in refused(response, "config.depth")[0]
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert not Run.objects.exists()


def test_a_horizon_of_more_steps_than_any_run_is_refused(client, inputs):
    body = base(inputs, num_iterations=-1, target_flops=1e30)
    refused(post(client, "/api/runs/", body), "config.target_flops")
    assert not Run.objects.exists()


RUN_CASES = [
    ("num_iterations 1e30", lambda i: base(i, num_iterations=10**30), "config.num_iterations"),
    ("eval_every -1e30", lambda i: base(i, eval_every=-(10**30)), "config.eval_every"),
    ("int64 overflow", lambda i: base(i, sample_every=INT64_OVERFLOW), "config.sample_every"),
    ("float past float", lambda i: base(i, target_flops=10**400), "config.target_flops"),
    ("NUL in a string", lambda i: base(i, window_pattern="SS\x00L"), "config.window_pattern"),
    ("control character", lambda i: base(i, window_pattern="S\x1bL"), "config.window_pattern"),
    ("lone surrogate", lambda i: base(i, device="cpu\ud800"), "config.device"),
    ("long string", lambda i: base(i, window_pattern="S" * 100_000), "config.window_pattern"),
    ("tokenizer vocab 1e12",
     lambda i: {"kind": "tokenizer", "dataset": i[0].pk, "config": {"vocab_size": 10**12}},
     "config.vocab_size"),
    ("tokenizer vocab 2^63",
     lambda i: {"kind": "tokenizer", "dataset": i[0].pk, "config": {"vocab_size": INT64_OVERFLOW}},
     "config.vocab_size"),
    ("pipeline dataset_shards 1e9",
     lambda i: {"kind": "pipeline", "config": {"dataset_shards": 10**9}}, "config.dataset_shards"),
    ("pipeline vocab 1e12",
     lambda i: {"kind": "pipeline", "config": {"vocab_size": 10**12}}, "config.vocab_size"),
    ("pipeline NUL in free text",
     lambda i: {"kind": "pipeline", "config": {"base_chat_eval_tasks": "a\x00b"}},
     "config.base_chat_eval_tasks"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_out_of_range_run_configs_are_field_errors(client, inputs, case, body, field):
    tokenizers = Tokenizer.objects.count()
    refused(post(client, "/api/runs/", body(inputs)), field)
    assert not Run.objects.exists()
    assert Tokenizer.objects.count() == tokenizers


@pytest.mark.parametrize("vocab_size", [10**12, INT64_OVERFLOW, 2**21 + 1])
def test_tokenizer_vocab_beyond_the_range_is_a_field_error(client, inputs, vocab_size):
    body = {"dataset": inputs[0].pk, "config": {"vocab_size": vocab_size}}
    refused(post(client, "/api/tokenizers/", body), "config.vocab_size")
    assert Tokenizer.objects.count() == 1 and not Run.objects.exists()


def test_the_largest_vocab_in_range_is_accepted(client, inputs):
    body = {"dataset": inputs[0].pk, "config": {"vocab_size": 2**21}}
    response = post(client, "/api/tokenizers/", body)
    assert response.status_code == 201, response.content
    assert Tokenizer.objects.get(name__endswith=f"-{2**21}-{Run.objects.get().pk}")


@pytest.mark.parametrize(
    ("options", "field"),
    [({"shards": 10**9}, "options.shards"), ({"seed": INT64_OVERFLOW}, "options.seed"),
     ({"max_chars": -(10**30)}, "options.max_chars")],
)  # fmt: skip
def test_dataset_options_beyond_the_range_are_field_errors(client, options, field):
    body = {"name": "big", "source": "builtin", "options": options}
    refused(post(client, "/api/datasets/", body), field)
    assert not Run.objects.exists()


def test_a_ten_megabyte_config_string_is_refused_naming_the_field(client, inputs, settings):
    # With a body limit large enough to let it through, the flag's own max_length refuses it.
    settings.API_MAX_BODY_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4 * TEN_MB
    body = base(inputs, window_pattern="S" * TEN_MB)
    started = time.monotonic()
    messages = refused(post(client, "/api/runs/", body), "config.window_pattern")
    assert time.monotonic() - started < 5.0
    assert "at most" in messages[0] and len(messages[0]) < 200  # the value is not echoed
    assert not Run.objects.exists()


def test_a_ten_megabyte_body_is_refused_at_the_default_limits(client, inputs):
    response = post(client, "/api/runs/", base(inputs, window_pattern="S" * TEN_MB))
    assert response.status_code == 400
    assert not Run.objects.exists()


def test_in_range_values_at_the_edges_are_accepted(client, inputs):
    # The sentinels (-1: auto / only at the end) and the largest values stay valid.
    body = base(inputs, num_iterations=10**9, eval_every=-1, sample_every=-1, save_every=-1,
                total_batch_size=-1, n_kv_head=-1, seed=2**32 - 1)  # fmt: skip
    response = post(client, "/api/runs/", body)
    assert response.status_code == 201, response.content
    assert Run.objects.get().config["num_iterations"] == 10**9


def test_the_form_shows_each_flags_range(client):
    page = client.get("/runs/new/base/").content.decode()
    assert 'name="depth"' in page
    assert 'max="256"' in page and 'min="1"' in page
    assert 'maxlength="256"' in page  # window_pattern


def test_a_mixture_weight_past_the_limit_is_refused(client, finished_run):
    # `gsm8k*N` lists the task N times: a huge N used to fill the worker's memory.
    for weight in ("1001", "1" + "0" * 30):
        body = {"kind": "sft", "parent_checkpoint": finished_run.checkpoints.first().pk,
                "config": {"mixture": f"smoltalk,gsm8k*{weight}"}}  # fmt: skip
        message = refused(post(client, "/api/runs/", body), "config.mixture")[0]
        assert "the weight must be" in message and "1000" in message
    assert not Run.objects.filter(kind="sft").exists()


@pytest.mark.parametrize(
    ("field", "options", "named"),
    [
        ("base_args", "--num-iterations 1e30", "num_iterations"),
        ("sft_args", "--device-batch-size=0", "device_batch_size"),
        ("base_args", "--depth", "expected one argument"),
        ("chat_eval_args", "--no-such-flag 3", "unrecognized arguments"),
    ],
)
def test_pipeline_stage_options_are_checked_when_submitted(client, field, options, named):
    body = {"kind": "pipeline", "preset": "demo-cpu", "config": {field: options}}
    assert named in refused(post(client, "/api/runs/", body), f"config.{field}")[0]
    assert not Run.objects.exists()


def test_good_pipeline_stage_options_are_accepted(client):
    body = {"kind": "pipeline", "preset": "demo-cpu",
            "config": {"base_args": "--num-iterations 50 --eval-every=10", "sft_args": ""}}  # fmt: skip
    response = post(client, "/api/runs/", body)
    assert response.status_code == 201, response.content[:500]
