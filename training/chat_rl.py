"""Reinforcement learning on GSM8K-style problems: an SFT model learns from its own samples.

    python -m training.chat_rl --config demo-cpu
    torchrun --standalone --nproc_per_node=8 -m training.chat_rl --config speedrun

Per step, every training example gets `num_samples` replies sampled from the current model
(temperature 1, top-k 50, the prompt prefilled once and shared by its samples). The task grades
each reply (reward 1/0 for the right `#### <n>` answer); a reply's advantage is its reward minus
the mean reward of its example's replies, so the model is pushed towards the replies that beat
its own average on that problem and away from the others, and a problem it always (or never)
solves teaches nothing. The loss is plain REINFORCE: -sum(log p(token) * advantage) over the
tokens the model sampled, divided by their number -- no KL penalty, no ratio clipping, one
update per batch of samples, so the samples are always on-policy. Prompt tokens and tool
output forced in by the calculator are not the model's choices and are left out.

LRs start at `init_lr_frac` of the base values (the model is already trained; RL only nudges it)
and decay linearly to 0. Every `eval_every` steps pass@1 and pass@k on the test split say
whether the nudging helps.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.models.base import LanguageModel
from engine.tokenizer import Tokenizer
from training.chat_eval import (
    MAX_TEMPERATURE,
    fit_prompt,
    generate_samples,
    prompt_limit,
    task_source_flags,
)
from training.checkpoints import (
    checkpoint_flags,
    load_checked,
    resolve_output,
    resolve_source_dir,
    save_tokenizer_copy,
)
from training.events import EventWriter
from training.flags import (
    MAX_EPOCHS,
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_VOCAB,
    Flag,
    FlagSet,
    format_config,
    output_flags,
)
from training.loop import due, format_duration, model_metrics, save_training_checkpoint
from training.optim import (
    MAX_LR_FRAC,
    MAX_WEIGHT_DECAY,
    build_for,
    effective_groups,
    lr_flags,
    recipe_flags,
    set_schedule,
)
from training.program import cancel_on_sigterm, program_main
from training.report import model_lines, write_section
from training.runtime import Runtime, runtime_flags
from training.tasks.registry import build_task

FLAGS = FlagSet(
    "chat_rl",
    configs="chat_rl",
    description="Improve an SFT chat model on GSM8K with REINFORCE on its own samples.",
    flags=[
        # source and task
        Flag(
            "source_dir",
            str,
            "",
            "SFT checkpoint directory (default: largest model in <NANOCHAT_HOME>/sft_checkpoints)",
            path=True,
        ),
        Flag("source_step", int, -1, "SFT checkpoint step (-1: the latest)", min=-1, max=MAX_STEPS),
        Flag("task", str, "gsm8k", "the task to learn (its train split; test split for evals)"),
        *task_source_flags(),
        # sampling
        Flag(
            "num_samples",
            int,
            16,
            "replies sampled per example (and k of pass@k)",
            min=1,
            max=MAX_ROWS,
        ),
        Flag("max_new_tokens", int, 256, "longest sampled reply in tokens", min=1, max=MAX_SEQ_LEN),
        Flag("temperature", float, 1.0, "sampling temperature", min=0, max=MAX_TEMPERATURE),
        Flag(
            "top_k", int, 50, "sample among the k likeliest tokens (0: off)", min=0, max=MAX_VOCAB
        ),
        Flag(
            "generation_rows",
            int,
            64,
            "rows decoded together (>= num_samples)",
            min=1,
            max=MAX_ROWS,
        ),
        # horizon and batch
        Flag(
            "examples_per_step",
            int,
            16,
            "training examples per step, over all ranks",
            min=1,
            max=MAX_ROWS,
        ),
        Flag(
            "num_epochs",
            int,
            1,
            "passes over the train split (when num_iterations is -1)",
            min=1,
            max=MAX_EPOCHS,
        ),
        Flag(
            "num_iterations",
            int,
            -1,
            "optimizer steps (-1: from num_epochs)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "device_batch_size",
            int,
            8,
            "sampled sequences per forward/backward pass",
            min=1,
            max=MAX_ROWS,
        ),
        # optimization
        *recipe_flags(),
        *lr_flags(embedding_lr=0.2, unembedding_lr=0.004),
        Flag("weight_decay", float, 0.0, "Muon cautious weight decay", min=0, max=MAX_WEIGHT_DECAY),
        Flag(
            "init_lr_frac",
            float,
            0.05,
            "every LR starts at this fraction of its base value",
            min=0,
            max=MAX_LR_FRAC,
        ),
        # evaluation and checkpoints
        Flag(
            "eval_every",
            int,
            60,
            "steps between pass@k evaluations (<= 0: only at the end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "eval_examples",
            int,
            400,
            "test problems per evaluation (-1: all)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "save_every",
            int,
            60,
            "steps between checkpoints (<= 0: only at the end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag("log_every", int, 1, "print a log line every N steps", min=1, max=MAX_STEPS),
        # runtime and paths
        *runtime_flags("random seed (sampling and example order)"),
        *checkpoint_flags("rl_checkpoints"),
        *output_flags(),
    ],
)


# Evaluation samples draw from seeds far from the training ones (seed * 1_000_003 + example).
EVAL_SEED_OFFSET = 10**15


# ---- the pure pieces ------------------------------------------------------------------------


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each reward minus the mean reward of its example's samples (the last dimension).

    rewards: (num_samples,) for one example or (examples, num_samples). The mean of an
    example's own samples is the baseline: it removes what the problem's difficulty alone
    explains, and the advantages of one example always sum to zero.
    """
    rewards = rewards.float()
    return rewards - rewards.mean(dim=-1, keepdim=True)


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_valid: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE: -sum(logp * advantage) over the masked-in tokens / the number of such tokens.

    logp and mask: (B, T), the log-probability of each target token and 1 where it was sampled
    by the model (0: prompt, forced tool output, padding); advantages: (B,), one per sequence.
    `num_valid` overrides the divisor (a step split into several passes, or over several ranks,
    divides every part by the whole step's count so that the parts add up).
    """
    mask = mask.to(logp.dtype)
    if num_valid is None:
        num_valid = mask.sum().clamp(min=1)
    weighted = logp * advantages.to(logp.dtype)[:, None] * mask
    # where(): a masked-out position whose logp is -inf or NaN must not poison the sum.
    weighted = torch.where(mask > 0, weighted, torch.zeros_like(weighted))
    return -weighted.sum() / num_valid


# ---- rollouts -------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One sampled reply as a training sequence: prompt + reply tokens, and per token whether
    the model chose it (1) or not (prompt, tool output: 0)."""

    tokens: list[int]
    mask: list[int]
    reward: float
    advantage: float = 0.0
    generated: int = 0


def rollouts(
    model: LanguageModel,
    tokenizer: Tokenizer,
    task: Any,
    conversations: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    config: Mapping[str, Any],
) -> list[list[Rollout]]:
    """`num_samples` graded replies per conversation, with advantages filled in."""
    limit = prompt_limit(model, config["max_new_tokens"])
    prompts = [fit_prompt(tokenizer.render_for_completion(dict(c)), limit) for c in conversations]
    samples = generate_samples(
        model, tokenizer, prompts, num_samples=config["num_samples"],
        max_new_tokens=config["max_new_tokens"], temperature=config["temperature"],
        top_k=config["top_k"] or None, max_rows=config["generation_rows"], seeds=seeds,
    )  # fmt: skip
    groups = []
    for conversation, prompt, replies in zip(conversations, prompts, samples, strict=True):
        group = [
            Rollout(
                tokens=prompt + s.tokens,
                mask=[0] * len(prompt) + s.masks,
                reward=float(task.reward(dict(conversation), s.text)),
                generated=len(s.tokens),
            )
            for s in replies
        ]
        adv = advantages(torch.tensor([r.reward for r in group]))
        for rollout, a in zip(group, adv.tolist(), strict=True):
            rollout.advantage = a
        groups.append(group)
    return groups


def sequence_batch(
    rollouts: Sequence[Rollout], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask, advantages) for a pass: next-token pairs padded on the right.

    Targets are -1 where the model did not choose the token (the cross-entropy skips them)."""
    width = max(len(r.tokens) for r in rollouts) - 1
    inputs = torch.full((len(rollouts), width), pad, dtype=torch.long)
    targets = torch.full((len(rollouts), width), -1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        n = len(r.tokens) - 1
        inputs[i, :n] = torch.tensor(r.tokens[:-1])
        target = torch.tensor(r.tokens[1:])
        chosen = torch.tensor(r.mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(chosen, target, -1)
    advs = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
    mask = targets >= 0
    return inputs.to(device), targets.to(device), mask.to(device), advs.to(device)


# ---- evaluation -----------------------------------------------------------------------------


def pass_at_k(
    model: LanguageModel,
    tokenizer: Tokenizer,
    task: Any,
    runtime: Runtime,
    config: Mapping[str, Any],
) -> dict[str, float]:
    """pass@1 (the mean fraction of correct samples) and pass@k (any of k correct) on `task`,
    k = num_samples, this rank's problems rank, rank + world, ...; all-reduced."""
    indices = range(runtime.rank, len(task), runtime.world_size)
    conversations = [task[i] for i in indices]
    k = config["num_samples"]
    fraction, anyone = 0.0, 0
    if conversations:
        limit = prompt_limit(model, config["max_new_tokens"])
        prompts = [fit_prompt(tokenizer.render_for_completion(dict(c)), limit)
                   for c in conversations]  # fmt: skip
        samples = generate_samples(
            model, tokenizer, prompts, num_samples=k, max_new_tokens=config["max_new_tokens"],
            temperature=config["temperature"], top_k=config["top_k"] or None,
            max_rows=config["generation_rows"], seeds=[EVAL_SEED_OFFSET + config["seed"] + i for i in indices],
        )  # fmt: skip
        for conversation, replies in zip(conversations, samples, strict=True):
            correct = [bool(task.evaluate(dict(conversation), s.text)) for s in replies]
            fraction += sum(correct) / k
            anyone += any(correct)
    totals = torch.tensor([fraction, anyone, len(conversations)], dtype=torch.float64,
                          device=runtime.device)  # fmt: skip
    runtime.all_reduce_sum(totals)
    fraction, anyone, count = totals.tolist()
    if count == 0:
        raise ValueError("eval_examples: the test split gave no problems to evaluate")
    return {"pass@1": fraction / count, "pass@k": anyone / count, "k": k, "problems": int(count)}


# ---- the program ----------------------------------------------------------------------------


def resolve_paths(config: Mapping[str, Any]) -> dict[str, Path]:
    """The SFT checkpoint to start from (default: the largest model) and where ours go."""
    source = resolve_source_dir(config["source_dir"], ("sft_checkpoints",))
    _, target = resolve_output(config, "rl_checkpoints", source)
    return {"source_dir": source, "checkpoint_dir": target}


def plan_steps(config: Mapping[str, Any], train_len: int, world_size: int) -> int:
    """The number of optimizer steps; ValueError naming the flag at fault."""
    per_step = config["examples_per_step"]
    if per_step % world_size:
        raise ValueError(
            f"examples_per_step: {per_step} must be a multiple of the number of processes "
            f"({world_size})"
        )
    if config["num_samples"] > config["generation_rows"]:
        raise ValueError(
            f"generation_rows: {config['generation_rows']} rows cannot hold "
            f"num_samples={config['num_samples']}"
        )
    if train_len == 0:
        raise ValueError(f"task: the train split of {config['task']} is empty")
    if config["num_iterations"] > 0:
        return config["num_iterations"]
    if config["num_iterations"] == 0:
        raise ValueError("num_iterations: must be positive, or -1 to use num_epochs")
    steps = config["num_epochs"] * train_len // per_step
    if steps < 1:
        raise ValueError(
            f"examples_per_step: {per_step} is more than {config['num_epochs']} epoch(s) of the "
            f"{train_len} training examples; lower it or raise num_epochs"
        )
    return steps


def example_order(train_len: int, epoch: int, seed: int) -> list[int]:
    """A fixed shuffle of the train split per epoch (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(train_len, generator=generator).tolist()


def train(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    paths = resolve_paths(config)
    model, tokenizer, source_meta = load_checked(
        paths["source_dir"], config["source_step"], runtime, "source_dir"
    )
    source_kwargs = {"source": config["task_source"], "cache_dir": config["task_cache_dir"] or None}
    train_task = build_task(config["task"], "train", **source_kwargs)
    eval_slice = {} if config["eval_examples"] < 0 else {"stop": config["eval_examples"]}
    eval_task = build_task(config["task"], "test", **source_kwargs, **eval_slice)
    total = plan_steps(config, len(train_task), runtime.world_size)
    per_rank = config["examples_per_step"] // runtime.world_size

    # The recipe the model was trained with (--optimizer): any family's parameter groups. RL's
    # batch is counted in examples, not tokens, so no batch scaling (nanochat's RL has none);
    # every LR, the smear group's fixed one included, is init_lr_frac of the base's.
    optimizer = build_for(model, config, weight_decay=config["weight_decay"],
                          lr_frac=config["init_lr_frac"], compute_dtype=runtime.dtype)  # fmt: skip
    # The LR logged: the matrices' (Muon's), else the first group's (the adamw recipe).
    lr_group = next((g for g in optimizer.param_groups if g["kind"] == "muon"),
                    optimizer.param_groups[0])  # fmt: skip
    if runtime.master:
        save_tokenizer_copy(tokenizer, paths["checkpoint_dir"])
    derived = {
        "model_config": model.config.to_dict(),
        "parameters": model.num_scaling_params(),
        "source_step": source_meta.get("step"),
        "num_iterations": total,
        "train_examples": len(train_task),
        "eval_examples": len(eval_task),
        "examples_per_rank": per_rank,
        "optimizer": {"lr_frac": config["init_lr_frac"], "groups": effective_groups(optimizer)},
        "dtype": str(runtime.dtype).removeprefix("torch."),
        **{k: str(v) for k, v in paths.items()},
    }
    runtime.print(format_config(config))
    runtime.print(json.dumps(derived, indent=2))
    events.start(config, total_steps=total, world_size=runtime.world_size,
                 device=str(runtime.device), program="chat_rl", derived=derived)  # fmt: skip

    pad = tokenizer.get_bos_token_id()
    train_len = len(train_task)
    orders: dict[int, list[int]] = {}
    last_eval: dict[str, float] = {}
    first_eval: dict[str, float] = {}
    rewards_seen: list[float] = []
    started = time.time()
    step = 0
    model.train()
    while True:
        last = step == total
        if due(step, config["eval_every"], total):
            model.eval()
            last_eval = pass_at_k(model, tokenizer, eval_task, runtime, config)
            first_eval = first_eval or last_eval
            model.train()
            runtime.print(f"step {step:05d} | pass@1 {last_eval['pass@1']:.4f} | "
                          f"pass@{last_eval['k']} {last_eval['pass@k']:.4f}")  # fmt: skip
            events.eval(step, last_eval)
        if last or (config["save_every"] > 0 and step > 0 and step % config["save_every"] == 0):
            meta = {"stage": "rl", "user_config": config, "derived": derived, "val_bpb": None,
                    "source_dir": str(paths["source_dir"]), "eval": last_eval}  # fmt: skip
            save_training_checkpoint(runtime, events, paths["checkpoint_dir"], step, model,
                                     None, meta)  # fmt: skip
        if last:
            break

        runtime.synchronize()
        t0 = time.perf_counter()
        # This step's examples: positions step*E .. step*E + E - 1 of the shuffled epochs;
        # rank r takes every world_size-th of them.
        positions = [step * config["examples_per_step"] + j
                     for j in range(runtime.rank, config["examples_per_step"],
                                    runtime.world_size)]  # fmt: skip
        for p in positions:
            epoch = p // train_len
            if epoch not in orders:
                orders[epoch] = example_order(train_len, epoch, config["seed"])
        indices = [orders[p // train_len][p % train_len] for p in positions]
        conversations = [train_task[i] for i in indices]
        seeds = [config["seed"] * 1_000_003 + p for p in positions]
        model.eval()
        groups = rollouts(model, tokenizer, train_task, conversations, seeds, config)
        model.train()
        flat = [r for group in groups for r in group]

        # One division for the whole step (all passes, all ranks): the parts add up to the loss.
        stats = torch.tensor(
            [sum(sum(r.mask[1:]) for r in flat), sum(r.reward for r in flat), len(flat),
             sum(r.generated for r in flat), sum(r.advantage != 0 for r in flat)],
            dtype=torch.float64, device=runtime.device,
        )  # fmt: skip
        runtime.all_reduce_sum(stats)
        valid, reward_sum, count, generated, informative = stats.tolist()
        # Gradients are averaged over ranks by the optimizer, hence the world_size factor.
        divisor = max(valid, 1.0) / runtime.world_size
        loss_sum = torch.zeros((), device=runtime.device)
        # Sequences whose advantage is 0 contribute nothing to the gradient: skip them.
        useful = [r for r in flat if r.advantage != 0]
        if informative > 0:
            if not useful:  # other ranks learn this step: take part with a zero gradient
                useful = [Rollout(tokens=flat[0].tokens, mask=flat[0].mask, reward=0.0)]
            for start in range(0, len(useful), config["device_batch_size"]):
                chunk = useful[start : start + config["device_batch_size"]]
                inputs, targets, mask, advs = sequence_batch(chunk, pad, runtime.device)
                with runtime.autocast():
                    nll = model(inputs, targets, loss_reduction="none")
                loss = policy_loss(-nll.float(), advs, mask, num_valid=divisor)
                loss.backward()
                loss_sum += loss.detach()
            lr_mult = 1.0 - step / total
            set_schedule(optimizer, lr_mult=lr_mult)
            optimizer.step()
        else:
            lr_mult = 1.0 - step / total
        model.zero_grad(set_to_none=True)
        step += 1
        runtime.all_reduce_sum(loss_sum)
        runtime.synchronize()
        dt = time.perf_counter() - t0
        mean_reward = reward_sum / max(count, 1)
        rewards_seen.append(mean_reward)
        values = {
            "train/reward": mean_reward,
            "train/loss": loss_sum.item() / runtime.world_size,
            "train/lr": lr_group["initial_lr"] * lr_mult,
            "train/lr_mult": lr_mult,
            "train/seq_len": generated / max(count, 1),
            "train/informative_frac": informative / max(count, 1),
            "train/step_ms": dt * 1000,
            "train/progress": step / total,
        }
        if informative > 0:  # the family's own values (a MoE's load) of this step's update
            values.update(model_metrics(model, optimizer))
        events.metrics(step, values)
        if step % config["log_every"] == 0 or step == total:
            runtime.print(
                f"step {step:05d}/{total:05d} | reward {mean_reward:.4f} | "
                f"loss {values['train/loss']:+.5f} | len {values['train/seq_len']:.0f} | "
                f"lrm {lr_mult:.3f} | dt {dt * 1000:.0f}ms"
            )

    summary = {
        "steps": total,
        "mean_reward_first": rewards_seen[0] if rewards_seen else None,
        "mean_reward_last": rewards_seen[-1] if rewards_seen else None,
        "first_eval": first_eval,
        "last_eval": last_eval,
        "wall_time_sec": time.time() - started,
    }
    runtime.print(f"done: {total} steps in {format_duration(summary['wall_time_sec'])}")
    markdown = report_markdown(config, paths, summary, derived)
    events.report("Chat RL", markdown)
    if runtime.master:
        write_section(config["report_dir"] or None, "chat_rl", markdown)
    return summary


def report_markdown(
    config: Mapping[str, Any],
    paths: Mapping[str, Path],
    summary: dict,
    derived: Mapping[str, Any] | None = None,
) -> str:
    lines = [
        "## Chat RL",
        f"- source: {paths['source_dir']}",
        *(model_lines(derived["model_config"], derived.get("parameters")) if derived else []),
        f"- task: {config['task']} ({config['task_source']})",
        f"- steps: {summary['steps']}, {config['examples_per_step']} examples x "
        f"{config['num_samples']} samples per step",
        f"- LR fraction: {config['init_lr_frac']} (linear decay to 0)",
    ]
    if summary["mean_reward_first"] is not None:
        lines.append(f"- mean reward: first step {summary['mean_reward_first']:.4f}, "
                     f"last step {summary['mean_reward_last']:.4f}")  # fmt: skip
    evals = [("before", "first_eval"), ("after", "last_eval")]
    if summary["first_eval"] is summary["last_eval"]:  # evaluated once, at the end
        evals = [("", "last_eval")]
    for label, key in evals:
        result = summary[key]
        if result:
            lines.append(f"- test{' ' + label if label else ''}: pass@1 {result['pass@1']:.4f}, "
                         f"pass@{result['k']} {result['pass@k']:.4f} "
                         f"({result['problems']} problems)")  # fmt: skip
    lines.append(f"- wall time: {format_duration(summary['wall_time_sec'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, train, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
