"""Checkpoints written before a model change load and generate exactly as before.

The fixture was saved by the code of 2026-12-03 (see its README); whatever the GPT family has
gained since must be off for it, because its meta records none of the new fields.
"""

import json
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.engine import Engine

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gpt_checkpoint_2026_12"


def _expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_old_checkpoint_logits_unchanged():
    model, meta = load_model(FIXTURE)
    expected = _expected()
    assert meta["step"] == 7
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt"]]))[0]
    torch.testing.assert_close(logits[-1], torch.tensor(expected["last_logits"]), atol=2e-5, rtol=0)
    assert abs(float(logits.sum()) - expected["logits_sum"]) < 1e-2


def test_old_checkpoint_greedy_output_unchanged():
    model, _ = load_model(FIXTURE)
    expected = _expected()
    prompt = expected["prompt"]
    assert list(model.generate_naive(prompt, 40)) == expected["greedy"]
    seqs, _ = Engine(model, None).generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert seqs[0][len(prompt) :] == expected["greedy"]


def test_old_checkpoint_sampling_unchanged():
    model, _ = load_model(FIXTURE)
    expected = _expected()
    prompt = expected["prompt"]
    seqs, _ = Engine(model, None).generate_batch(
        prompt, num_samples=2, max_tokens=20, temperature=0.8, top_k=50, seed=7
    )
    assert [s[len(prompt) :] for s in seqs] == expected["sampled_t0.8_k50_seed7"]
