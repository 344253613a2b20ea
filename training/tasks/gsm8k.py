"""GSM8K: grade-school math word problems with worked answers that end in "#### <number>".

The reference answers mark each calculation as `<<expression=result>>`. Those become tool
calls in the conversation: the assistant writes the expression as a python part, the tool's
output part holds the result (masked out of the loss: the calculator produced it, not the
model), and the text goes on. A model fine-tuned on this learns to call the calculator for
arithmetic instead of guessing digits. Grading only looks at the number after the last "####".

Hub: the parquet files of `openai/gsm8k` ("main"). Builtin: word problems generated from
templates with a seeded RNG, written in the same answer format, annotations included.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.calculator import evaluate_expression
from training.tasks import hub
from training.tasks.base import ListTask, check_source, check_split

HUB_REPO = "openai/gsm8k"
HUB_FOLDER = "main"
SPLITS = ("train", "test")
BUILTIN_SIZES = {"train": 240, "test": 60}
# Train and test problems come from separate seed ranges and are deduplicated against each
# other, so no test problem is ever trained on.
_SEED_BASE = {"test": 0, "train": 1_000_000}

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_ANSWER = re.compile(r"\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text: str) -> str | None:
    """The number after the last "####" (commas and a leading "$" dropped), or None."""
    position = text.rfind("####")
    if position < 0:
        return None
    match = _ANSWER.match(text, position + 4)
    return match.group(1).replace(",", "") if match else None


def same_number(a: str, b: str) -> bool:
    """Whether two answer strings are the same number ("72" and "72.0" are)."""
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a.strip() == b.strip()


def answer_to_parts(answer: str) -> list[dict[str, str]]:
    """A reference answer as assistant parts: text, python (expression), python_output, text...

    An annotation without "=" is not a calculation and stays in the text as written.
    """
    parts: list[dict[str, str]] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})

    position = 0
    for match in _ANNOTATION.finditer(answer):
        add_text(answer[position : match.start()])
        inner = match.group(1)
        if "=" in inner:
            expression, result = inner.rsplit("=", 1)
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        else:
            add_text(match.group(0))
        position = match.end()
    add_text(answer[position:])
    return parts


def make_conversation(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer_to_parts(answer)},
        ]
    }


def message_text(content: str | list[dict[str, str]]) -> str:
    """An assistant message's content as plain text (all parts' text concatenated)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


# ---- builtin problems -------------------------------------------------------------------------

_PEOPLE = (
    ("Maya", "she", "her"), ("Liam", "he", "his"), ("Sofia", "she", "her"), ("Noah", "he", "his"),
    ("Amara", "she", "her"), ("Kenji", "he", "his"), ("Elena", "she", "her"), ("Omar", "he", "his"),
    ("Priya", "she", "her"), ("Lucas", "he", "his"), ("Hana", "she", "her"), ("Mateo", "he", "his"),
)  # fmt: skip
_FRIENDS = ("Sam", "Alex", "Jordan", "Robin", "Taylor", "Casey")
_ITEMS = ("apples", "crayons", "stickers", "marbles", "cookies", "pencils", "shells", "cards")
_PURCHASES = ("notebooks", "pens", "sandwiches", "tickets", "plants", "candles")
_THINGS = ("bike", "game", "jacket", "guitar", "backpack", "lamp")


def _calc(expression: str) -> int:
    # The engine's own calculator, so every annotation shows exactly what the tool would print.
    value = evaluate_expression(expression)
    if value is None or not value.lstrip("-").isdigit():
        raise AssertionError(f"builtin GSM8K step {expression} gave {value!r}, not a whole number")
    return int(value)


def _step(before: str, expression: str, after: str) -> tuple[str, int]:
    result = _calc(expression)
    return f"{before}{expression} = <<{expression}={result}>>{result}{after}", result


Problem = tuple[str, list[str], int]


def _boxes(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    item, friend = rng.choice(_ITEMS), rng.choice(_FRIENDS)
    n, k = rng.randint(2, 9), rng.randint(4, 15)
    give = rng.randint(1, n * k - 1)
    q = (f"{name} has {n} boxes of {item}. Each box holds {k} {item}. {pron.capitalize()} gives "
         f"{give} {item} to {friend}. How many {item} does {name} have left?")  # fmt: skip
    s1, total = _step(f"{name} starts with ", f"{n}*{k}", f" {item}.")
    s2, left = _step(f"After giving {give} away, {pron} has ", f"{total}-{give}", f" {item} left.")
    return q, [s1, s2], left


def _change(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    thing = rng.choice(_PURCHASES)
    n, price = rng.randint(2, 6), rng.randint(2, 9)
    bill = next(b for b in (20, 50, 100) if b > n * price)
    q = (f"{name} buys {n} {thing} that cost ${price} each and pays with a ${bill} bill. "
         f"How much change does {pron} get, in dollars?")  # fmt: skip
    s1, cost = _step(f"The {thing} cost ", f"{n}*{price}", " dollars.")
    s2, change = _step("The change is ", f"{bill}-{cost}", " dollars.")
    return q, [s1, s2], change


def _distance(rng: random.Random) -> Problem:
    s1_, h1, s2_, h2 = (
        rng.randint(30, 80),
        rng.randint(2, 5),
        rng.randint(20, 70),
        rng.randint(1, 4),
    )
    q = (f"A train travels at {s1_} miles per hour for {h1} hours, then at {s2_} miles per hour "
         f"for {h2} more hours. How many miles does it travel in total?")  # fmt: skip
    a, d1 = _step("In the first part it travels ", f"{s1_}*{h1}", " miles.")
    b, d2 = _step("In the second part it travels ", f"{s2_}*{h2}", " miles.")
    c, total = _step("Altogether it travels ", f"{d1}+{d2}", " miles.")
    return q, [a, b, c], total


def _savings(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    thing = rng.choice(_THINGS)
    per_week, weeks = rng.randint(5, 25), rng.randint(4, 12)
    spend = rng.randint(10, per_week * weeks - 1)
    q = (f"{name} saves ${per_week} every week. After {weeks} weeks, {pron} spends ${spend} on a "
         f"{thing}. How much money does {pron} have left, in dollars?")  # fmt: skip
    a, saved = _step(f"{name} saves ", f"{per_week}*{weeks}", " dollars.")
    b, left = _step(f"After buying the {thing}, {pron} has ", f"{saved}-{spend}", " dollars left.")
    return q, [a, b], left


def _pages(rng: random.Random) -> Problem:
    name, pron, possessive = rng.choice(_PEOPLE)
    per_day, days = rng.randint(8, 30), rng.randint(3, 9)
    pages = per_day * days + rng.randint(10, 150)
    q = (f"{name}'s book has {pages} pages. {pron.capitalize()} reads {per_day} pages every day "
         f"for {days} days. How many pages are left to read?")  # fmt: skip
    a, read = _step(f"{name} reads ", f"{per_day}*{days}", " pages.")
    b, left = _step("There are ", f"{pages}-{read}", f" pages left in {possessive} book.")
    return q, [a, b], left


def _flour(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    cups, batches = rng.randint(2, 5), rng.randint(3, 8)
    have = rng.randint(1, cups * batches - 1)
    q = (f"A cookie recipe uses {cups} cups of flour per batch. {name} wants to bake {batches} "
         f"batches but has only {have} cups of flour. How many more cups does {pron} need?")  # fmt: skip
    a, need = _step(f"{batches} batches need ", f"{batches}*{cups}", " cups of flour.")
    b, more = _step(f"{name} needs ", f"{need}-{have}", " more cups.")
    return q, [a, b], more


def _pencils(rng: random.Random) -> Problem:
    girls, boys, each = rng.randint(8, 18), rng.randint(8, 18), rng.randint(2, 6)
    q = (f"A class has {girls} girls and {boys} boys. The teacher gives each student {each} "
         f"pencils. How many pencils does the teacher give out?")  # fmt: skip
    a, students = _step("There are ", f"{girls}+{boys}", " students.")
    b, pencils = _step("The teacher gives out ", f"{students}*{each}", " pencils.")
    return q, [a, b], pencils


def _half(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    item, friend = rng.choice(_ITEMS), rng.choice(_FRIENDS)
    total, more = 2 * rng.randint(6, 40), rng.randint(3, 25)
    q = (f"{name} has {total} {item}. {pron.capitalize()} gives half of them to {friend} and then "
         f"gets {more} more. How many {item} does {name} have now?")  # fmt: skip
    a, kept = _step(f"{name} keeps ", f"{total}/2", f" {item}.")
    b, now = _step(f"Then {pron} has ", f"{kept}+{more}", f" {item}.")
    return q, [a, b], now


def _wages(rng: random.Random) -> Problem:
    name, pron, _ = rng.choice(_PEOPLE)
    wage, hours, days = rng.randint(9, 25), rng.randint(3, 8), rng.randint(2, 6)
    q = (f"{name} earns ${wage} per hour. {pron.capitalize()} works {hours} hours a day for "
         f"{days} days. How much does {pron} earn in total, in dollars?")  # fmt: skip
    a, worked = _step(f"{name} works ", f"{hours}*{days}", " hours.")
    b, pay = _step(f"{pron.capitalize()} earns ", f"{wage}*{worked}", " dollars.")
    return q, [a, b], pay


def _garden(rng: random.Random) -> Problem:
    rows, per_row = rng.randint(3, 12), rng.randint(4, 12)
    died = rng.randint(1, rows * per_row // 2)
    q = (f"A garden has {rows} rows of tomato plants with {per_row} plants in each row. "
         f"{died} of the plants die. How many plants are left?")  # fmt: skip
    a, planted = _step("The garden has ", f"{rows}*{per_row}", " plants.")
    b, left = _step("After some die, ", f"{planted}-{died}", " plants are left.")
    return q, [a, b], left


def _discount(rng: random.Random) -> Problem:
    thing = rng.choice(_THINGS)
    price, percent = 20 * rng.randint(2, 15), rng.choice((10, 20, 25, 50))
    q = (f"A {thing} costs ${price}. It is on sale for {percent}% off. What is the sale price, in "
         f"dollars?")  # fmt: skip
    a, off = _step("The discount is ", f"{price}*{percent}/100", " dollars.")
    b, sale = _step("The sale price is ", f"{price}-{off}", " dollars.")
    return q, [a, b], sale


def _ages(rng: random.Random) -> Problem:
    name, _, possessive = rng.choice(_PEOPLE)
    age, older, years = rng.randint(5, 16), rng.randint(2, 9), rng.randint(2, 10)
    q = (f"{name} is {age} years old. {possessive.capitalize()} brother is {older} years older. "
         f"How old will {possessive} brother be in {years} years?")  # fmt: skip
    a, brother = _step(f"{name}'s brother is ", f"{age}+{older}", " years old.")
    b, later = _step(f"In {years} years he will be ", f"{brother}+{years}", " years old.")
    return q, [a, b], later


def _sharing(rng: random.Random) -> Problem:
    name, _, _ = rng.choice(_PEOPLE)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    extra = rng.randint(1, 9)
    baked = friends * each + extra
    q = (f"{name} bakes {baked} muffins, eats {extra} of them, and shares the rest equally "
         f"among {friends} friends. How many muffins does each friend get?")  # fmt: skip
    a, rest = _step("There are ", f"{baked}-{extra}", " muffins to share.")
    b, share = _step("Each friend gets ", f"{rest}/{friends}", " muffins.")
    return q, [a, b], share


_TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _boxes, _change, _distance, _savings, _pages, _flour, _pencils, _half, _wages, _garden,
    _discount, _ages, _sharing,
)  # fmt: skip


def generate_problem(seed: int) -> tuple[str, str]:
    """(question, reference answer with annotations and "#### n") for one seed."""
    rng = random.Random(seed)
    question, steps, final = rng.choice(_TEMPLATES)(rng)
    return question, "\n".join(steps) + f"\n#### {final}"


def generate_builtin(split: str, size: int | None = None) -> list[tuple[str, str]]:
    """`size` distinct (question, answer) pairs of a split; none of train's is in test."""
    size = BUILTIN_SIZES[split] if size is None else size
    excluded: set[str] = set()
    if split == "train":
        excluded = {q for q, _ in generate_builtin("test")}
    problems, seen = [], set(excluded)
    seed = _SEED_BASE[split]
    while len(problems) < size:
        question, answer = generate_problem(seed)
        seed += 1
        if question not in seen:
            seen.add(question)
            problems.append((question, answer))
    return problems


# ---- the task ---------------------------------------------------------------------------------


class GSM8K(ListTask):
    """GSM8K train or test. Graded by the number after "####"; reward 1.0 or 0.0."""

    name = "GSM8K"
    eval_type = "generative"

    def __init__(
        self,
        split: str,
        source: str = "builtin",
        cache_dir: str | os.PathLike[str] | None = None,
        size: int | None = None,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        check_source(source)
        check_split(self.name, split, SPLITS)
        self.split = split
        if source == "hub":
            rows = hub.load_split(HUB_REPO, HUB_FOLDER, f"{split}-", cache_dir)
            pairs = [(row["question"], row["answer"]) for row in rows]
        else:
            pairs = generate_builtin(split, size)
        self._data = [make_conversation(q, a) for q, a in pairs]

    def gold_answer(self, conversation: dict[str, Any]) -> str | None:
        return extract_answer(message_text(conversation["messages"][-1]["content"]))

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        gold = self.gold_answer(conversation)
        predicted = extract_answer(completion)
        return gold is not None and predicted is not None and same_number(predicted, gold)
