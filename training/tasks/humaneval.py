"""HumanEval: write a Python function from its signature and docstring; graded by unit tests.

The user message is the problem's prompt (signature + docstring); the model's answer is graded
by running the prompt, the code it wrote, the problem's `check` function and
`check(<entry point>)` in the sandbox (engine.sandbox): the answer is correct when that program
runs to the end. Graded code is untrusted, so the task refuses to start where the sandbox cannot
isolate it (no usable bubblewrap) unless NANOCHAT_SANDBOX=weak allows the weaker mode; the mode
that ran is `sandbox_mode`, reported in the eval results. The prompt goes first so both kinds of answer work: a whole function (it
replaces the prompt's stub) and just the body (it continues the prompt's signature).

Hub: the parquet file of `openai/openai_humaneval` (164 problems, test split only). Builtin:
a dozen small problems in the same format written for this project (`data/humaneval.jsonl`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from engine.sandbox import run_python, sandbox_mode
from training.tasks import hub
from training.tasks.base import ListTask, check_source, check_split

HUB_REPO = "openai/openai_humaneval"
HUB_FOLDER = "openai_humaneval"
BUILTIN_FILE = Path(__file__).parent / "data" / "humaneval.jsonl"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
SANDBOX_TIMEOUT_S = 5.0

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The code of a completion: its first ``` block (python or untagged), else all of it."""
    match = _CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def build_program(prompt: str, code: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs to grade `code` (see the module docstring for the order)."""
    return f"{prompt}\n{code}\n\n{test}\n\ncheck({entry_point})\n"


def make_conversation(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
        ],
        **{field: row[field] for field in ("task_id", "prompt", "test", "entry_point")},
    }


def load_builtin() -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(BUILTIN_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rows.append(json.loads(line))
            missing = [f for f in FIELDS if f not in rows[-1]]
            if missing:
                raise ValueError(f"{BUILTIN_FILE}:{number}: missing fields {missing}")
    return rows


class HumanEval(ListTask):
    """HumanEval (test split only). `evaluate` runs the answer against the tests in the sandbox."""

    name = "HumanEval"
    eval_type = "generative"

    def __init__(
        self,
        split: str = "test",
        source: str = "builtin",
        cache_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = SANDBOX_TIMEOUT_S,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        # Raises SandboxUnavailable (naming the setting) before any completion is graded.
        self.sandbox_mode = sandbox_mode()
        check_source(source)
        check_split(self.name, split, ("test",))
        self.split, self.timeout_s = split, timeout_s
        if source == "hub":
            rows = hub.load_split(HUB_REPO, HUB_FOLDER, "test-", cache_dir, columns=list(FIELDS))
        else:
            rows = load_builtin()
        self._data = [make_conversation(row) for row in rows]

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        program = build_program(
            conversation["prompt"],
            extract_code(completion),
            conversation["test"],
            conversation["entry_point"],
        )
        return run_python(program, timeout=self.timeout_s).success
