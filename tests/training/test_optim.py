"""The Muon + AdamW optimizer: orthogonalization, update rules, state, training, sharding."""

import contextlib
import io
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.models.gpt import GPT, GPTConfig
from training.optim import (
    ADAM_REFERENCE_WIDTH,
    SMEAR_LR,
    MuonAdamW,
    MuonOptions,
    build_optimizer,
    effective_groups,
    equilibrate_rows,
    muon_options_for,
    polar_express,
    renormalize,
    set_schedule,
)

LRS = {
    "embedding_lr": 0.3,
    "unembedding_lr": 0.004,
    "matrix_lr": 0.02,
    "scalar_lr": 0.5,
    "weight_decay": 0.2,
}


@pytest.fixture(autouse=True)
def one_thread():
    # These matrices are tiny: a second thread buys nothing, and on a busy 2-core machine
    # thread hand-offs made single steps 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(n_layer: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        sequence_len=32, vocab_size=256, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=64
    )
    return GPT(config)


def random_batch(seed: int, rows: int = 4, seq: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, 256, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def train_steps(model: GPT, optimizer: MuonAdamW, steps: range) -> None:
    for step in steps:
        # Schedules depend on the step, set before each step as a training loop does.
        set_schedule(optimizer, lr_mult=1 - step / 8, momentum=0.85 + 0.02 * step)
        model(*random_batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shape", [(64, 64), (48, 192), (192, 48)])
@pytest.mark.parametrize(("dtype", "leak"), [(torch.bfloat16, 0.07), (torch.float32, 1e-4)])
def test_polar_express_gives_the_polar_factor_with_singular_values_near_one(shape, dtype, leak):
    for seed in range(5):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        out = polar_express(g, dtype=dtype)
        assert out.shape == g.shape and out.dtype == g.dtype
        # Expressed in g's singular basis, the output should be diagonal: same singular
        # vectors, singular values pushed towards 1. bf16 rounding leaks up to ~0.055 off the
        # diagonal (measured, safety 1.01; fp32 leaks nothing measurable).
        in_basis = u.T @ out @ vh.T
        diag = torch.diagonal(in_basis)
        assert (in_basis - torch.diag(diag)).abs().max() < leak
        # 5 iterations bring every singular value above 1% of the Frobenius norm into
        # [0.857, 1.143] (measured); smaller ones (only a square random matrix has them)
        # stay below, but never overshoot.
        resolved = s / torch.linalg.matrix_norm(g) >= 0.01
        assert resolved.float().mean() > 0.9
        assert diag[resolved].min() > 0.85
        assert torch.linalg.svdvals(out).max() < 1.15


def test_polar_express_batches_matrices_independently():
    g = torch.randn(3, 32, 96, generator=torch.Generator().manual_seed(0))
    batched = polar_express(g)
    for i in range(3):
        torch.testing.assert_close(batched[i], polar_express(g[i]), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="matrices"):
        polar_express(torch.ones(4))


def one_muon_step(params: list[torch.Tensor], grads: list[torch.Tensor], **group) -> list:
    """Clones of `params` after one Muon step with `grads`; returns the updates p - p'."""
    clones = [p.clone().requires_grad_(True) for p in params]
    shapes = {tuple(p.shape) for p in params}
    groups = [
        {"kind": "muon", "params": [c for c in clones if tuple(c.shape) == shape], **group}
        for shape in shapes
    ]
    optimizer = MuonAdamW(groups, distributed=False)
    for clone, grad in zip(clones, grads, strict=True):
        clone.grad = grad.clone()
    optimizer.step()
    return [(p - c).detach() for p, c in zip(params, clones, strict=True)]


def test_muon_lr_grows_with_the_square_root_of_rows_over_cols():
    gen = torch.Generator().manual_seed(0)
    tall, grad = torch.randn(128, 32, generator=gen), torch.randn(128, 32, generator=gen)
    # The same problem transposed: Muon's orthogonalization and per-neuron normalization are
    # transpose-symmetric, so only the LR factor max(1, rows/cols)^0.5 = 2 tells them apart.
    # (MuonEq is not: it evens out rows, whichever side is smaller, as nanochat does.)
    tall_update, wide_update = one_muon_step(
        [tall, tall.T.contiguous()], [grad, grad.T.contiguous()], lr=0.1, weight_decay=0.0,
        equilibrate=False,
    )  # fmt: skip
    torch.testing.assert_close(tall_update, 2 * wide_update.T, rtol=1e-5, atol=1e-6)
    # Rows of an orthogonalized update have unit scale: RMS ~ 1/sqrt(cols) times the LR.
    rms = wide_update.square().mean().sqrt()
    assert 0.8 < rms / (0.1 / math.sqrt(128)) < 1.2


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_normuon_equalizes_neurons_and_keeps_the_orthogonalized_norm(shape):
    gen = torch.Generator().manual_seed(2)
    # Rows (or columns) of very different scales survive orthogonalization unevenly.
    grad = torch.randn(shape, generator=gen) * torch.logspace(-1, 1, shape[0])[:, None]
    # Without MuonEq and Muon+, which change the matrix before and after orthogonalizing
    # (tested below): this is NorMuon alone.
    (update,) = one_muon_step(
        [torch.randn(shape, generator=gen)], [grad], lr=1.0, equilibrate=False, renormalize=False
    )
    # On the first step the second moment is (1 - beta2) * this update's own mean square,
    # so every row (tall) or column (wide) of the update ends with the same norm...
    neuron_norms = update.norm(dim=1 if shape[0] >= shape[1] else 0)
    assert neuron_norms.max() / neuron_norms.min() < 1.0001
    before = polar_express(grad)
    before_norms = before.norm(dim=1 if shape[0] >= shape[1] else 0)
    assert before_norms.max() / before_norms.min() > 1.05
    # ...while the whole update keeps the orthogonalized matrix's norm (times the LR factor).
    lr_factor = max(1.0, shape[0] / shape[1]) ** 0.5
    torch.testing.assert_close(update.norm(), lr_factor * before.norm(), rtol=1e-4, atol=0)


def test_muoneq_evens_out_rows_and_muon_plus_sets_the_semi_orthogonal_norm():
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 48, 96, generator=gen) * torch.logspace(-2, 1, 48)[:, None]
    even = equilibrate_rows(u)
    row_norms = even.norm(dim=-1)
    torch.testing.assert_close(row_norms, row_norms[:, :1].expand_as(row_norms))
    # Each matrix keeps its Frobenius norm (the target is its mean row norm).
    torch.testing.assert_close(torch.linalg.matrix_norm(even), torch.linalg.matrix_norm(u))
    for shape in [(48, 96), (96, 48)]:
        out = renormalize(torch.randn(3, *shape, generator=gen))
        target = torch.full((3,), math.sqrt(min(shape)))
        torch.testing.assert_close(torch.linalg.matrix_norm(out), target)


def nanochat_muon_reference(params, grads_per_step, *, lr, wd, momentum, beta2):
    """Muon as nanochat's optim.py (`muon_step_fused`, 92d63d4) computes it in fp32, written out
    from its published math for one stack of same-shape matrices: Nesterov momentum, MuonEq,
    normalize by ||X|| x 1.01 + 1e-6, Polar Express (tall: X.mT @ X), Muon+, NorMuon variance
    reduction, cautious decay (mask >= 0), LR x max(1, rows/cols)^0.5."""
    coeffs = [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ]
    p = params.clone()
    rows, cols = p.shape[-2:]
    red_dim = -1 if rows >= cols else -2
    buf = torch.zeros_like(p)
    second = torch.zeros((*p.shape[:-2], rows, 1) if rows >= cols else (*p.shape[:-2], 1, cols))
    for g in grads_per_step:
        buf.lerp_(g, 1 - momentum)
        x = g.lerp(buf, momentum)
        target = x.norm(dim=(-2, -1), keepdim=True) / rows**0.5
        x = x * (target / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
        for a, b, c in coeffs:
            if rows > cols:
                gram = x.mT @ x
                x = a * x + x @ (b * gram + c * (gram @ gram))
            else:
                gram = x @ x.mT
                x = a * x + (b * gram + c * (gram @ gram)) @ x
        x = x * (min(rows, cols) ** 0.5 / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
        v_mean = x.square().mean(dim=red_dim, keepdim=True)
        size = x.size(red_dim)
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
        second.lerp_(v_mean, 1 - beta2)
        step = second.clamp_min(1e-10).rsqrt()
        new_norm = (v_mean * size * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        x = x * step * (v_norm / new_norm.clamp_min(1e-10))
        step_lr = lr * max(1.0, rows / cols) ** 0.5
        p = p - step_lr * x - step_lr * wd * p * ((x * p) >= 0)
    return p


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_muon_step_matches_nanochats_current_math(shape):
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(3, *shape, generator=gen)
    grads = [torch.randn(3, *shape, generator=gen) for _ in range(3)]
    expected = nanochat_muon_reference(start, grads, lr=0.02, wd=0.3, momentum=0.9, beta2=0.9)
    params = [torch.nn.Parameter(m.clone()) for m in start]
    optimizer = MuonAdamW(
        [{"kind": "muon", "params": params, "lr": 0.02, "weight_decay": 0.3,
          "momentum": 0.9, "ortho_dtype": "fp32"}]
    )  # fmt: skip
    for g in grads:
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.clone()
        optimizer.step()
    torch.testing.assert_close(torch.stack([p.detach() for p in params]), expected,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    # The defaults are nanochat's: switching any new step off changes the result. (Not for a
    # square matrix: its orthogonalized rows all have norm ~1, so NorMuon's beta2 and MuonEq
    # hardly matter there.)
    if shape[0] == shape[1]:
        return
    for legacy in ({"equilibrate": False}, {"renormalize": False}, {"beta2": 0.95},
                   {"polar_safety": 1.02}):  # fmt: skip
        other = [torch.nn.Parameter(m.clone()) for m in start]
        opt = MuonAdamW([{"kind": "muon", "params": other, "lr": 0.02, "weight_decay": 0.3,
                          "momentum": 0.9, "ortho_dtype": "fp32", **legacy}])  # fmt: skip
        for g in grads:
            for p, gi in zip(other, g, strict=True):
                p.grad = gi.clone()
            opt.step()
        assert not torch.allclose(torch.stack([p.detach() for p in other]), expected,
                                  rtol=1e-4, atol=1e-5), legacy  # fmt: skip


def test_muon_options_are_checked_and_old_checkpoints_keep_their_math():
    square = torch.nn.Parameter(torch.ones(4, 4))
    for bad, match in (({"beta2": 1.0}, "beta2"), ({"polar_safety": 0.5}, "polar_safety"),
                       ({"ortho_dtype": "fp16"}, "ortho_dtype")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            MuonAdamW([{"kind": "muon", "params": [square], "lr": 0.1, **bad}])
    # A state saved before the MuonEq/Muon+/safety/dtype keys existed resumes with the SPEC §5
    # step it was trained with, not today's defaults.
    optimizer = MuonAdamW([{"kind": "muon", "params": [square], "lr": 0.1}])
    state = optimizer.state_dict()
    for key in ("equilibrate", "renormalize", "polar_safety", "ortho_dtype"):
        del state["param_groups"][0][key]
    optimizer.load_state_dict(state)
    group = optimizer.param_groups[0]
    assert (group["equilibrate"], group["renormalize"], group["polar_safety"]) == (
        False, False, 1.02)  # fmt: skip


def test_muon_options_follow_the_flags_and_the_runs_dtype():
    assert muon_options_for({}, torch.bfloat16) == MuonOptions(ortho_dtype="bf16")
    assert muon_options_for({}, torch.float32).ortho_dtype == "fp32"
    assert muon_options_for({"muon_ortho_dtype": "bf16"}, torch.float32).ortho_dtype == "bf16"
    legacy = {"muon_beta2": 0.95, "muon_equilibrate": False, "muon_renormalize": False,
              "muon_polar_safety": 1.02}  # fmt: skip
    assert muon_options_for(legacy, None) == MuonOptions(
        beta2=0.95, equilibrate=False, renormalize=False, polar_safety=1.02, ortho_dtype="bf16"
    )


def test_cautious_weight_decay_only_touches_entries_where_update_and_weight_agree():
    gen = torch.Generator().manual_seed(1)
    param, grad = torch.randn(64, 96, generator=gen), torch.randn(64, 96, generator=gen)
    lr, wd = 0.05, 0.5
    (plain,) = one_muon_step([param], [grad], lr=lr, weight_decay=0.0)
    (decayed,) = one_muon_step([param], [grad], lr=lr, weight_decay=wd)
    agree = (plain * param) > 0
    assert 0.3 < agree.float().mean() < 0.7
    assert torch.equal(decayed[~agree], plain[~agree])
    torch.testing.assert_close(decayed[agree] - plain[agree], lr * wd * param[agree])


def test_adamw_groups_follow_torch_adam_without_weight_decay():
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(10, 6, generator=gen)
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    optimizer = MuonAdamW([{"kind": "adamw", "params": [ours], "lr": 0.01}])
    reference = torch.optim.Adam([theirs], lr=0.01, betas=(0.8, 0.95), eps=1e-10)
    for _ in range(5):
        grad = torch.randn(10, 6, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, start)


def test_build_optimizer_groups_every_parameter_once_with_scaled_lrs():
    model = tiny_gpt()
    optimizer = build_optimizer(model, **LRS, lr_scale=2.0)
    groups = {g["name"]: g for g in optimizer.param_groups}
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    width = (model.config.n_embd / ADAM_REFERENCE_WIDTH) ** -0.5
    # nanochat's setup_optimizer: (lr, betas, decoupled weight decay) per AdamW group; the
    # smear gate and the smear/backout lambdas at nanochat's fixed LR, scaled by nothing.
    expected = {
        "lm_head": (LRS["unembedding_lr"] * width * 2, (0.8, 0.96), 0.01),
        "wte": (LRS["embedding_lr"] * width * 2, (0.8, 0.995), 0.001),
        "value_embeds": (LRS["embedding_lr"] * width * 2 * 0.5, (0.8, 0.995), 0.01),
        "resid_lambdas": (LRS["scalar_lr"] * 0.01 * 2, (0.8, 0.95), 0.05),
        "x0_lambdas": (LRS["scalar_lr"] * 2, (0.96, 0.95), 0.0),
        "smear": (SMEAR_LR, (0.8, 0.95), 0.0),
    }
    adam = {name: g for name, g in groups.items() if g["kind"] == "adamw"}
    assert set(adam) == set(expected)
    for name, (lr, betas, decay) in expected.items():
        assert adam[name]["lr"] == pytest.approx(lr), name
        assert (adam[name]["betas"], adam[name]["weight_decay"], adam[name]["eps"]) == (
            betas, decay, 1e-10)  # fmt: skip
    assert groups["smear"]["lr"] == SMEAR_LR
    assert {id(p) for p in groups["smear"]["params"]} == {id(p) for p in model.smear_params()}
    assert len(groups["smear"]["params"]) == 3
    muon = [g for g in optimizer.param_groups if g["kind"] == "muon"]
    matrices = model.param_groups()["transformer_matrices"]
    assert sum(len(g["params"]) for g in muon) == len(matrices)
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon)
    assert all(g["lr"] == pytest.approx(LRS["matrix_lr"] * 2) for g in muon)
    assert all(g["beta2"] == 0.9 and g["equilibrate"] and g["renormalize"] for g in muon)
    # The SPEC §5 groups: one set of betas (x0 aside), no decay, value embeddings at full LR.
    uniform = build_optimizer(model, **LRS, lr_scale=2.0, adam_groups="uniform")
    old = {g["name"]: g for g in uniform.param_groups if g["kind"] == "adamw"}
    assert old["value_embeds"]["lr"] == pytest.approx(LRS["embedding_lr"] * width * 2)
    assert all(g["weight_decay"] == 0.0 for g in old.values())
    assert all(g["betas"] == (0.8, 0.95) for name, g in old.items() if name != "x0_lambdas")
    # The smear params land in their fixed-LR group in this mode too.
    assert old["smear"]["lr"] == SMEAR_LR
    assert {id(p) for p in old["smear"]["params"]} == {id(p) for p in model.smear_params()}
    seen = [id(p) for g in uniform.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    rows = effective_groups(optimizer)
    assert [r["name"] for r in rows] == [g["name"] for g in optimizer.param_groups]
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert rows[0]["lr"] == pytest.approx(expected["lm_head"][0])

    # A fine-tuning stage's fraction scales every group, the fixed smear LR included (a fixed
    # LR at full size against RL's small ones would swing the smear gate on noise).
    tuned = build_optimizer(model, **LRS, lr_scale=2.0, lr_frac=0.05)
    for base, frac in zip(optimizer.param_groups, tuned.param_groups, strict=True):
        assert frac["lr"] == pytest.approx(base["lr"] * 0.05), base["name"]

    set_schedule(optimizer, lr_mult=0.25, momentum=0.9, weight_decay=0.1)
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.25) for g in optimizer.param_groups)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.1 for g in muon)
    with pytest.raises(ValueError, match="momentum"):
        set_schedule(optimizer, lr_mult=1.0, momentum=1.5)


def test_bad_configuration_is_refused_with_a_clear_error():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="matrix_lr"):
        build_optimizer(model, **{**LRS, "matrix_lr": -1.0})
    with pytest.raises(ValueError, match="lr_scale"):
        build_optimizer(model, **LRS, lr_scale=0.0)
    with pytest.raises(ValueError, match="lr_frac"):
        build_optimizer(model, **LRS, lr_frac=float("nan"))
    with pytest.raises(ValueError, match="initialized"):
        build_optimizer(model, **LRS, distributed=True)
    with pytest.raises(ValueError, match="adam_groups"):
        build_optimizer(model, **LRS, adam_groups="fancy")
    square, wide = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 8))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([{"kind": "muon", "params": [square, wide], "lr": 0.1}])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([{"kind": "sgd", "params": [square], "lr": 0.1}])
    optimizer = MuonAdamW([{"kind": "muon", "params": [square], "lr": 0.1}])
    with pytest.raises(RuntimeError, match="no gradient"):
        optimizer.step()


class GPTWithANewKind(GPT):
    """A GPT whose param_groups() names a kind of parameter the optimizer has no rule for (as
    a model change adding, say, a gate would until training/optim.py learns it)."""

    def __init__(self, config):
        super().__init__(config)
        self.novel_gate = torch.nn.Parameter(torch.zeros(4))

    def param_groups(self):
        gate = self._parameters.pop("novel_gate")  # GPT's own groups check its parameters
        try:
            groups = super().param_groups()
        finally:
            self._parameters["novel_gate"] = gate
        return {**groups, "novel_gates": [gate]}


def test_a_parameter_group_without_a_rule_is_refused_not_left_unoptimized():
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"\['novel_gates'\] have no optimizer rule"):
        build_optimizer(GPTWithANewKind(config), **LRS)


def test_state_dict_round_trip_continues_identically():
    straight_model = tiny_gpt()
    straight = build_optimizer(straight_model, **LRS)
    train_steps(straight_model, straight, range(4))

    model = tiny_gpt()
    optimizer = build_optimizer(model, **LRS)
    train_steps(model, optimizer, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = tiny_gpt(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(resumed_model, **LRS)
    resumed.load_state_dict(saved["optim"])
    train_steps(resumed_model, resumed, range(2, 4))

    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_state_saved_by_another_world_size_is_refused():
    model = tiny_gpt()
    optimizer = build_optimizer(model, **LRS)
    state = optimizer.state_dict()
    state["sharding"] = {"world_size": 2, "rank": 1}
    with pytest.raises(ValueError, match="same number of processes"):
        optimizer.load_state_dict(state)


def test_tiny_gpt_learns_a_repeated_sequence():
    model = tiny_gpt()
    optimizer = build_optimizer(model, **LRS)
    motif = torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(7))
    data = torch.stack([motif.roll(shift).repeat(5)[:33] for shift in range(4)])
    losses = []
    for step in range(50):
        optimizer.set_muon_momentum(min(0.85 + step / 300, 0.95))
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # Measured: 5.54 -> 0.0036 (a 1500x drop). Memorizing an 8-token cycle is easy; the bar
    # is 50x so a broken update rule (or a sign error) cannot pass.
    assert losses[-1] < losses[0] / 50


DIST_WORLD = 2
DIST_STEPS = 3
# Uneven shards: at depth 3 the 3 c_fc matrices and 3-element scalar vectors do not divide
# the world size; at depth 1 every Muon group holds one matrix, so rank 1 owns none of it.
DIST_CASES = [(3, "reduce_scatter"), (3, "all_reduce"), (3, "auto"), (1, "reduce_scatter")]
# The same reduce-scatter path through the pre-2.13 collectives (`reduce_scatter_tensor`,
# `all_gather_into_tensor`), the ones torch 2.4-2.12 CUDA builds run with NCCL.
LEGACY_CASES = [(3, "reduce_scatter"), (1, "auto")]
NEW_COLLECTIVES = ("reduce_scatter_single", "all_gather_single")


@contextlib.contextmanager
def without_new_collectives():
    """Hide torch >= 2.13's collective names, as an older torch lacks them."""
    saved = {name: getattr(dist, name) for name in NEW_COLLECTIVES if hasattr(dist, name)}
    for name in saved:
        delattr(dist, name)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(dist, name, value)


def dist_model(n_layer: int) -> GPT:
    """A tiny GPT moved off its init, where zero output projections make most gradients 0."""
    model = tiny_gpt(n_layer)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def rank_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s half of the global batch of `step` (4 rows of 16 tokens)."""
    inputs, targets = random_batch(100 + step, rows=4, seq=16)
    rows = slice(rank * 2, rank * 2 + 2)
    return inputs[rows], targets[rows]


def state_numel(optimizer: MuonAdamW) -> int:
    return sum(
        t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )


def distributed_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=DIST_WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        result = {}
        cases = [(case, contextlib.nullcontext) for case in DIST_CASES]
        cases += [(case, without_new_collectives) for case in LEGACY_CASES]
        for (n_layer, mode), collectives in cases:
            with collectives():
                model = dist_model(n_layer)
                optimizer = build_optimizer(model, **LRS, grad_reduction=mode)
                assert optimizer.world_size == DIST_WORLD
                if mode != "auto":
                    assert optimizer.reduce_scatter == (mode == "reduce_scatter")
                for step in range(DIST_STEPS):
                    model(*rank_batch(step, rank)).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                legacy = not any(hasattr(dist, name) for name in NEW_COLLECTIVES)
            result[n_layer, mode, legacy] = {
                "params": model.state_dict(),
                "state_numel": state_numel(optimizer),
                "reduce_scatter": optimizer.reduce_scatter,
            }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_process_reference(n_layer: int) -> tuple[GPT, MuonAdamW]:
    """The same run in one process, fed the average of the per-rank gradients.

    That is the gradient the ranks reduce, (g0 + g1) / 2. A full-batch backward would sum in
    another order, and Muon's bf16 orthogonalization is ill-conditioned along tiny singular
    directions: a 1e-9 change in one gradient already moves a few weights by ~1e-3 (measured).
    """
    model = dist_model(n_layer)
    optimizer = build_optimizer(model, **LRS)
    for step in range(DIST_STEPS):
        halves = []
        for rank in range(DIST_WORLD):
            model(*rank_batch(step, rank)).backward()
            halves.append([p.grad for p in model.parameters()])
            optimizer.zero_grad(set_to_none=True)
        for p, *grads in zip(model.parameters(), *halves, strict=True):
            p.grad = sum(grads) / DIST_WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_sharded_optimizer_matches_single_process(tmp_path):
    mp.spawn(
        distributed_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=DIST_WORLD
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(DIST_WORLD)]
    references = {n_layer: single_process_reference(n_layer) for n_layer, _ in DIST_CASES}
    cases = [(*case, False) for case in DIST_CASES] + [(*case, True) for case in LEGACY_CASES]
    if not any(hasattr(dist, name) for name in NEW_COLLECTIVES):
        cases = [(*case[:2], True) for case in cases]  # this torch only has the older names
    for case in cases:
        model, optimizer = references[case[0]]
        # Every rank ends with the same full parameters, equal to one process's result
        # (measured: bit-identical here).
        for result in ranks:
            for name, value in model.state_dict().items():
                torch.testing.assert_close(result[case]["params"][name], value, atol=1e-5, rtol=0)
        if case[2]:  # the older collectives really ran the reduce-scatter path
            assert all(result[case]["reduce_scatter"] for result in ranks)
        # ZeRO: the state is split across ranks, not replicated.
        per_rank = [result[case]["state_numel"] for result in ranks]
        assert sum(per_rank) == state_numel(optimizer) and max(per_rank) < state_numel(optimizer)


def test_collectives_prefer_the_newer_names_and_fall_back_to_the_stable_ones(monkeypatch):
    from training.optim import _collectives

    def newer_rs(*args, **kwargs): ...

    def newer_ag(*args, **kwargs): ...

    monkeypatch.setattr(dist, "reduce_scatter_single", newer_rs, raising=False)
    monkeypatch.setattr(dist, "all_gather_single", newer_ag, raising=False)
    assert _collectives() == (newer_rs, newer_ag)
    monkeypatch.delattr(dist, "reduce_scatter_single")
    monkeypatch.delattr(dist, "all_gather_single")
    # torch 2.0-2.12: only these exist (NCCL and recent gloo implement them).
    assert _collectives() == (dist.reduce_scatter_tensor, dist.all_gather_into_tensor)
