"""Supervised fine-tuning: teach a base (or mid-trained) model to answer as the assistant.

    python -m training.chat_sft --config demo-cpu
    torchrun --standalone --nproc_per_node=8 -m training.chat_sft --source-dir DIR --run-dir runs/x

Conversations of a task mixture (SmolTalk, MMLU auxiliary train, GSM8K x2, identity x2,
SimpleSpelling, SpellingBee by default) are rendered in the chat format and packed into rows
by best fit; the loss counts only the tokens the assistant writes (its replies, tool calls and
`<|assistant_end|>`), never the user's words, tool outputs or padding. The LR is the base LR
times `init_lr_frac` (0.8) and the batch scaling base training uses, flat, then decaying
linearly to 0 over the last half of the steps (nanochat's SFT defaults; 20% before), and
validation loss / bits per byte on the mixture's test split is measured every `eval_every`
steps. The result is saved in `<NANOCHAT_HOME>/sft_checkpoints/<tag>` with meta stage "sft".
The loop is shared with mid-training: see training/finetune.py.
"""

from __future__ import annotations

import sys
from typing import Any

from training.events import EventWriter
from training.finetune import Stage, finetune_flags, run_finetune
from training.flags import FlagSet
from training.program import cancel_on_sigterm, program_main
from training.runtime import Runtime

DEFAULT_MIXTURE = "smoltalk,mmlu_aux,gsm8k*2,identity*2,simple_spelling,spelling_bee"

STAGE = Stage(
    program="chat_sft",
    stage="sft",
    title="Chat SFT",
    checkpoints="sft_checkpoints",
    source_stages=("mid_checkpoints", "base_checkpoints"),
    packing="masked",
)

FLAGS = FlagSet(
    "chat_sft",
    configs="chat_sft",
    description="Supervised fine-tuning of a base or mid checkpoint on a conversation mixture.",
    flags=finetune_flags(
        default_mixture=DEFAULT_MIXTURE, init_lr_frac=0.8, stage=STAGE, warmdown_ratio=0.5
    ),
)


def train(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    return run_finetune(config, runtime, events, STAGE)


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, train, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
