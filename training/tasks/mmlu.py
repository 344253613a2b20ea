"""MMLU: four-choice questions over 57 school and professional subjects.

`mmlu` is the test split used for evaluation; `mmlu_aux` is MMLU's auxiliary_train split
(about 100K multiple-choice questions from other datasets), which teaches the answer-with-a-
letter format during fine-tuning and has no test split. Hub: the parquet files of `cais/mmlu`
(its "all" folder). Builtin: 40 questions over 8 subjects written for this project
(`data/mmlu.json`) and a few hundred generated auxiliary questions (arithmetic, units,
capitals, opposites, animal classes, sequences), deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.tasks import hub
from training.tasks.base import ListTask, check_source, check_split
from training.tasks.multiple_choice import MultipleChoiceTask, multiple_choice_conversation

HUB_REPO = "cais/mmlu"
HUB_FOLDER = "all"
BUILTIN_FILE = Path(__file__).parent / "data" / "mmlu.json"
AUX_SUBJECT = "auxiliary"
AUX_SIZE = 300
AUX_SEED = 1234

# ---- generated auxiliary questions ----------------------------------------------------------

# Kept apart from the builtin test questions (no Canada: the test asks for its capital).
_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Poland": "Warsaw", "Thailand": "Bangkok", "Argentina": "Buenos Aires",
    "Chile": "Santiago", "Sweden": "Stockholm", "Finland": "Helsinki", "Cuba": "Havana",
    "Vietnam": "Hanoi", "Hungary": "Budapest", "Denmark": "Copenhagen", "Mexico": "Mexico City",
}  # fmt: skip
_OPPOSITES = {
    "hot": "cold", "tall": "short", "early": "late", "happy": "sad", "full": "empty",
    "light": "dark", "open": "closed", "fast": "slow", "wet": "dry", "loud": "quiet",
    "strong": "weak", "rich": "poor", "hard": "soft", "first": "last", "up": "down",
    "inside": "outside", "young": "old", "heavy": "light", "win": "lose", "buy": "sell",
}  # fmt: skip
_ANIMAL_CLASSES = {
    "eagle": "bird", "penguin": "bird", "owl": "bird", "parrot": "bird",
    "salmon": "fish", "shark": "fish", "trout": "fish", "tuna": "fish",
    "frog": "amphibian", "salamander": "amphibian", "toad": "amphibian", "newt": "amphibian",
    "snake": "reptile", "turtle": "reptile", "crocodile": "reptile", "iguana": "reptile",
    "whale": "mammal", "bat": "mammal", "elephant": "mammal", "horse": "mammal",
}  # fmt: skip
_CATEGORIES = {
    # No word that fits two categories (orange, peach, plum: fruits and colors).
    "fruit": ["apple", "banana", "fig", "mango", "pear", "grape", "kiwi", "melon"],
    "color": ["red", "green", "blue", "yellow", "purple", "gray", "pink", "brown"],
    "musical instrument": ["piano", "violin", "guitar", "flute", "drum", "trumpet", "cello"],
    "vegetable": ["carrot", "potato", "onion", "spinach", "cabbage", "pea", "lettuce"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "chisel", "drill", "shovel"],
}


def _shuffled_choices(
    rng: random.Random, answer: str, distractors: list[str]
) -> tuple[list[str], int]:
    choices = [answer, *rng.sample(distractors, 3)]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _near_numbers(rng: random.Random, answer: int) -> list[str]:
    offsets = [-10, -2, -1, 1, 2, 10, 11, -11, 5, -5]
    return [str(answer + d) for d in offsets if answer + d >= 0]


def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        answer, word = a * b, "times"
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-":
            a, b = max(a, b), min(a, b)
        answer, word = (a + b, "plus") if op == "+" else (a - b, "minus")
    return f"What is {a} {word} {b}?", str(answer), _near_numbers(rng, answer)


def _largest(rng: random.Random) -> tuple[str, str, list[str]]:
    numbers = rng.sample(range(10, 1000), 4)
    best = max(numbers)
    others = [str(n) for n in numbers if n != best]
    # The question fixes the order of the four numbers, so no extra distractor is needed.
    return "Which of these numbers is the largest?", str(best), others


def _capital(rng: random.Random) -> tuple[str, str, list[str]]:
    country = rng.choice(sorted(_CAPITALS))
    others = [c for k, c in sorted(_CAPITALS.items()) if k != country]
    return f"What is the capital city of {country}?", _CAPITALS[country], others


def _opposite(rng: random.Random) -> tuple[str, str, list[str]]:
    word = rng.choice(sorted(_OPPOSITES))
    answer = _OPPOSITES[word]
    others = sorted({v for k, v in _OPPOSITES.items() if v != answer and k != answer})
    return f'Which word means the opposite of "{word}"?', answer, others


def _animal_class(rng: random.Random) -> tuple[str, str, list[str]]:
    animal = rng.choice(sorted(_ANIMAL_CLASSES))
    answer = _ANIMAL_CLASSES[animal]
    others = sorted(set(_ANIMAL_CLASSES.values()) - {answer})
    return f"To which group of animals does the {animal} belong?", answer, others


def _units(rng: random.Random) -> tuple[str, str, list[str]]:
    big, small, factor = rng.choice(
        [("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilometers", "meters", 1000), ("days", "hours", 24)]
    )  # fmt: skip
    n = rng.randint(2, 12)
    answer = n * factor
    wrong = {n * f for f in (10, 12, 24, 60, 100, 1000) if f != factor} | {answer + factor}
    return f"How many {small} are in {n} {big}?", str(answer), sorted(str(w) for w in wrong)


def _sequence(rng: random.Random) -> tuple[str, str, list[str]]:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    terms = [start + step * i for i in range(4)]
    answer = terms[-1] + step
    shown = ", ".join(str(t) for t in terms)
    wrong = [answer + 1, answer - 1, answer + step, terms[-1] + 1, answer * 2]
    return f"What number comes next: {shown}, ...?", str(answer), [str(w) for w in wrong]


def _category(rng: random.Random) -> tuple[str, str, list[str]]:
    category = rng.choice(sorted(_CATEGORIES))
    answer = rng.choice(_CATEGORIES[category])
    others = [w for c, words in sorted(_CATEGORIES.items()) if c != category for w in words]
    return f"Which of these is a {category}?", answer, others


_GENERATORS: tuple[Callable[[random.Random], tuple[str, str, list[str]]], ...] = (
    _arithmetic, _largest, _capital, _opposite, _animal_class, _units, _sequence, _category,
)  # fmt: skip


def generate_aux(size: int = AUX_SIZE, seed: int = AUX_SEED) -> list[dict[str, Any]]:
    """`size` distinct generated auxiliary questions (as conversations), same for a given seed."""
    rng = random.Random(seed)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    conversations = []
    while len(conversations) < size:
        question, answer, distractors = rng.choice(_GENERATORS)(rng)
        distractors = sorted(set(distractors) - {answer})
        choices, index = _shuffled_choices(rng, answer, distractors)
        key = (question, tuple(choices))
        if key in seen:
            continue
        seen.add(key)
        conversations.append(
            multiple_choice_conversation(question, choices, index, subject=AUX_SUBJECT)
        )
    return conversations


# ---- loading ----------------------------------------------------------------------------------


def load_builtin_test() -> list[dict[str, Any]]:
    data = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))["test"]
    return [
        multiple_choice_conversation(
            item["question"], item["choices"], item["answer"], subject=subject
        )  # fmt: skip
        for subject in sorted(data)
        for item in data[subject]
    ]


def _row_to_conversation(row: dict[str, Any], where: str) -> dict[str, Any]:
    # The auxiliary_train rows of some versions of the dataset are wrapped as {"train": row}.
    if isinstance(row.get("train"), dict):
        row = row["train"]
    try:
        return multiple_choice_conversation(
            row["question"], list(row["choices"]), int(row["answer"]), subject=row["subject"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not an MMLU row ({exc})") from exc


def load_hub(
    hub_split: str, cache_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of one split of `cais/mmlu` ("test", "validation", "dev", "auxiliary_train")."""
    rows = hub.load_split(HUB_REPO, HUB_FOLDER, f"{hub_split}-", cache_dir)
    where = f"{HUB_REPO} {HUB_FOLDER}/{hub_split}"
    return [_row_to_conversation(row, f"{where} row {i}") for i, row in enumerate(rows)]


class MMLU(MultipleChoiceTask, ListTask):
    """MMLU test (`subset="all"`) or auxiliary train (`subset="auxiliary_train"`).

    The builtin auxiliary set is generated: `size` questions from `seed`.
    """

    def __init__(
        self,
        subset: str,
        split: str,
        source: str = "builtin",
        cache_dir: str | os.PathLike[str] | None = None,
        size: int = AUX_SIZE,
        seed: int = AUX_SEED,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        check_source(source)
        allowed = {"all": ("test",), "auxiliary_train": ("train",)}
        if subset not in allowed:
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        self.name = "MMLU" if subset == "all" else "MMLU-aux"
        hint = " (train on mmlu_aux instead)" if subset == "all" else " (evaluate on mmlu)"
        check_split(self.name, split, allowed[subset], hint)
        self.subset, self.split = subset, split
        if source == "hub":
            self._data = load_hub("test" if subset == "all" else "auxiliary_train", cache_dir)
        elif subset == "all":
            self._data = load_builtin_test()
        else:
            self._data = generate_aux(size, seed)

    @property
    def subjects(self) -> list[str]:
        """The subjects present, sorted."""
        return sorted({conversation["subject"] for conversation in self._data})
