"""HumanEval: code extraction, sandboxed grading of good and bad completions, loaders."""

import pytest

from engine import sandbox
from training.tasks.base import MissingSplitError
from training.tasks.humaneval import HumanEval, build_program, extract_code


@pytest.fixture(scope="module", autouse=True)
def usable_sandbox():
    # Grading is tested in whichever mode works here; the isolation and the refusal of the weak
    # mode by default are tested in tests/engine/test_sandbox_escapes.py.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(sandbox.SANDBOX_MODE_ENV, sandbox.WEAK)
        yield sandbox.sandbox_mode()


@pytest.fixture(scope="module")
def task():
    return HumanEval()


def test_the_task_records_the_sandbox_mode(task, usable_sandbox):
    assert task.sandbox_mode == usable_sandbox


def gcd_problem(task):
    return next(c for c in task if c["entry_point"] == "gcd")


def test_extract_code_takes_the_first_python_block_else_everything():
    assert extract_code("Here:\n```python\nx = 1\n```\nand ```python\ny\n```") == "x = 1\n"
    assert extract_code("```\nz = 2\n```") == "z = 2\n"
    assert extract_code("```py\nw = 3\n```") == "w = 3\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_builtin_problems_have_the_humaneval_fields(task):
    assert len(task) == 12
    assert task.eval_type == "generative"
    for conversation in task:
        prompt = conversation["prompt"]
        assert conversation["messages"][0]["content"] == prompt
        assert conversation["messages"][1]["content"].startswith(prompt)
        assert f"def {conversation['entry_point']}(" in prompt
        assert "def check(candidate)" in conversation["test"]
    with pytest.raises(MissingSplitError, match="HumanEval has no 'train' split"):
        HumanEval("train")


def test_a_correct_full_function_in_a_code_block_passes(task):
    completion = (
        "Sure! Here is the function:\n\n```python\ndef gcd(a: int, b: int) -> int:\n"
        "    while b:\n        a, b = b, a % b\n    return a\n```\nIt uses Euclid's algorithm."
    )
    assert task.evaluate(gcd_problem(task), completion) is True


def test_a_correct_body_only_completion_passes(task):
    assert task.evaluate(gcd_problem(task), "    import math\n    return math.gcd(a, b)\n")


@pytest.mark.parametrize(
    "completion",
    [
        "```python\ndef gcd(a, b):\n    return a * b\n```",  # wrong answer
        "```python\ndef gcd(a, b):\n    return a +\n```",  # syntax error
        "I don't know how to do that.",  # no code at all
        "```python\ndef gcd(a, b):\n    while True:\n        pass\n```",  # never returns
        # Leaving before the tests run, or forging the runner's old report, is not passing.
        "```python\nimport os\nos._exit(0)\n```",
        "```python\nimport sys\nsys.exit(0)\n```",
        "```python\nimport os\nos.write(3, b'{\"success\": true}')\nos._exit(0)\n```",
    ],
    ids=["wrong", "syntax-error", "prose", "infinite-loop", "os-exit-0", "sys-exit-0", "forged"],
)
def test_bad_completions_fail(completion):
    task = HumanEval(timeout_s=0.5)
    conversation = gcd_problem(task)
    assert task.evaluate(conversation, completion) is False
    assert task.reward(conversation, completion) == 0.0


def test_every_canonical_solution_passes_its_tests(task):
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"]), conversation[
            "task_id"
        ]


def test_build_program_order():
    program = build_program("def f():\n", "    return 1\n", "def check(c):\n    pass\n", "f")
    assert program.index("def f()") < program.index("return 1") < program.index("def check")
    assert program.rstrip().endswith("check(f)")


def test_hub_loader(fake_hub, tmp_path):
    row = {
        "task_id": "HumanEval/0",
        "prompt": 'def inc(x):\n    """Add one."""\n',
        "canonical_solution": "    return x + 1\n",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n",
        "entry_point": "inc",
    }
    fake_hub.add_parquet("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet",
                         [row])  # fmt: skip
    task = HumanEval(source="hub", cache_dir=tmp_path)
    assert len(task) == 1 and task[0]["task_id"] == "HumanEval/0"
    assert task.evaluate(task[0], "    return x + 1\n")
    assert not task.evaluate(task[0], "    return x\n")
