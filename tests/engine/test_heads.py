"""Every family's output paths agree with each other: the training loss summed equals the mean
times the target count (auxiliary losses included), and evaluation's per-token losses average
to the mean cross-entropy without them."""

from __future__ import annotations

import pytest
import torch

from engine.models import registry

CONFIGS = {
    "gpt": dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=64),
    "gpt2": dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_embd=64, d_ff=128),
    "hybrid": dict(sequence_len=32, vocab_size=96, n_layer=2, n_embd=64, layer_pattern="LF",
                   n_head=2, n_kv_head=1, head_dim=32, n_k_heads=1, n_v_heads=2, k_head_dim=32,
                   v_head_dim=32, num_experts=4, experts_per_token=2, expert_dim=64,
                   shared_expert_dim=64, chunk_size=8, aux_loss_coef=0.1),
}  # fmt: skip


@pytest.fixture(params=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    config = registry.config_from_dict({"model": request.param, **CONFIGS[request.param]})
    model = registry.build_model(config)
    with torch.no_grad():  # away from the zero-initialised output projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_a_summed_training_loss_is_the_mean_times_the_targets(model):
    idx = torch.randint(0, 96, (2, 32))
    targets = idx.roll(-1, 1)
    targets[:, :5] = -1  # prompts, as fine-tuning masks them
    count = int((targets >= 0).sum())
    mean = model(idx, targets)
    total = model(idx, targets, loss_reduction="sum")
    assert total.item() == pytest.approx(mean.item() * count, rel=1e-5)


def test_eval_token_losses_average_to_the_plain_cross_entropy(model):
    model.eval()
    idx = torch.randint(0, 96, (2, 32))
    targets = idx.roll(-1, 1)
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
        logits = model(idx)
    assert per_token.shape == (2, 32)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 96), targets.view(-1))
    assert per_token.mean().item() == pytest.approx(expected.item(), rel=1e-5)
