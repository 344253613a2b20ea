"""RL: advantages, the policy-gradient loss, and short runs end to end on CPU."""

import math
import os
import socket

import pytest
import torch

from engine import checkpoint as ckpt
from tests.training.conftest import read_events
from tests.training.test_chat_eval import save_tiny_checkpoint
from training import chat_eval, chat_rl
from training.chat_rl import Rollout, advantages, policy_loss, sequence_batch
from training.optim import SMEAR_LR


@pytest.mark.parametrize(
    "rewards",
    [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0], [0.3, 0.9, -0.2]],
)
def test_advantages_are_reward_minus_mean_and_sum_to_zero(rewards):
    adv = advantages(torch.tensor(rewards))
    mean = sum(rewards) / len(rewards)
    assert adv.tolist() == pytest.approx([r - mean for r in rewards])
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)


def test_advantages_are_per_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    adv = advantages(rewards)
    assert adv.sum(dim=-1).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert adv[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: nothing to learn
    assert adv[2].tolist() == pytest.approx([-0.5, 0.5, 0.5, -0.5])


def test_policy_loss_matches_a_hand_computation_and_ignores_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss = policy_loss(logp, adv, mask)
    # -( (-2)(2) + (-3)(2) + (-0.5)(-1) + (-1)(-1) ) / 4 valid tokens
    assert loss.item() == pytest.approx(-(-4 - 6 + 0.5 + 1) / 4)
    loss.backward()
    expected_grad = torch.tensor([[0.0, -2 / 4, -2 / 4], [1 / 4, 0.0, 1 / 4]])
    assert torch.allclose(logp.grad, expected_grad)
    # Whatever sits at masked positions (even -inf or NaN) changes nothing.
    poisoned = logp.detach().clone()
    poisoned[0, 0], poisoned[1, 1] = -math.inf, math.nan
    assert policy_loss(poisoned, adv, mask).item() == pytest.approx(loss.item())
    # An explicit divisor replaces the token count (a step split over passes or ranks).
    assert policy_loss(logp, adv, mask, num_valid=8).item() == pytest.approx(loss.item() / 2)


def test_sequence_batch_trains_only_on_sampled_tokens():
    # prompt (3 tokens, mask 0), then a sampled token, two forced tool tokens, a sampled one.
    rollout = Rollout(tokens=[1, 2, 3, 10, 11, 12, 13], mask=[0, 0, 0, 1, 0, 0, 1], reward=1.0,
                      advantage=0.5)  # fmt: skip
    short = Rollout(tokens=[1, 2, 9], mask=[0, 0, 1], reward=0.0, advantage=-0.5)
    inputs, targets, mask, advs = sequence_batch([rollout, short], pad=0, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, 0, 0, 0, 0]]
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13], [-1, 9, -1, -1, -1, -1]]
    assert mask.tolist() == (targets >= 0).tolist()
    assert advs.tolist() == [0.5, -0.5]


class ParityTask:
    """A stand-in task: the reward is whether the reply has an even number of characters, so
    random replies get mixed rewards and the policy gradient is not zero."""

    name = "Parity"
    eval_type = "generative"

    def __init__(self, n: int, always: float | None = None) -> None:
        self.n, self.always = n, always

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say something number {index}."},
                             {"role": "assistant", "content": "ok"}]}  # fmt: skip

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return len(completion) % 2 == 0

    def reward(self, conversation: dict, completion: str) -> float:
        return (
            self.always
            if self.always is not None
            else float(self.evaluate(conversation, completion))
        )


def rl_args(source, out, *extra):
    return ["--config", "tiny", "--source-dir", str(source), "--checkpoint-dir", str(out / "rl"),
            "--run-dir", str(out / "run"), "--report-dir", str(out / "report"), *extra]  # fmt: skip


def test_tiny_run_on_gsm8k_writes_events_and_a_loadable_checkpoint(tiny_corpus, tmp_path):
    source = save_tiny_checkpoint(tmp_path / "sft", tiny_corpus[1], stage="sft")
    assert chat_rl.main(rl_args(source, tmp_path)) == 0
    events = read_events(tmp_path / "run")
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and events[-1]["status"] == "succeeded"
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [e["step"] for e in metrics] == [1, 2, 3]
    for event in metrics:
        values = event["values"]
        assert 0 <= values["train/reward"] <= 1 and values["train/seq_len"] > 0
        assert math.isfinite(values["train/loss"])
    assert [e["values"]["train/lr_mult"] for e in metrics] == pytest.approx([1, 2 / 3, 1 / 3])
    (evaluation,) = [e for e in events if e["type"] == "eval"]
    assert evaluation["step"] == 3
    assert 0 <= evaluation["values"]["pass@1"] <= evaluation["values"]["pass@k"] <= 1
    assert evaluation["values"]["k"] == 4
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3]
    assert "report" in types
    model, meta = ckpt.load_model(tmp_path / "rl")
    assert meta["stage"] == "rl" and meta["step"] == 3
    assert ckpt.load_tokenizer_for(tmp_path / "rl").vocab_size == model.config.vocab_size
    assert (tmp_path / "report" / "chat_rl.md").read_text().startswith("## Chat RL")


def test_mixed_rewards_update_the_model_and_equal_rewards_do_not(
    tiny_corpus, tmp_path, monkeypatch
):
    source = save_tiny_checkpoint(tmp_path / "sft", tiny_corpus[1], stage="sft")
    before, _ = ckpt.load_model(source)

    def changed(out) -> bool:
        after, _ = ckpt.load_model(out / "rl")
        pairs = zip(before.state_dict().values(), after.state_dict().values(), strict=True)
        return any(not torch.equal(a, b) for a, b in pairs)

    # Parity rewards: random replies of varied lengths get both 0 and 1.
    monkeypatch.setattr(chat_rl, "build_task", lambda name, split, **kw: ParityTask(8))
    out = tmp_path / "mixed"
    assert chat_rl.main(rl_args(source, out, "--num-iterations", "2", "--temperature", "1.5",
                                "--max-new-tokens", "12")) == 0  # fmt: skip
    metrics = [e["values"] for e in read_events(out / "run") if e["type"] == "metrics"]
    assert any(m["train/informative_frac"] > 0 for m in metrics)
    assert changed(out)

    # Every sample rewarded alike: advantages are all zero, so nothing may move.
    monkeypatch.setattr(chat_rl, "build_task",
                        lambda name, split, **kw: ParityTask(8, always=1.0))  # fmt: skip
    out = tmp_path / "equal"
    assert chat_rl.main(rl_args(source, out, "--num-iterations", "2")) == 0
    metrics = [e["values"] for e in read_events(out / "run") if e["type"] == "metrics"]
    assert [m["train/reward"] for m in metrics] == [1.0, 1.0]
    assert [m["train/loss"] for m in metrics] == [0.0, 0.0]
    assert not changed(out)


def test_missing_source_checkpoint_is_a_clear_error(tmp_path, capsys):
    args = rl_args(tmp_path / "nope", tmp_path)
    assert chat_rl.main(args) == 1
    end = read_events(tmp_path / "run")[-1]
    assert end["status"] == "failed" and "source_dir" in end["error"]
    assert "Traceback" not in capsys.readouterr().err


def test_examples_per_step_must_split_over_ranks():
    config = chat_rl.FLAGS.validate({"examples_per_step": 3, "num_iterations": 5})
    with pytest.raises(ValueError, match="examples_per_step"):
        chat_rl.plan_steps(config, 100, world_size=2)
    assert chat_rl.plan_steps(config, 100, world_size=1) == 5
    config = chat_rl.FLAGS.validate({"examples_per_step": 16, "num_epochs": 2})
    assert chat_rl.plan_steps(config, 100, world_size=1) == 12
    with pytest.raises(ValueError, match="examples_per_step"):
        chat_rl.plan_steps(config, 4, world_size=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank, ports, rl_argv, eval_argv):
    """One torchrun-like rank (gloo on CPU): the RL run, then the evaluation."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    chat_rl.build_task = lambda name, split, **kw: ParityTask(8)
    os.environ["MASTER_PORT"] = str(ports[0])
    if chat_rl.main(rl_argv) != 0:
        raise RuntimeError(f"rank {rank}: chat_rl failed")
    os.environ["MASTER_PORT"] = str(ports[1])
    if chat_eval.main(eval_argv) != 0:
        raise RuntimeError(f"rank {rank}: chat_eval failed")


def test_two_ranks_match_one_process(tiny_corpus, tmp_path, monkeypatch):
    """Examples (RL) and problems (eval) strided over 2 ranks, with the loss normalised over
    the whole step and counts all-reduced, give what one process gives."""
    source = save_tiny_checkpoint(tmp_path / "sft", tiny_corpus[1], stage="sft")

    def argvs(out):
        rl = rl_args(source, out, "--num-iterations", "2", "--temperature", "1.5",
                     "--max-new-tokens", "12", "--examples-per-step", "2")  # fmt: skip
        evaluation = ["--config", "tiny", "--checkpoint-dir", str(source), "--max-problems", "5",
                      "--tasks", "arc_easy,spelling_bee", "--max-new-tokens", "12",
                      "--run-dir", str(out / "eval")]  # fmt: skip
        return rl, evaluation

    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setattr(chat_rl, "build_task", lambda name, split, **kw: ParityTask(8))
    rl, evaluation = argvs(one)
    assert chat_rl.main(rl) == 0 and chat_eval.main(evaluation) == 0
    rl, evaluation = argvs(two)
    torch.multiprocessing.spawn(_two_rank_worker, args=([_free_port(), _free_port()], rl,
                                evaluation), nprocs=2)  # fmt: skip

    def metrics(out):
        return [e["values"] for e in read_events(out / "run") if e["type"] == "metrics"]

    a, b = metrics(one), metrics(two)
    assert [m["train/reward"] for m in a] == [m["train/reward"] for m in b]
    assert any(m["train/informative_frac"] > 0 for m in a)
    assert [m["train/loss"] for m in b] == pytest.approx([m["train/loss"] for m in a], abs=1e-5)
    model_one, _ = ckpt.load_model(one / "rl")
    model_two, _ = ckpt.load_model(two / "rl")
    # In this depth-2 model backout's "middle" layer (n_layer // 2, as nanochat) is the last one,
    # so backout only rescales the residual before the final RMSNorm, which ignores scale: its
    # gradient is zero in exact arithmetic (~6e-7 measured, rounding) and Adam normalises that
    # into full steps whose signs the two reductions' rounding picks. Its value cannot be
    # compared, but it changes nothing the model computes -- which is checked instead.
    idx = torch.randint(0, model_one.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        before = model_two(idx)
        model_two.backout_lambda.copy_(model_one.backout_lambda)
        assert torch.allclose(model_two(idx), before, rtol=1e-5, atol=1e-5)
    # The smear scalars train at a fixed LR (SMEAR_LR x init_lr_frac) from a closed gate (whose
    # first gradient is exactly zero), so allow one such step; the rest matches to rounding.
    rl_frac = chat_rl.FLAGS.validate(chat_rl.FLAGS.load_config_file("tiny"))["init_lr_frac"]
    for (name, p), q in zip(model_one.state_dict().items(), model_two.state_dict().values(),
                            strict=True):  # fmt: skip
        atol = SMEAR_LR * rl_frac if name.startswith("smear_") else 5e-5  # matrix steps ~5e-4
        assert torch.allclose(p, q, atol=atol), name

    def results(out):
        return {(e["task"], e["metric"]): (e["value"], e["details"])
                for e in read_events(out / "eval") if e["type"] == "eval_result"}  # fmt: skip

    assert results(two) == results(one)
    assert results(one)[("arc_easy", "accuracy")][1]["total"] == 5
