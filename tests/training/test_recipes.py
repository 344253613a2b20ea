"""The optimizer recipes a run can pick: the GPT-2 recipe (AdamW with a weight-decay split,
cosine schedule, gradient clipping) and Muon for stacks of expert matrices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from training.optim import GPT2_BETAS, GPT2_EPS, MuonAdamW, build_adamw, build_for
from training.scaling import cosine_lr_multiplier, lr_multiplier, schedule_multiplier


class Toy(nn.Module):
    """Every kind of parameter a family has: embedding, biased linear, norm gain and bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.fc(self.wte(idx)))))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 11, (4, 6), generator=gen)
    logits = model(idx)
    return nn.functional.cross_entropy(logits.view(-1, 11), idx.roll(1, 1).view(-1))


def test_adamw_groups_decay_matrices_and_embeddings_only():
    model = Toy()
    optimizer = build_adamw(model, lr=3e-4, weight_decay=0.1, distributed=False)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    none = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model.wte.weight), id(model.fc.weight), id(model.head.weight)}
    assert none == {id(model.fc.bias), id(model.norm.weight), id(model.norm.bias)}
    for group in optimizer.param_groups:
        assert group["betas"] == GPT2_BETAS and group["eps"] == GPT2_EPS and group["lr"] == 3e-4


@pytest.mark.parametrize("clip", [None, 0.05])
def test_adamw_recipe_steps_like_torch_adamw_with_clipping(clip):
    ours, reference = Toy(), Toy()
    # A large decay, so a missing or misplaced decay shows far above rounding.
    optimizer = build_adamw(ours, lr=1e-2, weight_decay=0.5, distributed=False,
                            max_grad_norm=clip)  # fmt: skip
    params = list(reference.parameters())
    torch_opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.5},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=GPT2_BETAS, eps=GPT2_EPS,
    )  # fmt: skip
    for step in range(5):
        _loss(ours, step).backward()
        _loss(reference, step).backward()
        if clip is not None:
            norm = nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()
        torch_opt.step()
        if clip is not None:
            assert optimizer.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
            assert norm.item() > clip  # the clip really acted
        ours.zero_grad()
        reference.zero_grad()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=5e-5)


def test_a_stack_of_expert_matrices_steps_like_the_matrices_one_by_one():
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(3, 16, 8))
    singles = [nn.Parameter(stack.detach()[i].clone()) for i in range(3)]
    grads = torch.randn(3, 16, 8)
    stack.grad = grads.clone()
    for i, p in enumerate(singles):
        p.grad = grads[i].clone()
    stacked = MuonAdamW([{"kind": "muon", "params": [stack], "lr": 0.02}], distributed=False)
    one_by_one = MuonAdamW([{"kind": "muon", "params": singles, "lr": 0.02}], distributed=False)
    stacked.step()
    one_by_one.step()
    for i, p in enumerate(singles):
        torch.testing.assert_close(stack.detach()[i], p.detach(), rtol=1e-4, atol=1e-5)


def test_cosine_schedule_equals_the_formula():
    total, warmup, floor = 1000, 100, 0.1

    def formula(step):
        if step < warmup:
            return (step + 1) / warmup
        if step >= total:
            return floor
        progress = (step - warmup) / (total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (0, 49, 99, 100, 325, 550, 775, 999, 1000, 1500):
        assert cosine_lr_multiplier(step, total, warmup, floor) == pytest.approx(formula(step))
    assert cosine_lr_multiplier(100, total, warmup, floor) == pytest.approx(1.0)
    assert cosine_lr_multiplier(550, total, warmup, floor) == pytest.approx((1 + floor) / 2)
    assert cosine_lr_multiplier(2000, total, warmup, floor) == floor


def test_schedule_flags_pick_linear_or_cosine():
    linear = {"warmup_ratio": 0.1, "warmdown_ratio": 0.5, "final_lr_frac": 0.0}
    for step in (0, 5, 50, 90):
        assert schedule_multiplier(linear, step, 100) == lr_multiplier(step, 100, 0.1, 0.5, 0.0)
    cosine = {**linear, "lr_schedule": "cosine", "warmup_steps": -1, "final_lr_frac": 0.1}
    # warmup_steps -1: warmup_ratio of the steps (10 of 100).
    assert schedule_multiplier(cosine, 5, 100) == cosine_lr_multiplier(5, 100, 10, 0.1)
    assert schedule_multiplier({**cosine, "warmup_steps": 3}, 5, 100) == cosine_lr_multiplier(
        5, 100, 3, 0.1
    )


def test_build_for_reads_the_recipe_flags():
    model = Toy()
    config = {"optimizer": "adamw", "adamw_lr": 1e-3, "adamw_weight_decay": 0.05,
              "grad_clip": 1.0}  # fmt: skip
    optimizer = build_for(model, config, weight_decay=0.0, lr_scale=2.0)
    assert optimizer.max_grad_norm == 1.0
    assert {g["lr"] for g in optimizer.param_groups} == {2e-3}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.05, 0.0}
    assert build_for(model, {**config, "grad_clip": 0.0}, weight_decay=0.0).max_grad_norm is None


def test_bad_clip_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        build_adamw(Toy(), lr=1e-3, weight_decay=0.1, max_grad_norm=0.0)


def test_gpt2_adamw_groups_put_biases_and_norms_at_zero_decay():
    from engine.models.gpt2 import GPT2, GPT2Config

    model = GPT2(GPT2Config(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    optimizer = build_adamw(model, lr=3e-4, weight_decay=0.1, distributed=False)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2
        assert (id(p) in decay) == is_matrix, name
        assert is_matrix or name.endswith("bias") or ".ln" in name or "ln_" in name, name
    assert {names[i] for i in decay} >= {"transformer.wte.weight", "transformer.wpe.weight"}


def test_flags_of_other_families_are_named_when_set():
    from training import base_train

    config = base_train.FLAGS.validate({"model": "hybrid", "window_pattern": "L", "dropout": 0.1})
    assert base_train.ignored_family_flags(config) == ["dropout", "window_pattern"]
    config = base_train.FLAGS.validate({"model": "gpt", "window_pattern": "L"})
    assert base_train.ignored_family_flags(config) == []


@pytest.mark.parametrize(
    ("values", "field"),
    [({"layer_pattern": "XYZ"}, "layer_pattern"), ({"experts_per_token": 9}, "experts_per_token")],
)
def test_a_bad_family_setting_is_refused_naming_its_flag(values, field):
    from training import base_train

    config = base_train.FLAGS.validate({"model": "hybrid", "num_experts": 8, **values})
    with pytest.raises(ValueError, match=rf"^{field}: "):
        base_train.plan(config, 512, 1)


def test_smear_and_backout_are_flags_that_reach_the_model_and_its_optimizer():
    from engine.models.gpt import GPT
    from training import base_train

    shape = {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 32}
    default = base_train.model_config_for(base_train.FLAGS.validate(shape), 64)
    assert (default.smear, default.backout) == (True, True)
    config = base_train.FLAGS.validate({**shape, "smear": False, "backout": False})
    plain = base_train.model_config_for(config, 64)
    assert (plain.smear, plain.backout) == (False, False)
    names = {name for name, _ in GPT(plain).named_parameters()}
    assert not {name for name in names if "smear" in name or "backout" in name}
    assert {"smear_lambda", "backout_lambda"} <= {n for n, _ in GPT(default).named_parameters()}
    assert base_train.FLAGS.parse(["--no-smear"])["smear"] is False
    # Another family does not read them: turning them off there is named, not an error.
    hybrid = base_train.FLAGS.validate({"model": "hybrid", "smear": False})
    assert base_train.ignored_family_flags(hybrid) == ["smear"]
