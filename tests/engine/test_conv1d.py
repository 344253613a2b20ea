"""The causal depthwise conv1d forms equal the reference (engine/ops/conv1d.py)."""

import pytest
import torch

from engine.ops.conv1d import (
    causal_conv1d,
    causal_conv1d_naive,
    causal_conv1d_step,
    causal_conv_available,
)


def make(B=2, T=11, C=6, K=4, dtype=torch.float32, seed=0, bias=True, state=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen).to(dtype)
    w = (torch.randn(C, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype) if bias else None
    s = torch.randn(B, C, K - 1, generator=gen).to(dtype) if state else None
    return x, w, b, s


def by_hand(x, w, b, s, activation):
    """The definition, one output at a time: y_t = act(b + Σ_i w_i x_{t-K+1+i})."""
    B, T, C = x.shape
    K = w.shape[1]
    hist = torch.zeros(B, C, K - 1, dtype=torch.float64) if s is None else s.double()
    xs = torch.cat([hist, x.double().transpose(1, 2)], dim=-1)
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        for i in range(K):
            y[:, t] += w[:, i].double() * xs[:, :, t + i]
    if b is not None:
        y += b.double()
    return torch.nn.functional.silu(y) if activation else y


@pytest.mark.parametrize("T", [1, 2, 3, 11, 64])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", [False, True])
def test_fast_and_naive_equal_the_definition(T, activation, bias, state):
    x, w, b, s = make(T=T, bias=bias, state=state)
    want = by_hand(x, w, b, s, activation).float()
    for fn in (causal_conv1d_naive, causal_conv1d):
        y, final = fn(x, w, b, activation=activation, initial_state=s)
        assert y.shape == x.shape and y.dtype == x.dtype
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        assert final.shape == (2, 6, 3)


@pytest.mark.parametrize("T", [0, 1, 2, 3, 5])
def test_final_state_is_the_last_k_minus_1_inputs_including_the_initial_state(T):
    x, w, b, s = make(T=T, state=True)
    expected = torch.cat([s, x.transpose(1, 2)], dim=-1)[:, :, -3:]
    for fn in (causal_conv1d_naive, causal_conv1d):
        _, final = fn(x, w, b, initial_state=s)
        torch.testing.assert_close(final, expected)
    # Without an initial state the missing history is zeros.
    _, final = causal_conv1d(x, w, b)
    zeros_then_x = torch.cat([torch.zeros_like(s), x.transpose(1, 2)], dim=-1)[:, :, -3:]
    torch.testing.assert_close(final, zeros_then_x)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("prefill", [0, 2, 7])
def test_prefill_then_steps_equals_the_full_convolution(activation, prefill):
    x, w, b, _ = make(T=12)
    want, want_state = causal_conv1d(x, w, b, activation=activation)
    got = []
    if prefill:
        y, state = causal_conv1d(x[:, :prefill], w, b, activation=activation)
        got.append(y)
    else:
        state = torch.zeros(2, 6, 3)
    state_ptr = state.data_ptr()
    for t in range(prefill, 12):
        got.append(causal_conv1d_step(x[:, t], state, w, b, activation=activation).unsqueeze(1))
    assert state.data_ptr() == state_ptr, "the step updates the state in place"
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, want_state)


def test_kernel_of_one_tap_has_an_empty_state():
    x, w, b, _ = make(T=5, K=1)
    y, final = causal_conv1d(x, w, b, activation=None)
    torch.testing.assert_close(y, x * w[:, 0] + b)
    assert final.shape == (2, 6, 0)
    state = torch.zeros(2, 6, 0)
    torch.testing.assert_close(causal_conv1d_step(x[:, 0], state, w, b, activation=None), y[:, 0])


def test_bf16_agrees_with_fp32_reference():
    x, w, b, s = make(T=40, dtype=torch.bfloat16, state=True)
    want, _ = causal_conv1d_naive(x.float(), w.float(), b.float(), initial_state=s.float())
    for fn in (causal_conv1d, causal_conv1d_naive):
        y, final = fn(x, w, b, initial_state=s)
        assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
        # bf16 output: one rounding (2^-8 relative) plus the fast form's bf16 accumulation.
        torch.testing.assert_close(y.float(), want, atol=1e-3, rtol=2**-6)
    state = s.clone()
    y = causal_conv1d_step(x[:, 0], state, w, b)
    torch.testing.assert_close(y.float(), want[:, 0], atol=1e-3, rtol=2**-7)


def test_gradients_flow_through_the_fast_form():
    x, w, b, s = make(T=9, state=True)
    params = [t.clone().double().requires_grad_() for t in (x, w, b, s)]
    y, final = causal_conv1d(params[0], params[1], params[2], initial_state=params[3])
    (y.sum() + final.sum()).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    y, final = causal_conv1d_naive(params[0], params[1], params[2], initial_state=params[3])
    (y.sum() + final.sum()).backward()
    for a, p in zip(grads, params, strict=True):
        torch.testing.assert_close(a, p.grad)


def test_no_cuda_kernel_on_cpu():
    assert not causal_conv_available("cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x=torch.zeros(2, 5, 7)), "x must"),
        (dict(weight=torch.zeros(6)), "weight must"),
        (dict(bias=torch.zeros(5)), "bias must"),
        (dict(initial_state=torch.zeros(2, 6, 4)), "initial_state must"),
        (dict(activation="relu"), "activation must"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    x, w, b, _ = make()
    args = dict(x=x, weight=w, bias=b, activation="silu", initial_state=None) | kwargs
    for fn in (causal_conv1d, causal_conv1d_naive):
        with pytest.raises(ValueError, match=match):
            fn(**args)
    with pytest.raises(ValueError, match="state must"):
        causal_conv1d_step(x[:, 0], torch.zeros(2, 6, 2), w, b)
