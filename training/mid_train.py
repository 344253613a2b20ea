"""Mid-training: teach a base model the chat format before supervised fine-tuning.

    python -m training.mid_train --config demo-cpu
    torchrun --standalone --nproc_per_node=8 -m training.mid_train --source-dir DIR --run-dir runs/x

A base model has only seen plain text. Here conversations of a task mixture (SmolTalk, MMLU
auxiliary train, GSM8K, identity, SimpleSpelling, SpellingBee by default) are rendered in the
chat format and concatenated into one dense token stream, and the model learns every token of
it -- the special tokens, the turn structure, tool calls and their outputs -- as ordinary
language modelling. The LR is the base LR times `init_lr_frac` (1.0 by default) and the batch
scaling base training uses, flat, then decaying linearly to 0 over the last 20% of the steps. The result goes to
`<NANOCHAT_HOME>/mid_checkpoints/<tag>` with meta stage "mid", where SFT looks first. The loop
is shared with SFT: see training/finetune.py.
"""

from __future__ import annotations

import sys
from typing import Any

from training.events import EventWriter
from training.finetune import Stage, finetune_flags, run_finetune
from training.flags import FlagSet
from training.program import cancel_on_sigterm, program_main
from training.runtime import Runtime

DEFAULT_MIXTURE = "smoltalk,mmlu_aux,gsm8k,identity,simple_spelling,spelling_bee"

STAGE = Stage(
    program="mid_train",
    stage="mid",
    title="Midtraining",
    checkpoints="mid_checkpoints",
    source_stages=("base_checkpoints",),
    packing="dense",
)

FLAGS = FlagSet(
    "mid_train",
    configs="mid_train",
    description="Mid-train a base checkpoint on rendered conversations (every token).",
    flags=finetune_flags(default_mixture=DEFAULT_MIXTURE, init_lr_frac=1.0, stage=STAGE),
)


def train(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    return run_finetune(config, runtime, events, STAGE)


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, train, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
