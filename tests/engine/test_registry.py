"""The model-family registry: names, config dicts (old checkpoints without `model` are GPTs),
and a checkpoint of each family rebuilt by `load_model` from its meta alone."""

from __future__ import annotations

import json

import pytest
import torch

from engine import checkpoint as ckpt
from engine.models import registry
from engine.models.gpt import LEGACY_FIELDS, GPTConfig


def test_every_family_is_registered_under_its_name():
    for name in registry.NAMES:
        family = registry.family(name)
        assert family.name == name and family.label
        assert "model" in {f for f in family.config_cls.__dataclass_fields__}


def test_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="model must be one of gpt, gpt2, hybrid"):
        registry.family("llama")
    with pytest.raises(ValueError, match="model must be one of"):
        registry.config_from_dict({"model": "../x", "n_layer": 2})


def test_a_config_dict_without_model_is_a_gpt():
    old = {"sequence_len": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
           "n_embd": 64, "window_pattern": "L"}  # fmt: skip
    config = registry.config_from_dict(old)
    # It also predates nanochat's 2026 model: every field added since takes its legacy value.
    assert isinstance(config, GPTConfig)
    assert config.to_dict() == {**old, "model": "gpt", **LEGACY_FIELDS}
    with pytest.raises(ValueError, match="must be 'gpt'"):
        GPTConfig(**{**old, "model": "gpt2"})


def test_fields_added_later_are_legacy_only_where_missing():
    # A dict missing the new fields is an old checkpoint's: the model it was written for. A
    # dict holding them (everything saved since) keeps them; a new GPTConfig gets nanochat's.
    base = {"sequence_len": 32, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
            "n_embd": 64, "window_pattern": "L"}  # fmt: skip
    assert LEGACY_FIELDS["smear"] is False and LEGACY_FIELDS["rotary_base"] == 10_000
    new = GPTConfig(**base)
    assert new.smear and new.backout and new.rotary_base == 100_000
    assert registry.config_from_dict(new.to_dict()) == new
    partial = registry.config_from_dict({**base, "smear": True})
    assert partial.smear and not partial.backout and partial.qk_scale == 1.0
    # Every field the dataclass has beyond the first nine has a legacy value, and vice versa.
    added = list(GPTConfig.__dataclass_fields__)[8:]
    assert added == list(LEGACY_FIELDS)
    with pytest.raises(TypeError):
        registry.config_from_dict({**base, "smear_channels": 24})


def test_a_new_checkpoint_records_every_field_and_loads_as_saved(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")  # fmt: skip
    model = registry.build_model(config)
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)  # open the gate so smear shapes the output
    ckpt.save_checkpoint(tmp_path, 3, model_state=model.state_dict(), model_config=config)
    meta = json.loads((tmp_path / "meta_000003.json").read_text())
    assert meta["model_config"] == config.to_dict()
    assert set(LEGACY_FIELDS) <= set(meta["model_config"])
    loaded, _ = ckpt.load_model(tmp_path, 3)
    assert loaded.config == config
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_a_checkpoint_written_before_families_loads_as_a_gpt(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")  # fmt: skip
    model = registry.build_model(config)
    ckpt.save_checkpoint(tmp_path, 5, model_state=model.state_dict(), model_config=config)
    meta_path = tmp_path / "meta_000005.json"
    meta = json.loads(meta_path.read_text())
    assert meta["model_config"]["model"] == "gpt"
    del meta["model_config"]["model"]  # as an older version wrote it
    meta_path.write_text(json.dumps(meta))
    loaded, _ = ckpt.load_model(tmp_path, 5)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_a_config_of_an_unknown_family_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="model_config is not a model config"):
        ckpt.save_checkpoint(tmp_path, 1, model_state={}, model_config={"model": "llama"})
