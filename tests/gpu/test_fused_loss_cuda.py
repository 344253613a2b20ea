"""The fused head + soft-cap + cross-entropy equals the plain path in bf16 on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from engine.fused_loss import softcap_linear_cross_entropy
from engine.models.gpt import GPT, GPTConfig
from tests.gpu.marks import CUDA_MARKS

pytestmark = CUDA_MARKS


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def plain(hidden, weight, targets, vocab, cap=15.0):
    logits = (hidden @ weight[:vocab].t()).float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def test_fused_loss_matches_the_plain_path_in_bf16():
    """A GPU-sized case: 8192 tokens, a 32k vocabulary padded like the model's head."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, c, vocab, padded = 8192, 768, 32000, 32768
    hidden = torch.randn(n, c, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(padded, c, device="cuda", generator=gen) * 0.05).bfloat16()
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    targets[::7] = -1
    want = plain(hidden, weight, targets, vocab)
    want.backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = softcap_linear_cross_entropy(
        hidden, weight, targets, vocab_size=vocab, softcap=15.0, compute_dtype=torch.bfloat16
    )
    got.backward()
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)
    assert relative_error(hidden.grad, want_h) < 2e-2
    assert relative_error(weight.grad, want_w) < 2e-2
    assert weight.grad[vocab:].abs().sum() == 0  # padding rows get no gradient


def test_model_training_loss_and_gradients_match_the_plain_head_under_autocast():
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=256, vocab_size=4000, n_layer=2, n_head=4, n_kv_head=2, n_embd=256
    )
    model = GPT(config).cuda()
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)  # away from the tiny init
    idx = torch.randint(0, config.vocab_size, (4, 256), device="cuda")
    targets = idx.roll(-1, 1)
    targets[:, -5:] = -1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(idx, targets)  # grad enabled + targets: the fused path
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(idx)  # the plain head: fp32 capped logits
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
    )
    loss.backward()
    assert fused.item() == pytest.approx(loss.item(), rel=5e-3)
    for name in ("lm_head.weight", "transformer.wte.weight"):
        assert relative_error(fused_grads[name], model.get_parameter(name).grad) < 3e-2, name
