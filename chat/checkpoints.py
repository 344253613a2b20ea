"""What the chat knows about a checkpoint before any engine worker loads it.

Its model config (the row's copy, else the step's meta file), hence its family, size and
context length; its tokenizer, to measure prompts for context fitting (chat/context.py);
one picker label for every checkpoint; and the card the chat page shows for the selected
model -- so a user knows what they are talking to (a 7M-parameter model trained for minutes
writes fluent-looking nonsense, and should say so before the user asks it anything).

Files are read on the web host, which shares the data home with the workers. A checkpoint
whose files cannot be read here still works: it is simply not fitted (the engine worker then
refuses a prompt that is too long, as before) and its card says less.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from engine.checkpoint import load_tokenizer_for, meta_path
from engine.models import registry
from runs import selectors
from runs.models import Checkpoint

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

log = logging.getLogger("chat")

# Below either, a model is a toy: the card says what to expect from it.
TINY_PARAMETERS = 100_000_000
FEW_TOKENS = 1_000_000_000
TINY_NOTE = (
    "A tiny model{facts}: expect fluent-looking nonsense. It is for learning the pipeline, "
    "not for answers."
)
BASE_NOTE = (
    "A base model was never taught to chat: Completion mode continues your text as it is, "
    "without the chat template."
)
# How far up a fine-tune's parents the tokens trained are added up.
MAX_LINEAGE = 8


# ---- files (cached: a checkpoint's step never changes once written) ------------------------


@lru_cache(maxsize=512)
def _meta_model_config(path: str, step: int) -> dict:
    meta = json.loads(meta_path(path, step).read_text(encoding="utf-8"))
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise ValueError(f"{meta_path(path, step)} has no model_config")
    return config


@lru_cache(maxsize=8)
def _tokenizer(path: str) -> Tokenizer:
    return load_tokenizer_for(path)


def model_config(checkpoint: Checkpoint) -> dict:
    """The checkpoint's model config; {} when neither the row nor a readable meta file has it."""
    if isinstance(checkpoint.model_config, dict) and checkpoint.model_config:
        return checkpoint.model_config
    try:
        return _meta_model_config(checkpoint.path, checkpoint.step)
    except (OSError, ValueError) as exc:
        log.debug("no model config for checkpoint %s: %s", checkpoint.pk, exc)
        return {}


def context_length(config: dict) -> int | None:
    """The most tokens (prompt and reply) the model reads: its sequence_len."""
    value = config.get("sequence_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


def tokenizer_for(checkpoint: Checkpoint) -> Tokenizer | None:
    try:
        return _tokenizer(checkpoint.path)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the tokenizer of checkpoint %s: %s", checkpoint.pk, exc)
        return None


def parameters(config: dict) -> int | None:
    """The model's parameter count, in closed form from its config (nothing is built)."""
    if not config:
        return None
    try:
        parsed = registry.config_from_dict(config)
        return registry.family_of(parsed).count_params(parsed)["total"]
    except (TypeError, ValueError, KeyError):
        return None


# ---- what the picker shows -----------------------------------------------------------------


def label(checkpoint: Checkpoint, config: dict) -> str:
    """One style for every checkpoint: "SFT · nanochat GPT d4 · step 250 · run 4"."""
    family = selectors.family_label(selectors.checkpoint_family(checkpoint))
    depth = config.get("n_layer")
    model = f"{family} d{depth}" if depth else family
    text = f"{checkpoint.stage.upper()} · {model} · step {checkpoint.step}"
    return f"{text} · run {checkpoint.run_id}" if checkpoint.run_id else text


def picker_entries(checkpoints: Iterable[Checkpoint]) -> list[dict[str, Any]]:
    """The picker's options, each with its card: {id, label, stage, context, card}."""
    checkpoints = list(checkpoints)
    scores = {row.checkpoint.pk: row.scores for row in selectors.leaderboard()}
    tokens = _tokens_trained(checkpoints)
    entries = []
    for checkpoint in checkpoints:
        config = model_config(checkpoint)
        entries.append(
            {
                "id": checkpoint.pk,
                "label": label(checkpoint, config),
                "stage": checkpoint.stage,
                "context": context_length(config),
                "card": card(checkpoint, config, scores.get(checkpoint.pk, {}), tokens),
            }
        )
    return entries


def card(
    checkpoint: Checkpoint,
    config: dict,
    scores: dict[str, float | None],
    tokens: dict[int, list[tuple[str, int]]],
) -> dict[str, Any]:
    """The facts a user reads about a model: rows of {key, label, value, text} and a note."""
    params = parameters(config)
    context = context_length(config)
    trained = tokens.get(checkpoint.pk, [])
    total = sum(n for _, n in trained) if trained else None
    family = selectors.family_label(selectors.checkpoint_family(checkpoint))
    rows = [
        _row("family", "family", family, family),
        _row("parameters", "parameters", params, _compact(params)),
        _row("tokens", "tokens trained", total, _tokens_text(trained)),
        _row("stage", "stage", checkpoint.stage, checkpoint.stage.upper()),
        _row("context", "context", context, None if context is None else f"{context:,} tokens"),
        _row("step", "step", checkpoint.step, f"{checkpoint.step:,}"),
        _row(
            "run",
            "run",
            checkpoint.run_id,
            None if not checkpoint.run_id else f"run {checkpoint.run_id}",
        ),
        _row("val_bpb", "val bpb", checkpoint.val_bpb, _score(checkpoint.val_bpb)),
    ]
    rows += [
        _row(f"eval:{name}", name, value, _score(value))
        for name, value in scores.items()
        if value is not None
    ]
    notes = []
    tiny = (params is not None and params < TINY_PARAMETERS) or (
        total is not None and total < FEW_TOKENS
    )
    if tiny:
        facts = [f"{_compact(params)} parameters" if params else "", _tokens_fact(total)]
        joined = ", ".join(fact for fact in facts if fact)
        notes.append(TINY_NOTE.format(facts=f" ({joined})" if joined else ""))
    if checkpoint.stage == Checkpoint.Stage.BASE:
        notes.append(BASE_NOTE)
    return {"rows": [row for row in rows if row["text"]], "notes": notes, "tiny": tiny}


def _row(key: str, name: str, value: Any, text: str | None) -> dict[str, Any]:
    return {"key": key, "label": name, "value": value, "text": text or ""}


def _tokens_trained(checkpoints: list[Checkpoint]) -> dict[int, list[tuple[str, int]]]:
    """{checkpoint id: [(stage, tokens), ...]} over the checkpoint and the parents it was
    fine-tuned from, oldest first; tokens = step x the run's tokens per step (as its start
    event said). A stage whose run did not say is left out."""
    parent_of: dict[int, Checkpoint | None] = {}
    lineages = {}
    for checkpoint in checkpoints:
        chain, seen = [], set()
        node: Checkpoint | None = checkpoint
        while node is not None and node.pk not in seen and len(chain) < MAX_LINEAGE:
            seen.add(node.pk)
            chain.append(node)
            if node.pk not in parent_of:
                run = node.run if node.run_id else None
                parent_of[node.pk] = run.parent_checkpoint if run is not None else None
            node = parent_of[node.pk]
        lineages[checkpoint.pk] = chain
    runs = {node.run for chain in lineages.values() for node in chain if node.run_id}
    scales = selectors.training_scales(runs)
    trained = {}
    for pk, chain in lineages.items():
        parts = []
        for node in reversed(chain):
            scale = scales.get(node.run_id)
            amount = scale.tokens_at(node.step) if scale is not None else None
            if amount:
                parts.append((node.stage, amount))
        trained[pk] = parts
    return trained


def _tokens_text(parts: list[tuple[str, int]]) -> str:
    if not parts:
        return ""
    total = _compact(sum(n for _, n in parts))
    if len(parts) == 1:
        return total
    return f"{total} ({' + '.join(f'{stage} {_compact(n)}' for stage, n in parts)})"


def _tokens_fact(total: int | None) -> str:
    return "" if total is None else f"trained on {_compact(total)} tokens"


def _compact(number: int | None) -> str:
    """7340032 -> '7.3M'; None -> ''."""
    if number is None:
        return ""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= size:
            return f"{number / size:.3g}{suffix}"
    return str(number)


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
