"""The shared fine-tuning pieces: SFT/mid batches, step planning, schedule, eval, sources."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import checkpoint as ckpt
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer
from training import finetune
from training.dataloader import sft_batches
from training.runtime import Runtime

CPU = Runtime(torch.device("cpu"), torch.float32, rank=0, local_rank=0, world_size=1)


def tiny_config(vocab_size: int, sequence_len: int = 64) -> GPTConfig:
    return GPTConfig.from_depth(2, vocab_size=vocab_size, sequence_len=sequence_len,
                                aspect_ratio=32, head_dim=32, window_pattern="SL")  # fmt: skip


def make_source_checkpoint(directory: Path, tokenizer_dir: Path, *, step: int = 0,
                           seed: int = 0, meta: dict | None = None) -> Path:  # fmt: skip
    """A random tiny GPT saved as a checkpoint, with the tokenizer copied beside it."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_config(tokenizer.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    ckpt.save_checkpoint(directory, step, model_state=model.state_dict(), model_config=config,
                         meta=meta or {})  # fmt: skip
    tokenizer.save(ckpt.tokenizer_dir(directory))
    return directory


def chat(user: str, reply, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def hand_made_conversations() -> list[dict]:
    return [
        chat("What is two plus two?", "Four."),
        chat("Name a color.", "Blue, like the sky.", system="Answer briefly."),
        chat(
            "Compute 12*7 with python.",
            [
                {"type": "text", "text": "Let me run it. "},
                {"type": "python", "text": "12*7"},
                {"type": "python_output", "text": "84"},
                {"type": "text", "text": "It is 84."},
            ],
        ),  # fmt: skip
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        },  # fmt: skip
        chat("Spell cat.", "c-a-t"),
        chat("Is water wet?", "Mostly, yes."),
        chat("Short?", "Yes."),
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus):
    return Tokenizer.load(tiny_corpus[1])


# ---- SFT packing: targets are -1 exactly where the mask is 0 or padding ----------------------


def check_rows(inputs, targets, rendered, used: list[int]) -> None:
    """Re-derive every row from the rendered conversations found at each position of it.

    `used` collects the indices of the conversations placed so far (across batches).
    """
    bos = rendered[0][0][0]
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        T = len(row_inputs)
        row_ids, row_mask = [], []
        while len(row_ids) < T:
            pos = len(row_ids)
            match = next(
                (index for index, (ids, _) in enumerate(rendered)
                 if index not in used and len(ids) <= T + 1 - pos
                 # a conversation may end in the row's last target, unseen by the inputs
                 and row_inputs[pos : pos + len(ids)] == ids[: T - pos]),
                None,
            )  # fmt: skip
            if match is None:
                break
            used.append(match)
            row_ids += rendered[match][0]
            row_mask += rendered[match][1]
        padding = T + 1 - len(row_ids)
        row_ids += [bos] * padding
        row_mask += [0] * padding
        assert row_inputs == row_ids[:T]
        assert row_targets == [row_ids[i + 1] if row_mask[i + 1] else -1 for i in range(T)]


@pytest.mark.parametrize("B,T", [(2, 48), (3, 80), (1, 200)])
def test_sft_targets_are_minus_one_exactly_where_the_mask_is_zero_or_padding(tokenizer, B, T):
    conversations = hand_made_conversations()
    rendered = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in conversations]
    assert all(len(ids) <= T + 1 for ids, _ in rendered)
    used: list[int] = []
    batches = 0
    for inputs, targets, _ in sft_batches(conversations, tokenizer, B, T, num_epochs=1):
        assert inputs.shape == targets.shape == (B, T)
        check_rows(inputs, targets, rendered, used)
        batches += 1
    assert sorted(used) == list(range(len(conversations)))  # each packed exactly once
    assert batches * B < len(conversations)  # rows really hold several conversations


def test_sft_targets_train_python_calls_but_not_their_outputs(tokenizer):
    conversation = hand_made_conversations()[2]
    inputs, targets, _ = next(sft_batches([conversation], tokenizer, 1, 64, num_epochs=1))
    trained = [t for t in targets[0].tolist() if t >= 0]
    special = tokenizer.encode_special
    assert special("<|python_start|>") in trained and special("<|python_end|>") in trained
    assert special("<|assistant_end|>") in trained
    assert special("<|output_start|>") not in trained
    assert special("<|user_start|>") not in trained
    assert tokenizer.decode(trained).count("84") == 1  # the reply's 84, not the tool output's


# ---- step planning -------------------------------------------------------------------------


def varied_conversations(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [
        chat(" ".join(words[: 1 + i % 7]) + "?", " ".join(words[: 1 + (3 * i) % 10]) * (i % 3 + 1))
        for i in range(n)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("epochs", [1, 2])
def test_counted_masked_batches_equal_what_sft_batches_yields(tokenizer, world_size, epochs):
    conversations = varied_conversations(37)
    B, T = 2, 40
    for rank in range(world_size):
        lengths = finetune.render_lengths(conversations, tokenizer, T + 1, rank, world_size)
        assert sorted(lengths) == list(range(rank, 37, world_size))
        counted = finetune.count_masked_batches(len(conversations), lengths,
                                                tokenizer.get_bos_token_id(), B, T, rank,
                                                world_size, epochs)  # fmt: skip
        real = sum(1 for _ in sft_batches(conversations, tokenizer, B, T, rank=rank,
                                          world_size=world_size, num_epochs=epochs))  # fmt: skip
        assert counted == real > 0


def test_dense_batches_cut_one_stream_of_rendered_conversations(tokenizer):
    conversations = varied_conversations(9)
    stream = []
    for c in conversations * 3:
        stream += tokenizer.render_conversation(c)[0]
    B, T = 2, 16
    batches = finetune.dense_batches(conversations, tokenizer, B, T)
    n = finetune.count_dense_batches(len(stream), B, T)
    assert n == (len(stream) - 1) // (B * T) and n > 3
    for k in range(n):
        inputs, targets, progress = next(batches)
        window = torch.tensor(stream[k * B * T : (k + 1) * B * T + 1])
        assert torch.equal(inputs.flatten(), window[:-1])
        assert torch.equal(targets.flatten(), window[1:])  # every token is a target
        assert progress["epochs"] <= 3 + 1e-9
    # A rank reads only its share: rank 1 of 2 starts with conversation 1.
    rank1 = next(finetune.dense_batches(conversations, tokenizer, 1, 4, rank=1, world_size=2))
    assert rank1[0][0].tolist() == tokenizer.render_conversation(conversations[1])[0][:4]


def test_plan_uses_epochs_gradient_accumulation_and_refuses_too_little_data(tokenizer):
    conversations = varied_conversations(40)
    stage = finetune.Stage("chat_sft", "sft", "t", "sft_checkpoints", (), "masked")
    config = {"total_batch_size": -1, "num_iterations": -1, "num_epochs": 1}
    plan = finetune.plan_steps(config, stage, conversations, tokenizer, 2, 40, CPU)
    lengths = finetune.render_lengths(conversations, tokenizer, 41)
    micro = finetune.count_masked_batches(40, lengths, tokenizer.get_bos_token_id(), 2, 40, 0, 1, 1)
    assert (plan.num_iterations, plan.grad_accum_steps, plan.source) == (micro, 1, "num_epochs")
    assert plan.epoch_tokens == sum(lengths.values())
    doubled = finetune.plan_steps({**config, "total_batch_size": 160}, stage, conversations,
                                  tokenizer, 2, 40, CPU)  # fmt: skip
    assert doubled.grad_accum_steps == 2 and doubled.num_iterations == micro // 2
    with pytest.raises(
        ValueError, match="total_batch_size: 100 tokens per step must be a multiple"
    ):
        finetune.plan_steps({**config, "total_batch_size": 100}, stage, conversations, tokenizer,
                            2, 40, CPU)  # fmt: skip
    with pytest.raises(ValueError, match="do not fill one step"):
        finetune.plan_steps({**config, "total_batch_size": 80 * 1000}, stage, conversations,
                            tokenizer, 2, 40, CPU)  # fmt: skip
    explicit = finetune.plan_steps({**config, "num_iterations": 7}, stage, [], tokenizer, 2, 40,
                                   CPU)  # fmt: skip
    assert (explicit.num_iterations, explicit.source) == (7, "num_iterations")
    dense = finetune.plan_steps(config, finetune.Stage("mid_train", "mid", "t", "m", (), "dense"),
                                conversations, tokenizer, 2, 40, CPU)  # fmt: skip
    total = sum(len(tokenizer.render_conversation(c)[0]) for c in conversations)
    assert dense.num_iterations == (total - 1) // 80


def test_malformed_conversation_is_named_by_index_and_task(tokenizer):
    from training.tasks.base import Task, TaskMixture

    class Broken(Task):
        name = "Broken"

        def num_examples(self):
            return 3

        def get_example(self, index):
            return {"messages": [{"role": "assistant", "content": "no user first"}]}

    with pytest.raises(ValueError, match=r"^conversation \d \(task Broken\): message 0 has role"):
        finetune.render_lengths(TaskMixture([Broken()]), tokenizer, 64)


# ---- schedule, eval ------------------------------------------------------------------------


def test_lr_is_flat_then_decays_linearly_to_zero_over_the_last_fifth():
    total = 100
    mults = [finetune.finetune_lr_multiplier(s, total, 0.2) for s in range(total + 1)]
    assert all(m == 1.0 for m in mults[:81])
    assert mults[90] == pytest.approx(0.5) and mults[100] == 0.0
    assert all(a > b for a, b in zip(mults[80:], mults[81:], strict=False))
    assert finetune.finetune_lr_multiplier(99, 100, 0.0) == 1.0


@pytest.mark.parametrize("budget", [2**28, 1])  # whole batches; one row per forward pass
def test_evaluate_loss_is_the_mean_over_target_tokens_and_bpb_over_text(
    tokenizer, monkeypatch, budget
):
    monkeypatch.setattr(finetune, "EVAL_LOGITS_BUDGET", budget)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(tiny_config(tokenizer.vocab_size))
    model.to_empty(device="cpu")
    model.init_weights()
    batches = list(sft_batches(hand_made_conversations(), tokenizer, 2, 48, num_epochs=1))
    result = finetune.evaluate_loss(model, iter(batches), 2, tokenizer.token_bytes(), CPU)
    inputs = torch.cat([b[0] for b in batches[:2]])
    targets = torch.cat([b[1] for b in batches[:2]])
    with torch.no_grad():
        logits = model(inputs)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                             reduction="none")  # fmt: skip
    assert result["val/loss"] == pytest.approx(losses[targets.flatten() >= 0].mean().item(),
                                               rel=1e-5)  # fmt: skip
    nbytes = tokenizer.token_bytes()[targets.flatten().clamp(min=0)] * (targets.flatten() >= 0)
    expected_bpb = (losses * (nbytes > 0)).sum().item() / (math.log(2) * nbytes.sum().item())
    assert result["val/bpb"] == pytest.approx(expected_bpb, rel=1e-5)
    assert model.training  # restored


# ---- sources ---------------------------------------------------------------------------------


def test_default_source_is_the_largest_mid_model_else_base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    stages = ("mid_checkpoints", "base_checkpoints")
    with pytest.raises(FileNotFoundError, match="source_dir: no model .* pass --source-dir"):
        finetune.resolve_source_dir("", stages)
    for tag in ("d2", "d10", "d4", "notatag"):
        (tmp_path / "base_checkpoints" / tag).mkdir(parents=True)
    assert finetune.resolve_source_dir("", stages) == tmp_path / "base_checkpoints" / "d10"
    (tmp_path / "mid_checkpoints" / "d3").mkdir(parents=True)
    assert finetune.resolve_source_dir("", stages) == tmp_path / "mid_checkpoints" / "d3"
    with pytest.raises(FileNotFoundError, match="source_dir: checkpoint directory .*nope"):
        finetune.resolve_source_dir(tmp_path / "nope", stages)


def test_check_vocab_names_the_checkpoint_and_both_sizes(tokenizer):
    with pytest.raises(ValueError) as info:
        finetune.check_vocab("/ckpt/d2", 1024, tokenizer, "/tok")
    message = str(info.value)
    assert "\n" not in message
    assert "/ckpt/d2" in message and "1024" in message and str(tokenizer.vocab_size) in message
    finetune.check_vocab("/ckpt/d2", tokenizer.vocab_size, tokenizer, "/tok")


def test_find_source_takes_the_latest_step_and_refuses_an_empty_directory(tiny_corpus, tmp_path):
    _, tokenizer_dir = tiny_corpus
    source = make_source_checkpoint(tmp_path / "d2", tokenizer_dir, step=5)
    make_source_checkpoint(source, tokenizer_dir, step=9, seed=1)
    stage = finetune.Stage("chat_sft", "sft", "t", "sft_checkpoints", (), "masked")
    config = {"source_dir": str(source), "source_step": -1, "tokenizer_dir": ""}
    loaded = finetune.find_source(config, stage)
    assert loaded.step == 9 and loaded.stage == "base"
    assert loaded.describe()["model_tag"] == "d2"
    model = loaded.load_model(CPU)
    saved, _, _ = ckpt.load_checkpoint(source, 9)
    assert model.training and all(
        torch.equal(value, saved[key]) for key, value in model.state_dict().items()
    )
    earlier = finetune.find_source({**config, "source_step": 5}, stage)
    assert earlier.step == 5
    assert not torch.equal(earlier.load_model(CPU).lm_head.weight, model.lm_head.weight)
    with pytest.raises(FileNotFoundError, match="source_dir: no checkpoint of step 7 .*5, 9"):
        finetune.find_source({**config, "source_step": 7}, stage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="source_dir: no complete checkpoint"):
        finetune.find_source({**config, "source_dir": str(tmp_path / "empty")}, stage)


def test_default_val_spec_drops_repeats():
    spec = "smoltalk, mmlu_aux,gsm8k*2,identity*2,customjson:/a/b*c.jsonl,gsm8k"
    assert (
        finetune.default_val_spec(spec)
        == "smoltalk,mmlu_aux,gsm8k,identity,customjson:/a/b*c.jsonl"
    )


def test_meta_json_of_a_saved_source_is_what_find_source_reads(tiny_corpus, tmp_path):
    _, tokenizer_dir = tiny_corpus
    source = make_source_checkpoint(tmp_path / "d2", tokenizer_dir, meta={"stage": "mid"})
    meta = json.loads(ckpt.meta_path(source, 0).read_text())
    assert meta["stage"] == "mid" and meta["model_config"]["vocab_size"] == 512
