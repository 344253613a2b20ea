"""The fused, chunked head + soft-cap + cross-entropy equals the plain computation."""

import pytest
import torch
import torch.nn.functional as F

from engine.fused_loss import (
    DEFAULT_CHUNK,
    GPU_CHUNK_BYTES,
    MATMUL_ROWS,
    chunk_sizes,
    softcap_linear_cross_entropy,
)
from engine.models.gpt import GPT, GPTConfig


def plain(hidden, weight, targets, vocab, cap, reduction):
    logits = (hidden @ weight[:vocab].t()).float()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("chunk", "matmul_rows"), [(7, 1024), (7, 20), (64, 64), (1024, 1024)])
@pytest.mark.parametrize("cap", [15.0, None])
def test_loss_and_gradients_match_the_plain_path(reduction, chunk, matmul_rows, cap):
    torch.manual_seed(0)
    n, c, vocab, padded = 50, 32, 100, 128
    hidden = torch.randn(n, c, requires_grad=True)
    # Uncapped, logits ~ +-60 apart: a softmax probability underflows, the loss must not.
    weight = (torch.randn(padded, c) * (0.5 if cap else 3.0)).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = -1  # ignored positions
    expected = plain(hidden, weight, targets, vocab, cap, reduction)
    expected.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = softcap_linear_cross_entropy(hidden, weight, targets, vocab_size=vocab, softcap=cap,
                                       reduction=reduction, chunk=chunk,
                                       matmul_rows=matmul_rows)  # fmt: skip
    (got * 3).backward()  # a non-unit upstream gradient is applied too
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # Uncapped logits are ~10x larger, and so is fp32 rounding in their gradients.
    tol = {"rtol": 1e-4, "atol": 1e-6} if cap else {"rtol": 1e-3, "atol": 2e-5}
    torch.testing.assert_close(hidden.grad, 3 * want_h, **tol)
    torch.testing.assert_close(weight.grad, 3 * want_w, **tol)
    assert torch.isfinite(got)
    assert weight.grad[vocab:].abs().sum() == 0  # padding rows get no gradient


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(64, 8, requires_grad=True)
    loss = softcap_linear_cross_entropy(hidden, weight, torch.full((4,), -1), vocab_size=10,
                                        softcap=15.0)  # fmt: skip
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0


def test_model_training_loss_equals_eval_loss_and_gradients_flow():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=200, n_layer=2, n_head=2, n_kv_head=1,
                          n_embd=64))  # fmt: skip
    torch.nn.init.normal_(model.lm_head.weight, std=0.2)  # away from the tiny init
    idx = torch.randint(0, 200, (2, 32))
    targets = idx.roll(-1, 1)
    targets[:, -3:] = -1
    fused = model(idx, targets)
    with torch.no_grad():
        reference = model(idx, targets)  # no grad -> the plain path
        per_token = model(idx, targets, loss_reduction="none")
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    assert per_token[targets >= 0].mean().item() == pytest.approx(reference.item(), rel=1e-5)
    fused.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction must be"):
        softcap_linear_cross_entropy(torch.zeros(1, 2), torch.zeros(64, 2), torch.zeros(1).long(),
                                     vocab_size=2, softcap=15.0, reduction="none")  # fmt: skip


@pytest.mark.parametrize("softcap", [0.0, -1.0, 31.0])
def test_a_softcap_that_could_underflow_the_softmax_is_refused(softcap):
    with pytest.raises(ValueError, match="softcap must be None or in"):
        softcap_linear_cross_entropy(torch.zeros(1, 2), torch.zeros(64, 2), torch.zeros(1).long(),
                                     vocab_size=2, softcap=softcap)  # fmt: skip


def test_bf16_matches_the_plain_path_under_autocast():
    torch.manual_seed(1)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = (torch.randn(128, 32) * 0.5).requires_grad_()
    targets = torch.randint(0, 100, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(hidden, weight, targets, 100, 15.0, "mean")
        got = softcap_linear_cross_entropy(hidden, weight, targets, vocab_size=100, softcap=15.0,
                                           compute_dtype=torch.bfloat16, chunk=64,
                                           matmul_rows=128)  # fmt: skip
    expected.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-3)
    torch.testing.assert_close(hidden.grad, want_h, rtol=0.05, atol=1e-4)
    torch.testing.assert_close(weight.grad, want_w, rtol=0.05, atol=1e-4)


def test_chunks_stay_cpu_tuned_on_a_cpu_and_fill_a_budget_on_a_gpu():
    assert chunk_sizes("cpu", 65536) == (DEFAULT_CHUNK, MATMUL_ROWS)
    for vocab in (8192, 32768, 65536, 200_000):
        chunk, rows = chunk_sizes("cuda", vocab)
        assert chunk >= DEFAULT_CHUNK and chunk % 64 == 0 and rows % chunk == 0
        # Above the floor, a chunk's fp32 logits fit the budget and fill most of it.
        if chunk > DEFAULT_CHUNK:
            assert GPU_CHUNK_BYTES / 2 < chunk * vocab * 4 <= GPU_CHUNK_BYTES
    assert chunk_sizes("cuda", 32768) == (512, 2048)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_never_waits_for_the_gpu():
    hidden = torch.randn(600, 64, device="cuda", requires_grad=True)
    weight = torch.randn(128, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 100, (600,), device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # `int(valid.sum())` used to sync every step
    try:
        softcap_linear_cross_entropy(hidden, weight, targets, vocab_size=100, softcap=15.0,
                                     chunk=64).backward()  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiles_as_one_graph_and_matches_eager(reduction):
    # fullgraph=True fails on any graph break, such as the host read of the token count
    # (`int(valid.sum())`) this function used to do.
    torch.manual_seed(2)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = (torch.randn(64, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (40,))
    targets[::3] = -1

    def loss_fn(h, w, t):
        return softcap_linear_cross_entropy(h, w, t, vocab_size=50, softcap=15.0,
                                            reduction=reduction, chunk=8, matmul_rows=16)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, weight, targets)
    got.backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = loss_fn(hidden, weight, targets)
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_h, hidden.grad)
    torch.testing.assert_close(got_w, weight.grad)
