"""Base pretraining: a model of a given family and depth on parquet shards, from scratch or
resumed.

    python -m training.base_train --config demo-cpu
    torchrun --standalone --nproc_per_node=8 -m training.base_train --depth 20 --run-dir runs/x

One dial (`--depth`) sets the model, `--model` its family (gpt: nanochat's; gpt2; hybrid:
Qwen3-Next style, see engine/models/); `--optimizer adamw --lr-schedule cosine --grad-clip 1`
is the GPT-2 recipe, Muon (nanochat's) the default for every family. The horizon comes from
explicit iterations, a FLOPs budget or a tokens-to-parameters ratio (in that order); the batch
size and learning rates follow from the data size (training/scaling.py). Every `eval_every` steps it measures
validation bits per byte, every `sample_every` steps it writes greedy samples, and at
`save_every` and the end it saves a checkpoint that `--resume-from-step` continues exactly
(model, optimizer shards, data loader position and loop counters).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint as ckpt
from engine.models import registry
from engine.paths import data_home
from engine.tokenizer import Tokenizer
from training.checkpoints import save_tokenizer_copy
from training.dataloader import pretrain_batches
from training.events import EventWriter
from training.flags import (
    AUTO,
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_TOKENS,
    Flag,
    FlagSet,
    format_config,
    join_inside,
    output_flags,
)
from training.loop import (
    LoopState,
    StepReporter,
    due,
    eval_mode,
    format_duration,
    model_metrics,
    resource_lines,
    save_training_checkpoint,
    timing_summary,
)
from training.loss_eval import evaluate_bpb
from training.memory import (
    BatchChoice,
    choose_device_batch,
    device_batch_for,
    planning_gpu,
)
from training.memory import planned_batch as planned_device_batch
from training.optim import (
    MAX_WEIGHT_DECAY,
    build_for,
    effective_groups,
    lr_flags,
    recipe_flags,
    set_schedule,
)
from training.program import cancel_on_sigterm, program_main
from training.report import write_section
from training.runtime import Runtime, maybe_compile, runtime_flags
from training.scaling import (
    MAX_BATCH_TOKENS,
    MAX_PARAMS,
    MOMENTUM_SCHEDULES,
    SCHEDULES,
    WEIGHT_DECAY_SCALINGS,
    WEIGHT_DECAY_SCHEDULES,
    Horizon,
    OptimizerHyperparameters,
    momentum_at,
    optimizer_hyperparameters,
    plan_horizon,
    schedule_multiplier,
    weight_decay_at,
)


def family_flags() -> list[Flag]:
    """The model flags only some families read (engine/models: each family's `flags`)."""
    return [
        # gpt
        Flag("smear", bool, True, "gpt: smear gate (a gated mix of the previous token's "
             "embedding into each token)"),
        Flag("backout", bool, True, "gpt: backout (subtract a learned share of the middle "
             "layer's residual before the final norm)"),
        # gpt2
        Flag("dropout", float, 0.0, "gpt2: dropout probability", min=0, max=0.9),
        Flag("bias", bool, True, "gpt2: biases in the linear layers and norms"),
        # hybrid
        Flag("layer_pattern", str, "LLLF", "hybrid: layer kinds tiled, L=linear (gated delta "
             "rule) F=full attention", max_length=256),
        Flag("num_experts", int, 8, "hybrid: experts per MoE layer", min=1, max=1024),
        Flag("experts_per_token", int, 2, "hybrid: experts each token is routed to (top-k)",
             min=1, max=64),
        Flag("expert_dim", int, -1, "hybrid: hidden size of each expert (-1: the model width)",
             min=-1, max=65536),
        Flag("delta_chunk_size", int, 64, "hybrid: chunk of the chunked delta rule", min=1,
             max=4096),
        Flag("aux_loss_coef", float, 1e-3, "hybrid: weight of the MoE load-balancing loss",
             min=0, max=10),
    ]  # fmt: skip


FLAGS = FlagSet(
    "base_train",
    configs="base",
    description="Pretrain a base model (GPT, GPT-2 or hybrid) on parquet text shards.",
    flags=[
        # model
        Flag(
            "model",
            str,
            "gpt",
            "model family: gpt (nanochat), gpt2 (GPT-2) or hybrid "
            "(Qwen3-Next: linear + full attention, MoE)",
            choices=registry.NAMES,
        ),
        Flag("depth", int, 20, "number of transformer layers (sets the width too)", min=1, max=256),
        Flag(
            "aspect_ratio",
            int,
            64,
            "model width = depth x aspect_ratio (rounded to heads)",
            min=1,
            max=1024,
        ),
        Flag("head_dim", int, 128, "attention head size (even)", min=2, max=1024),
        Flag(
            "n_kv_head",
            int,
            -1,
            "key/value heads for GQA (-1 or 0: as many as query heads)",
            min=-1,
            max=1024,
        ),
        Flag("max_seq_len", int, 2048, "context length in tokens", min=2, max=MAX_SEQ_LEN),
        Flag(
            "window_pattern",
            str,
            "SSSL",
            "attention windows per layer, L=full S=half, tiled",
            max_length=256,
        ),
        *family_flags(),
        # horizon
        Flag(
            "num_iterations",
            int,
            -1,
            "optimizer steps (-1 or 0: from target_flops or the ratio)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag("target_flops", float, -1.0, "training FLOPs budget (<= 0: off)", min=-1, max=1e30),
        Flag(
            "target_param_data_ratio",
            float,
            12.0,
            "training tokens per scaling parameter (<= 0: off; nanochat's 12 since its 2026 "
            "scaling-law re-run, 10.5 before)",
            min=-1,
            max=1e6,
        ),
        # batch
        Flag(
            "device_batch_size",
            int,
            AUTO,
            "sequences per forward pass per process; auto (-1): the largest power of two up "
            "to 32 whose predicted step fits the GPU (the machine's memory on a CPU), with "
            "gradient accumulation keeping the total batch",
            min=1,
            max=MAX_ROWS,
            auto=AUTO,
        ),
        Flag(
            "total_batch_size",
            int,
            -1,
            "tokens per optimizer step (-1: auto from data size)",
            min=-1,
            max=MAX_BATCH_TOKENS,
        ),
        # optimization
        *recipe_flags(),
        *lr_flags(),
        Flag(
            "weight_decay",
            float,
            0.28,
            "Muon cautious weight decay at the d12 reference (scaled by weight_decay_scaling)",
            min=0,
            max=MAX_WEIGHT_DECAY,
        ),  # fmt: skip
        Flag(
            "weight_decay_scaling",
            str,
            "batch_data",
            "batch_data: x sqrt(batch / 2^19) x (d12's scaling params / the model's) "
            "(nanochat); depth: x (12 / depth)^2 (before issue 19); none",
            choices=WEIGHT_DECAY_SCALINGS,
        ),
        Flag(
            "weight_decay_schedule",
            str,
            "cosine",
            "Muon weight decay to 0 over the run: cosine (nanochat) or linear",
            choices=WEIGHT_DECAY_SCHEDULES,
        ),
        Flag(
            "muon_momentum_schedule",
            str,
            "warmdown",
            "warmdown: 0.85 -> 0.97 over 400 steps, 0.97 -> 0.90 in the LR warmdown "
            "(nanochat); ramp: 0.85 -> 0.95 over 300 steps",
            choices=MOMENTUM_SCHEDULES,
        ),
        Flag("lr_batch_scaling", bool, True, "scale every LR by sqrt(batch / 2^19)"),
        Flag(
            "lr_schedule",
            str,
            "linear",
            "linear: warmup, flat, linear warmdown (nanochat); "
            "cosine: warmup, then cosine to final_lr_frac (GPT-2)",
            choices=SCHEDULES,
        ),
        Flag(
            "warmup_steps",
            int,
            40,
            "LR warmup steps (nanochat: 40; -1: warmup_ratio of the steps)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "warmup_ratio",
            float,
            0.0,
            "fraction of steps of LR warmup when warmup_steps is -1",
            min=0,
            max=1,
        ),
        Flag(
            "warmdown_ratio",
            float,
            0.65,
            "fraction of steps of linear LR warmdown (nanochat: 0.65; 0.5 before)",
            min=0,
            max=1,
        ),
        Flag(
            "final_lr_frac",
            float,
            0.05,
            "LR multiplier at the end of the warmdown (nanochat: 0.05; 0 before)",
            min=0,
            max=1,
        ),
        # evaluation, samples, checkpoints
        Flag(
            "eval_every",
            int,
            250,
            "steps between validation bpb evaluations (<= 0: only at end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "eval_tokens",
            int,
            20 * 2**20,
            "validation tokens per evaluation",
            min=1,
            max=MAX_TOKENS,
        ),
        Flag(
            "sample_every",
            int,
            2000,
            "steps between greedy samples (<= 0: only at end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "save_every",
            int,
            -1,
            "steps between checkpoints (<= 0: only at the end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "resume_from_step",
            int,
            -1,
            "continue from this saved step (-1: start fresh)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag("log_every", int, 1, "print a log line every N steps", min=1, max=MAX_STEPS),
        # runtime
        *runtime_flags("random seed for the initial weights", compile=True),
        Flag("model_tag", str, "", "checkpoint subfolder name (default d<depth>)", component=True),
        # paths
        Flag("data_dir", str, "", "parquet shards (default <NANOCHAT_HOME>/base_data)", path=True),
        Flag("tokenizer_dir", str, "", "tokenizer (default <NANOCHAT_HOME>/tokenizer)", path=True),
        Flag(
            "checkpoint_dir",
            str,
            "",
            "where checkpoints go (default <NANOCHAT_HOME>/base_checkpoints/<model_tag>)",
            path=True,
        ),  # fmt: skip
        *output_flags(),
    ],
)

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)
SAMPLE_TOKENS = 16


def resolve_paths(config: dict[str, Any]) -> dict[str, Path]:
    home = data_home()
    tag = config["model_tag"] or f"d{config['depth']}"
    checkpoints = config["checkpoint_dir"] or join_inside(home / "base_checkpoints", tag)
    return {
        "data_dir": Path(config["data_dir"] or home / "base_data"),
        "tokenizer_dir": Path(config["tokenizer_dir"] or home / "tokenizer"),
        "checkpoint_dir": Path(checkpoints),
    }


def model_config_for(config: dict[str, Any], vocab_size: int, depth: int | None = None):
    """The model config of the run's family (`model` flag) from its flags."""
    family = registry.family(config.get("model", registry.DEFAULT))
    try:
        return family.config_from_flags({**config, "depth": depth or config["depth"]}, vocab_size)
    except ValueError as error:
        # A family's config names its field first; where that is a flag, the error is that
        # flag's (so a form shows it beside the field), else the family choice's.
        first = str(error).split(" ", 1)[0]
        raise ValueError(f"{first if first in FLAGS else 'model'}: {error}") from None


def ignored_family_flags(config: dict[str, Any]) -> list[str]:
    """The model flags set away from their defaults that the chosen family does not read
    (e.g. a preset's --window-pattern under --model hybrid): said in the log, not an error,
    so one preset can serve several families."""
    own = set(registry.family(config.get("model", registry.DEFAULT)).flags)
    others = {name for fam in registry.NAMES for name in registry.family(fam).flags} - own
    defaults = {flag.name: flag.default for flag in FLAGS.flags}
    return sorted(name for name in others if config.get(name, defaults[name]) != defaults[name])


def scaling_params(model_config) -> tuple[int, float]:
    """(the parameters a tokens-per-parameter horizon counts, FLOPs per token), closed form.

    Arithmetic only, so the web app can plan any submitted config without building a model.
    """
    family = registry.family_of(model_config)
    return family.scaling_params(model_config), family.flops_per_token(model_config)


def planned_batch(config: dict[str, Any], world_size: int) -> int:
    """The device batch the total batch is planned with (`training.memory.planned_batch`)."""
    return planned_device_batch(
        config["device_batch_size"], config["total_batch_size"], config["max_seq_len"], world_size
    )


def plan(
    config: dict[str, Any],
    vocab_size: int,
    world_size: int,
    *,
    device_batch_size: int | None = None,
    check_memory: bool = True,
) -> Horizon:
    """The run's horizon and batch arithmetic; raises ValueError naming the flag at fault.

    device_batch_size: the batch the run will use (after auto picked it); the total batch is
    planned with `planned_batch` and the accumulation follows. check_memory: for a run that
    will use a GPU, refuse a model that cannot fit one sequence per pass on the planning GPU
    (`memory_choice`), so the web app refuses it before a worker loads anything.
    """
    model_config = model_config_for(config, vocab_size)
    total_params = registry.family_of(model_config).count_params(model_config)["total"]
    if total_params > MAX_PARAMS:
        raise ValueError(
            f"depth: a depth-{config['depth']} model of width {model_config.n_embd} has "
            f"{total_params:.3g} parameters, more than the {MAX_PARAMS:.0e} this trainer accepts"
        )
    params, token_flops = scaling_params(model_config)
    reference_params, _ = scaling_params(model_config_for(config, vocab_size, depth=12))
    planned = planned_batch(config, world_size)
    horizon = plan_horizon(
        num_iterations=config["num_iterations"],
        target_flops=config["target_flops"],
        target_param_data_ratio=config["target_param_data_ratio"],
        total_batch_size=config["total_batch_size"],
        device_batch_size=planned,
        seq_len=config["max_seq_len"],
        world_size=world_size,
        scaling_params=params,
        flops_per_token=token_flops,
        reference_scaling_params=reference_params,
        lr_batch_scaling=config["lr_batch_scaling"],
    )
    if check_memory and uses_gpu(config):
        memory_choice(config, vocab_size, world_size)
    if device_batch_size is None or device_batch_size == planned:
        return horizon
    tokens_per_pass = device_batch_size * config["max_seq_len"] * world_size
    if horizon.total_batch_size % tokens_per_pass:
        raise ValueError(
            f"device_batch_size: {device_batch_size} rows do not divide the total batch of "
            f"{horizon.total_batch_size} tokens"
        )
    return replace(horizon, grad_accum_steps=horizon.total_batch_size // tokens_per_pass)


def hyperparameters(
    config: dict[str, Any], vocab_size: int, horizon: Horizon
) -> OptimizerHyperparameters:
    """The run's LR scale and Muon weight decay (`training.scaling.optimizer_hyperparameters`,
    the rule every stage shares): D / D_ref is the model's scaling parameters over those of
    the depth-12 model of the same flags, as nanochat computes it."""
    params, _ = scaling_params(model_config_for(config, vocab_size))
    reference, _ = scaling_params(model_config_for(config, vocab_size, depth=12))
    return optimizer_hyperparameters(
        total_batch_size=horizon.total_batch_size,
        weight_decay=config["weight_decay"],
        lr_batch_scaling=config["lr_batch_scaling"],
        weight_decay_scaling=config["weight_decay_scaling"],
        data_ratio=params / reference,
        depth=config["depth"],
    )


def uses_gpu(config: dict[str, Any]) -> bool:
    """Whether the run is meant for a GPU (a CPU or MPS device is checked where it runs)."""
    return not config["device"].startswith(("cpu", "mps"))


def memory_choice(
    config: dict[str, Any],
    vocab_size: int,
    world_size: int,
    capacity: tuple[int, str] | None = None,
) -> BatchChoice:
    """The device batch and predicted memory per GPU for a config, before anything runs.

    capacity: (bytes, label) of the GPU; default this server's first GPU, or a reference
    H100-80GB when it has none (`planning_gpu`). Raises ValueError naming device_batch_size
    when one sequence per pass does not fit.
    """
    capacity_bytes, label = capacity or planning_gpu()
    return choose_device_batch(
        model_config_for(config, vocab_size),
        config["device_batch_size"],
        capacity_bytes=capacity_bytes,
        where=label,
        world_size=world_size,
        dtype="fp32" if config["dtype"] == "fp32" else "bf16",
        max_batch=planned_batch(config, world_size),
    )


@torch.no_grad()
def greedy_samples(model, tokenizer: Tokenizer, runtime: Runtime) -> list[tuple[str, str]]:
    samples = []
    with eval_mode(model):
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with runtime.autocast():
                out = list(model.generate_naive(ids, SAMPLE_TOKENS, temperature=0.0))
            samples.append((prompt, tokenizer.decode(out)))
    return samples


def train(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    paths = resolve_paths(config)
    tokenizer = Tokenizer.load(paths["tokenizer_dir"])
    token_bytes = tokenizer.token_bytes()
    model_config = model_config_for(config, tokenizer.vocab_size)
    batch = device_batch_for(
        model_config,
        config["device_batch_size"],
        device=runtime.device,
        world_size=runtime.world_size,
        dtype=runtime.dtype,
        max_batch=planned_batch(config, runtime.world_size),
    )
    runtime.print(f"memory: {batch.describe()} [{batch.estimate.breakdown()}]")
    for name in ignored_family_flags(config):
        runtime.print(f"note: --{name.replace('_', '-')} is not read by model {config['model']}")
    horizon = plan(
        config,
        tokenizer.vocab_size,
        runtime.world_size,
        device_batch_size=batch.device_batch_size,
        check_memory=False,
    )
    B, T = batch.device_batch_size, config["max_seq_len"]
    total = horizon.num_iterations

    model = registry.build_model(model_config, runtime.device)
    model.train()
    flops_per_token = model.estimate_flops()
    params = model.num_scaling_params()
    family = registry.family_of(model_config)
    hparams = hyperparameters(config, tokenizer.vocab_size, horizon)
    weight_decay = hparams.weight_decay
    optimizer = build_for(model, config, weight_decay=weight_decay, lr_scale=hparams.lr_scale,
                          compute_dtype=runtime.dtype)  # fmt: skip
    muon = config["optimizer"] == "muon"

    state = LoopState()
    loader_state = None
    if config["resume_from_step"] >= 0:
        model_state, optim_state, meta = ckpt.load_checkpoint(
            paths["checkpoint_dir"], config["resume_from_step"], device=runtime.device,
            load_optimizer=True, rank=runtime.rank,
        )  # fmt: skip
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        state = LoopState.from_dict(meta.get("loop_state"))
        # One loader position per rank: resuming needs the same number of processes.
        saved_states = meta.get("loader_states") or []
        if len(saved_states) != runtime.world_size:
            raise ValueError(
                f"resume_from_step: step {state.step} was saved by {len(saved_states)} "
                f"process(es); resume it with the same number (got {runtime.world_size})"
            )
        loader_state = saved_states[runtime.rank]
        del model_state, optim_state
        runtime.print(f"resumed from step {state.step} of {paths['checkpoint_dir']}")
    if state.step > total:
        raise ValueError(f"resume_from_step: step {state.step} is past the horizon ({total})")

    if runtime.master:
        save_tokenizer_copy(tokenizer, paths["checkpoint_dir"])

    derived = {
        "model_config": model_config.to_dict(),
        "parameters": params,
        "flops_per_token": flops_per_token,
        "num_iterations": total,
        "device_batch_size": B,
        "memory": batch.to_dict(),
        "horizon_source": horizon.source,
        "total_batch_size": horizon.total_batch_size,
        "grad_accum_steps": horizon.grad_accum_steps,
        "training_tokens": horizon.tokens,
        "model": family.name,
        "scaling_params": family.scaling_params(model_config),
        "tokens_per_param": horizon.tokens / family.scaling_params(model_config),
        "lr_scale": hparams.lr_scale,
        "weight_decay_scaled": weight_decay,
        # Every group's LR, betas and decay after all scaling: what the run actually used.
        "optimizer": {**hparams.to_dict(), "groups": effective_groups(optimizer)},
        "dtype": str(runtime.dtype).removeprefix("torch."),
        **{k: str(v) for k, v in paths.items()},
    }
    runtime.print(format_config(config))
    runtime.print(json.dumps(derived, indent=2))
    events.start(config, total_steps=total, world_size=runtime.world_size,
                 device=str(runtime.device), program="base_train", derived=derived,
                 start_step=state.step)  # fmt: skip

    train_model = maybe_compile(model, config["compile"], runtime)
    batches = pretrain_batches(
        paths["data_dir"], tokenizer, B, T, split="train", rank=runtime.rank,
        world_size=runtime.world_size, device=runtime.device, resume_state=loader_state,
    )  # fmt: skip
    eval_steps = max(1, config["eval_tokens"] // (B * T * runtime.world_size))
    reporter = StepReporter(runtime, total, horizon.total_batch_size, flops_per_token)
    val_bpb = None
    inputs, targets, next_state = next(batches)
    started = time.time()

    while True:
        step = state.step
        last = step == total
        if due(step, config["eval_every"], total):
            val_batches = pretrain_batches(
                paths["data_dir"], tokenizer, B, T, split="val", rank=runtime.rank,
                world_size=runtime.world_size, device=runtime.device,
            )  # fmt: skip
            val_bpb = evaluate_bpb(model, val_batches, eval_steps, token_bytes, runtime)
            if state.min_val_bpb is None or val_bpb < state.min_val_bpb:
                state.min_val_bpb = val_bpb
            runtime.print(f"step {step:05d} | val bpb {val_bpb:.4f}")
            events.eval(step, {"val/bpb": val_bpb})
        if runtime.master and due(step, config["sample_every"], total):
            for prompt, completion in greedy_samples(model, tokenizer, runtime):
                runtime.print(f"sample: {prompt!r} -> {completion!r}")
                events.sample(step, prompt, completion)
        resumed_here = config["resume_from_step"] == step
        if last or (config["save_every"] > 0 and step > 0 and step % config["save_every"] == 0
                    and not resumed_here):  # fmt: skip
            meta = {
                "val_bpb": val_bpb,
                "user_config": config,
                "derived": derived,
                "loader_states": runtime.all_gather_object(loader_state),
                "loop_state": state.to_dict(),
            }
            save_training_checkpoint(runtime, events, paths["checkpoint_dir"], step, model,
                                     optimizer, meta)  # fmt: skip
        if last:
            break

        reporter.start_step()
        loss_sum = torch.zeros((), device=runtime.device)
        for _ in range(horizon.grad_accum_steps):
            with runtime.autocast():
                loss = train_model(inputs, targets)
            loss_sum += loss.detach()
            (loss / horizon.grad_accum_steps).backward()
            # The next batch's position is where a resume must start if we stop after it.
            loader_state = next_state
            inputs, targets, next_state = next(batches)
        lr_mult = schedule_multiplier(config, step, total)
        if muon:
            wd = weight_decay_at(step, total, weight_decay, config["weight_decay_schedule"])
            set_schedule(optimizer, lr_mult=lr_mult, momentum=momentum_at(config, step, total),
                         weight_decay=wd)  # fmt: skip
        else:
            set_schedule(optimizer, lr_mult=lr_mult)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        state.step += 1
        mean_loss = runtime.all_reduce_sum(loss_sum / horizon.grad_accum_steps)
        values = reporter.end_step(state, mean_loss.item() / runtime.world_size, lr_mult)
        values.update(model_metrics(model, optimizer))
        events.metrics(state.step, values)
        if state.step % config["log_every"] == 0 or state.step == total:
            runtime.print(reporter.format(state, values))
        if state.step == 1:
            gc.collect()  # then keep the collector out of the timed loop
            gc.freeze()

    summary = {
        "val_bpb": val_bpb,
        "min_val_bpb": state.min_val_bpb,
        "steps": total,
        **timing_summary(state, horizon.total_batch_size, started, runtime),
    }
    runtime.print(
        f"done: {total} steps in {format_duration(summary['wall_time_sec'])}, "
        f"min val bpb {state.min_val_bpb:.4f}"
        if state.min_val_bpb is not None
        else f"done: {total} steps"
    )
    markdown = report_markdown(config, derived, summary)
    events.report("Base model training", markdown)
    if runtime.master:
        write_section(config["report_dir"], "base_train", markdown)
    return summary


def report_markdown(config: dict, derived: dict, summary: dict) -> str:
    params = derived["parameters"]
    family = registry.family(derived.get("model", registry.DEFAULT))
    groups = ", ".join(f"{k} {v:,}" for k, v in params.items() if k != "total" and v)
    lines = [
        "## Base model training",
        f"- model: {family.label}",
        f"- depth: {config['depth']} (width {derived['model_config']['n_embd']}, "
        f"{derived['model_config'].get('n_head', '?')} heads)",
        f"- parameters: {params['total']:,} ({groups})",
        f"- FLOPs per token: {derived['flops_per_token']:.3e}",
        f"- steps: {summary['steps']} ({derived['horizon_source']}), "
        f"batch {derived['total_batch_size']:,} tokens, grad accum {derived['grad_accum_steps']}",
        f"- training tokens: {derived['training_tokens']:,} "
        f"({derived['tokens_per_param']:.1f} per parameter)",
        f"- precision: {derived['dtype']}",
    ]
    optimizer = derived.get("optimizer")
    if optimizer:
        lrs = ", ".join(f"{g['name']} {g['lr']:.4g}" for g in optimizer["groups"])
        lines.append(f"- learning rates (x{optimizer['lr_scale']:.4g} for the batch): {lrs}")
        if config.get("optimizer", "muon") == "muon":
            lines.append(
                f"- Muon weight decay: {optimizer['weight_decay']:.4g} "
                f"({config['weight_decay']} {optimizer['weight_decay_rule']})"
            )
    if derived.get("memory"):
        lines.append(f"- memory per process (predicted): {derived['memory']['text']}")
    if summary.get("min_val_bpb") is not None:
        lines.append(f"- minimum validation bpb: {summary['min_val_bpb']:.4f}")
    lines += resource_lines(summary)
    lines.append(f"- total training time: {format_duration(summary['training_time_sec'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, train, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
