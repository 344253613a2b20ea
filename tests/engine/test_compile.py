"""The training step compiles as one graph: no graph breaks in forward, loss or backward.

A graph break splits the compiled step in pieces that run eagerly in between, and the usual
causes are host reads of device values (`.item()`, `int(tensor)`) or Python decisions on
them; each such read also makes a GPU wait. `fullgraph=True` turns any break into an error,
so these tests fail on the first one. The aot_eager backend traces forward and backward
exactly as inductor would see them, without inductor's minutes of C++ compilation on a CPU.
"""

import pytest
import torch

from engine.models.gpt import GPT, GPTConfig


def small_model(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=64, window_pattern="SSSL")  # fmt: skip
    model = GPT(config)
    # Non-zero output projections, so every path carries gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def batch(model, rows=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T, V = model.config.sequence_len, model.config.vocab_size
    idx = torch.randint(0, V, (rows, T), generator=gen)
    targets = torch.randint(0, V, (rows, T), generator=gen)
    targets[:, :5] = -1  # ignored positions, as the SFT loader writes them
    return idx, targets


def step(model, idx, targets, dtype):
    """One training forward + loss + backward; returns the loss and the gradients."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(idx, targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_compiles_without_graph_breaks_and_matches_eager(dtype):
    torch._dynamo.reset()
    model = small_model()
    idx, targets = batch(model)
    want_loss, want_grads = step(model, idx, targets, dtype)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    got_loss, got_grads = step(compiled, idx, targets, dtype)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(got_loss, want_loss, **tol)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_explain_finds_one_graph_and_no_breaks(dtype):
    # The same property seen through dynamo's own accounting, for a readable failure: the
    # break reasons name the line that broke the graph.
    torch._dynamo.reset()
    model = small_model()
    idx, targets = batch(model)

    def forward_loss(idx, targets):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return model(idx, targets)

    explanation = torch._dynamo.explain(forward_loss)(idx, targets)
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_evaluation_loss_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = small_model()
    idx, targets = batch(model)
    with torch.no_grad():
        want = model(idx, targets, loss_reduction="none")
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
        torch.testing.assert_close(compiled(idx, targets, loss_reduction="none"), want)
