"""Every form of the gated delta rule equals the per-token reference (engine/ops/delta_rule.py).

Shapes, chunk sizes and lengths that do not divide the chunk, with and without an initial
state, Dk != Dv, gradients, bf16 inputs, and the prefill -> decode state hand-over.
"""

import pytest
import torch
import torch.nn.functional as F

from engine.ops.delta_rule import (
    delta_rule,
    delta_rule_chunked,
    delta_rule_naive,
    delta_rule_recurrent,
    fla_available,
)


def make_inputs(B=2, T=37, H=3, Dk=8, Dv=12, dtype=torch.float32, seed=0, state=True):
    """Inputs as the model produces them: q, k unit-norm, q scaled, g <= 0, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    q = q / Dk**0.5
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    g = -F.softplus(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64) if state else None
    cast = [x.to(dtype) for x in (q, k, v, g, beta)]
    return (*cast, None if s0 is None else s0.to(torch.float32))


@pytest.mark.parametrize("T", [1, 5, 37, 130])
@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_fp32(T, chunk, with_state):
    q, k, v, g, beta, s0 = make_inputs(T=T, state=with_state)
    o_ref, s_ref = delta_rule_naive(q, k, v, g, beta, s0)
    o, s = delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=chunk)
    assert o.shape == (2, T, 3, 12) and o.dtype == torch.float32
    assert s.shape == (2, 3, 8, 12) and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("T", [5, 37, 130])
@pytest.mark.parametrize("chunk", [4, 64])
def test_chunked_equals_naive_fp64(T, chunk):
    """In float64 the two forms are the same number to rounding: the algebra is exact."""
    q, k, v, g, beta, s0 = make_inputs(T=T, dtype=torch.float64)
    s0 = s0.double()
    o_ref, s_ref = delta_rule_naive(q, k, v, g, beta, s0)
    o, s = delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_equals_naive(T, with_state):
    q, k, v, g, beta, s0 = make_inputs(T=T, state=with_state)
    o_ref, s_ref = delta_rule_naive(q, k, v, g, beta, s0)
    before = None if s0 is None else s0.clone()
    with torch.no_grad():
        o, s = delta_rule_recurrent(q, k, v, g, beta, s0)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    if s0 is not None:
        assert torch.equal(s0, before), "the caller's state must not be modified"


def test_prefill_chunked_then_decode_recurrent_equals_one_pass():
    q, k, v, g, beta, s0 = make_inputs(T=50)
    o_full, s_full = delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=16)
    split = 37
    o_pre, state = delta_rule_chunked(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], s0, chunk_size=16
    )
    outs = [o_pre]
    with torch.no_grad():
        for t in range(split, 50):
            sl = slice(t, t + 1)
            o_t, state = delta_rule_recurrent(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], state)  # fmt: skip
            outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), o_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, s_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("T", "chunk"), [(37, 16), (9, 4), (3, 64)])
def test_chunked_gradients_match_naive(T, chunk):
    q, k, v, g, beta, s0 = make_inputs(T=T, dtype=torch.float64)
    s0 = s0.double()
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(2, T, 3, 12, generator=gen, dtype=torch.float64)
    w_s = torch.randn(2, 3, 8, 12, generator=gen, dtype=torch.float64)

    def grads(fn, **kw):
        for x in inputs:
            x.grad = None
        o, s = fn(*inputs, **kw)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        return [x.grad.clone() for x in inputs]

    want = grads(delta_rule_naive)
    got = grads(delta_rule_chunked, chunk_size=chunk)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=f"grad of {name}")


def test_chunked_gradients_fp32_close():
    q, k, v, g, beta, s0 = make_inputs(T=70)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]

    def grads(fn, **kw):
        for x in inputs:
            x.grad = None
        o, s = fn(*inputs, s0, **kw)
        (o.square().sum() + s.sum()).backward()
        return [x.grad.clone() for x in inputs]

    for a, b in zip(grads(delta_rule_chunked, chunk_size=32), grads(delta_rule_naive), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_recurrent_is_differentiable_when_asked():
    q, k, v, g, beta, s0 = make_inputs(T=6, dtype=torch.float64)
    v = v.requires_grad_()
    o, s = delta_rule_recurrent(q, k, v, g, beta, s0)
    (o.sum() + s.sum()).backward()
    v_ref = v.detach().clone().requires_grad_()
    o_ref, s_ref = delta_rule_naive(q, k, v_ref, g, beta, s0)
    (o_ref.sum() + s_ref.sum()).backward()
    torch.testing.assert_close(v.grad, v_ref.grad)


@pytest.mark.parametrize("T", [1, 37])
def test_bf16_inputs_agree_with_fp32_reference(T):
    """bf16 in, bf16 out; internally fp32, so the only error is the input and output rounding."""
    q, k, v, g, beta, s0 = make_inputs(T=T, dtype=torch.bfloat16)
    # Reference in fp32 on the very same (bf16-rounded) inputs.
    o_ref, s_ref = delta_rule_naive(*(x.float() for x in (q, k, v, g, beta)), s0)
    for fn in (delta_rule_chunked, delta_rule_recurrent, delta_rule):
        with torch.no_grad():
            o, s = fn(q, k, v, g, beta, s0)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        # The state never leaves fp32: tight. The output is one bf16 rounding away.
        torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(o.float(), o_ref, atol=1e-3, rtol=2**-8)


def test_dispatcher_picks_recurrent_for_decode_and_chunked_otherwise():
    assert not fla_available("cpu")
    q, k, v, g, beta, s0 = make_inputs(T=1)
    with torch.no_grad():
        assert torch.equal(delta_rule(q, k, v, g, beta, s0)[0], delta_rule_recurrent(q, k, v, g, beta, s0)[0])  # fmt: skip
    q, k, v, g, beta, s0 = make_inputs(T=20)
    o, s = delta_rule(q, k, v, g, beta, s0, chunk_size=8)
    o2, s2 = delta_rule_chunked(q, k, v, g, beta, s0, chunk_size=8)
    assert torch.equal(o, o2) and torch.equal(s, s2)


def test_empty_sequence_returns_the_initial_state():
    q, k, v, g, beta, s0 = make_inputs(T=0)
    for fn in (delta_rule_naive, delta_rule_chunked, delta_rule_recurrent):
        o, s = fn(q, k, v, g, beta, s0)
        assert o.shape == (2, 0, 3, 12)
        torch.testing.assert_close(s, s0)


@pytest.mark.parametrize(
    ("arg", "bad", "match"),
    [
        ("k", torch.zeros(2, 5, 3, 7), "k must"),
        ("v", torch.zeros(2, 4, 3, 12), "v must"),
        ("g", torch.zeros(2, 5, 3, 1), "g must"),
        ("beta", torch.zeros(2, 5), "beta must"),
        ("initial_state", torch.zeros(2, 3, 12, 8), "initial_state must"),
    ],
)
def test_shape_errors_name_the_argument(arg, bad, match):
    q, k, v, g, beta, s0 = make_inputs(T=5)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=s0)
    args[arg] = bad
    for fn in (delta_rule_naive, delta_rule_chunked, delta_rule_recurrent, delta_rule):
        with pytest.raises(ValueError, match=match):
            fn(**args)
