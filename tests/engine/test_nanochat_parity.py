"""Our GPT against karpathy's nanochat GPT itself: same logits, loss, gradients and init.

nanochat's own `nanochat/gpt.py` is imported from a source checkout named by NANOCHAT_SRC
(the folder holding `nanochat/`); without it the tests are skipped. To get one at the commit
this model follows (92d63d4):

    git -C <nanochat clone> archive 92d63d4 nanochat | tar -x -C /tmp/nanochat-src
    NANOCHAT_SRC=/tmp/nanochat-src .venv/bin/python -m pytest -q tests/engine/test_nanochat_parity.py

Nothing is stubbed: on a CPU nanochat computes in fp32 (NANOCHAT_DTYPE=float32 is set before
its import so a CUDA machine does too) and its flash_attention module falls back to PyTorch's
SDPA, as ours does. Its imports need only torch and filelock.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.models import registry
from engine.models.gpt import GPT, GPTConfig
from engine.models.nanochat_compat import (
    check_nanochat_config,
    config_from_nanochat,
    from_nanochat_state_dict,
    nanochat_config_kwargs,
    to_nanochat_state_dict,
)
from tests.nanochat_reference import SOURCE, import_fp32


@pytest.fixture(scope="module")
def nanochat_gpt():
    """nanochat.gpt, imported from NANOCHAT_SRC in fp32 (the test is skipped without it)."""
    if not (SOURCE and (Path(SOURCE) / "nanochat" / "gpt.py").is_file()):
        pytest.skip("set NANOCHAT_SRC to a nanochat source checkout (see the module docstring)")
    (module,) = import_fp32("nanochat.gpt")
    assert module.COMPUTE_DTYPE is torch.float32
    return module


def config(**overrides) -> GPTConfig:
    """GQA, four layers (value embeddings on 1 and 3, backout after 2), a context of 512 whose
    S window (a quarter rounded up to 128) binds at 200 tokens, and a vocabulary of 300 so
    that every padded table is padded."""
    fields = dict(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2,
                  n_embd=128, window_pattern="SSL")  # fmt: skip
    return GPTConfig(**{**fields, **overrides})


def trained_looking(model: GPT, seed: int = 1) -> GPT:
    """Every weight non-trivial: at init the zero projections make every block the identity
    and the smear gate is closed, which would hide most of the model from the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.size(1)))
            elif param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def nanochat_twin(nanochat_gpt, ours: GPT):
    """nanochat's GPT holding our model's weights."""
    theirs = nanochat_gpt.GPT(nanochat_gpt.GPTConfig(**nanochat_config_kwargs(ours.config)))
    theirs.load_state_dict(to_nanochat_state_dict(ours.state_dict(), ours.config), strict=True)
    return theirs


def tokens(batch: int, seq: int, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_same_weights_give_the_same_logits(nanochat_gpt):
    torch.manual_seed(0)
    ours = trained_looking(GPT(config())).eval()
    theirs = nanochat_twin(nanochat_gpt, ours).eval()
    assert ours.smear_lambda.item() != 0 and ours.backout_lambda.item() != 0.2
    idx = tokens(2, 200)
    with torch.no_grad():
        got, want = ours(idx), theirs(idx)
    assert got.shape == want.shape == (2, 200, 300)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not by accident: a legacy model with the same weights computes something else.
    legacy = GPT(config(smear=False, backout=False, qk_scale=1.0))
    state = {k: v for k, v in ours.state_dict().items() if "smear" not in k and "backout" not in k}
    legacy.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(legacy.eval()(idx), want, atol=1e-2)


def test_same_weights_give_the_same_loss_and_gradients(nanochat_gpt):
    torch.manual_seed(0)
    ours = trained_looking(GPT(config(window_pattern="SL")), seed=2)
    theirs = nanochat_twin(nanochat_gpt, ours)
    idx, targets = tokens(2, 160, seed=3), tokens(2, 160, seed=4)
    targets[0, :10] = -1
    # Ours trains through its fused, chunked head + loss and its own autograd functions.
    ours_loss, theirs_loss = ours(idx, targets), theirs(idx, targets)
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    ours_loss.backward()
    theirs_loss.backward()
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    mapped = to_nanochat_state_dict(ours_grads, ours.config)
    for name, param in theirs.named_parameters():
        scale = param.grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(
            mapped[name] / scale, param.grad / scale, rtol=0, atol=2e-5, msg=name
        )


def test_same_seed_gives_the_same_initial_model(nanochat_gpt):
    # Our init draws what nanochat's draws, in its order, and negates the q/k rotary halves
    # that map our rotary direction onto nanochat's: with a vocabulary that needs no padding
    # (so both tables are the same size) the same seed gives the same model, exactly.
    ours_config = config(vocab_size=320)
    torch.manual_seed(7)
    ours = registry.build_model(ours_config)
    with torch.device("meta"):
        theirs = nanochat_gpt.GPT(nanochat_gpt.GPTConfig(**nanochat_config_kwargs(ours_config)))
    theirs.to_empty(device="cpu")
    torch.manual_seed(7)
    theirs.init_weights()
    theirs_state = theirs.state_dict()
    mapped = to_nanochat_state_dict(ours.state_dict(), ours_config)
    for name, tensor in theirs_state.items():
        if tensor.is_floating_point() and name in mapped:
            assert torch.equal(mapped[name], tensor), name
    idx = tokens(2, 100, vocab=320)
    torch.testing.assert_close(ours.eval()(idx), theirs.eval()(idx), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.rotary_cos, theirs.cos[0, :, 0])
    assert torch.equal(ours.rotary_sin, theirs.sin[0, :, 0])


def test_parameter_counts_and_flops_agree(nanochat_gpt):
    ours = GPT(config(n_layer=5, window_pattern="SSSL", sequence_len=2048))
    theirs = nanochat_twin(nanochat_gpt, ours)
    counts, nano = ours.num_scaling_params(), theirs.num_scaling_params()
    for key in ("transformer_matrices", "lm_head"):
        assert counts[key] == nano[key], key
    assert counts["scalars"] + counts["smear"] == nano["scalars"]
    # nanochat pads its embedding tables too: the rows no token reaches.
    pad = ours.config.padded_vocab_size - ours.config.vocab_size
    assert nano["wte"] - counts["wte"] == pad * ours.config.n_embd
    assert ours.estimate_flops() == theirs.estimate_flops()
    assert [w for w, _ in theirs.window_sizes] == ours.window_sizes


def test_a_nanochat_checkpoint_loads_into_ours(nanochat_gpt):
    torch.manual_seed(0)
    nano_config = nanochat_gpt.GPTConfig(sequence_len=256, vocab_size=300, n_layer=3,
                                         n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")  # fmt: skip
    theirs = nanochat_gpt.GPT(nano_config)
    theirs.init_weights()
    trained_looking(theirs, seed=5)
    # As base_train saves it: the compiled model's keys.
    saved = {f"_orig_mod.{k}": v for k, v in theirs.state_dict().items()}
    values = {name: getattr(nano_config, name) for name in ("sequence_len", "vocab_size",
              "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")}  # fmt: skip
    ours_config = config_from_nanochat(values)
    ours = registry.build_empty(ours_config)
    ours.load_state_dict(from_nanochat_state_dict(saved, ours_config), strict=True)
    idx = tokens(1, 150, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx), theirs.eval()(idx), rtol=1e-5, atol=1e-5)
    # Greedy generation agrees too (nanochat's naive generate against our cached engine).
    from engine.engine import Engine

    prompt = idx[0, :20].tolist()
    want = list(theirs.generate(prompt, 15, temperature=0.0))
    got, _ = Engine(ours, None).generate_batch(prompt, max_tokens=15, temperature=0.0)
    assert got[0][len(prompt) :] == want


def test_only_nanochats_behaviour_maps():
    with pytest.raises(ValueError, match=r"smear=False \(nanochat: True\)"):
        check_nanochat_config(config(smear=False))
    with pytest.raises(ValueError, match="rotary_base=10000"):
        nanochat_config_kwargs(config(rotary_base=10_000))
    with pytest.raises(ValueError, match="unknown nanochat model_config keys: smear"):
        config_from_nanochat({"n_layer": 2, "smear": False})
    # Init fields do not change what a model computes: they may differ.
    check_nanochat_config(config(wte_init_std=1.0, gate_init_max=0.0))
