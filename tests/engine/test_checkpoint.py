"""engine.checkpoint: layout, round trips, dtype conversion and crash safety."""

import json

import pytest
import torch

from engine.checkpoint import (
    find_largest_model_tag,
    latest_step,
    list_steps,
    load_checkpoint,
    load_model,
    load_tokenizer_for,
    save_checkpoint,
    tokenizer_dir,
)
from engine.models.gpt import GPT, GPTConfig

CONFIG = GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def trained_looking_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def sample_input():
    return torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def save_model(directory, step, model, **meta):
    save_checkpoint(directory, step, model_state=model.state_dict(), model_config=CONFIG, meta=meta)


class FailsWhenPickled:
    """Makes torch.save fail after it has started writing, like a full disk would."""

    def __reduce_ex__(self, protocol):
        raise OSError("No space left on device")


def test_save_then_load_gives_identical_logits(tmp_path):
    model = trained_looking_model()
    save_model(tmp_path, 250, model, val_bpb=1.25, user_config={"depth": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000250.json", "model_000250.pt"]
    loaded, meta = load_model(tmp_path, device="cpu")
    assert not loaded.training
    assert meta["step"] == 250
    assert meta["val_bpb"] == 1.25
    assert meta["user_config"] == {"depth": 2}
    assert GPTConfig(**meta["model_config"]) == CONFIG
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample_input()), model(sample_input()), rtol=0, atol=0)
    torch.testing.assert_close(loaded.rotary_sin, model.rotary_sin)


def test_steps_are_listed_from_meta_files_and_latest_is_the_highest(tmp_path):
    model = trained_looking_model()
    for step in (20, 5, 1000000):
        save_model(tmp_path, step, model)
    assert list_steps(tmp_path) == [5, 20, 1000000]
    assert latest_step(tmp_path) == 1000000
    assert load_model(tmp_path, step=20)[1]["step"] == 20


def test_bf16_state_dict_loads_as_fp32_on_cpu(tmp_path):
    model = trained_looking_model()
    bf16_state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, 1, model_state=bf16_state, model_config=CONFIG)
    loaded, _ = load_model(tmp_path, device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = GPT(CONFIG).eval()
    rounded.load_state_dict({k: v.float() for k, v in bf16_state.items()})
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample_input()), rounded(sample_input()), rtol=0, atol=0)


def test_torch_compile_prefix_is_stripped(tmp_path):
    model = trained_looking_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, 3, model_state=state, model_config=CONFIG)
    loaded, _ = load_model(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_interrupted_model_write_leaves_previous_step_loadable(tmp_path):
    model = trained_looking_model()
    save_model(tmp_path, 10, model)
    before = sorted(p.name for p in tmp_path.iterdir())
    broken_state = {**model.state_dict(), "broken": FailsWhenPickled()}
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 20, model_state=broken_state, model_config=CONFIG)
    # No step 20 file of any kind, not even the hidden temp file torch.save had started.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list_steps(tmp_path) == [10]
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 10
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_model_file_without_meta_is_not_a_step(tmp_path):
    # What a crash between the model rename and the meta write leaves behind.
    model = trained_looking_model()
    save_model(tmp_path, 10, model)
    torch.save(model.state_dict(), tmp_path / "model_000030.pt")
    assert list_steps(tmp_path) == [10]
    with pytest.raises(FileNotFoundError, match="step 30"):
        load_model(tmp_path, step=30)


def test_unserialisable_meta_fails_before_writing_anything(tmp_path):
    model = trained_looking_model()
    with pytest.raises(ValueError, match="JSON"):
        save_model(tmp_path, 1, model, loader_state=object())
    assert list(tmp_path.iterdir()) == []


def test_optimizer_shards_per_rank(tmp_path):
    model = trained_looking_model()
    for rank in (0, 1):
        save_checkpoint(tmp_path, 7, optim_state={"rank": rank, "lr": [0.1, 0.2]}, rank=rank)
    assert list_steps(tmp_path) == []
    save_model(tmp_path, 7, model, loop_state={"min_val_bpb": 0.9})
    _, optim_state, meta = load_checkpoint(tmp_path, 7, load_optimizer=True, rank=1)
    assert optim_state == {"rank": 1, "lr": [0.1, 0.2]}
    assert meta["loop_state"] == {"min_val_bpb": 0.9}
    state, no_optim, _ = load_checkpoint(tmp_path)
    assert no_optim is None and "lm_head.weight" in state
    with pytest.raises(FileNotFoundError, match="rank 2"):
        load_checkpoint(tmp_path, 7, load_optimizer=True, rank=2)


def test_meta_file_is_readable_json(tmp_path):
    save_model(tmp_path, 4, trained_looking_model(), val_bpb=0.5)
    meta = json.loads((tmp_path / "meta_000004.json").read_text())
    assert meta["model_config"]["window_pattern"] == "SSSL"


def test_missing_directory_empty_directory_and_missing_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_step(tmp_path)
    save_model(tmp_path, 10, trained_looking_model())
    with pytest.raises(FileNotFoundError, match=r"step 11 .*available: \[10\]"):
        load_model(tmp_path, step=11)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_state": {}}, "model_config"),
        ({"meta": {"a": 1}, "optim_state": {}}, "only together with model_state"),
        ({}, "needs model_state"),
        ({"model_state": {}, "model_config": CONFIG, "meta": {"step": 9}}, "contradicts"),
        ({"model_state": {}, "model_config": {"n_layer": 2, "depth": 3}}, "model_config"),
    ],
)
def test_bad_save_arguments_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_checkpoint(tmp_path, 1, **kwargs)


def test_bad_step_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, optim_state={})


def test_find_largest_model_tag(tmp_path):
    for name in ("d4", "d12", "d2", "dx", "d12-old"):
        (tmp_path / name).mkdir()
    (tmp_path / "d30").write_text("a file, not a model directory")
    assert find_largest_model_tag(tmp_path) == "d12"
    with pytest.raises(FileNotFoundError, match="d<depth>"):
        find_largest_model_tag(tmp_path / "dx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_largest_model_tag(tmp_path / "missing")


def test_tokenizer_saved_beside_the_checkpoints(tmp_path):
    from engine.tokenizer import Tokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer_for(tmp_path)
    trained = Tokenizer.train(["the cat sat on the mat, the cat sat again"] * 20, vocab_size=270)
    trained.save(tokenizer_dir(tmp_path))
    loaded = load_tokenizer_for(tmp_path)
    assert loaded.vocab_size == 270
    assert loaded.decode(loaded.encode("the cat sat")) == "the cat sat"
