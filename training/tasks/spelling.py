"""Synthetic spelling tasks: SpellingBee (count a letter in a word) and SimpleSpelling.

Tokens hide letters: a model sees "strawberry" as two or three opaque ids, so it cannot count
the r's by looking. SimpleSpelling teaches the mapping from a word to its letters
("strawberry:s,t,r,a,w,b,e,r,r,y"); SpellingBee teaches a procedure that uses it: spell the
word, walk through the letters keeping a count, then confirm with the calculator tool
(`'strawberry'.count('r')`), and give the answer after "####" like GSM8K.

Examples are generated on demand from their index: example i of a split always uses the same
seed (train i -> i, test i -> TEST_SEED_OFFSET + i), so a task of any size costs nothing to
build and train and test never share a seed. Words come from a word list: builtin
`data/words.txt` (about two thousand English words found in the prose of the Python standard
library's docstrings, see `build_word_list`) or, for "hub", the dwyl english-words list
(~370K words) downloaded once into the cache directory.
"""

from __future__ import annotations

import ast
import collections
import keyword
import os
import random
import re
import string
import sys
import sysconfig
from pathlib import Path
from typing import Any

from engine.calculator import _is_allowed_string_expression
from engine.fileio import atomic_write
from training.tasks import hub
from training.tasks.base import Task, check_source, check_split
from training.tasks.gsm8k import extract_answer, same_number

BUILTIN_WORDS = Path(__file__).parent / "data" / "words.txt"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_FILE = "words_alpha.txt"
SPLITS = ("train", "test")
TEST_SEED_OFFSET = 10_000_000
# How often the letter asked about is taken from the word; otherwise any letter (maybe absent).
LETTER_FROM_WORD = 0.7

_BEE_QUESTIONS = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the letter {letter} in {word}.",
    "How many {letter}s are in {word}?",
    'In the word "{word}", how many times does {letter} occur?',
    "how many {letter} in {word}",
    "What is the number of '{letter}' letters in the word '{word}'?",
    "Can you count how many times {letter} shows up in {word}?",
)


def _clean_words(lines: list[str]) -> list[str]:
    words = (line.strip() for line in lines)
    return sorted({w for w in words if w.isascii() and w.isalpha() and w.islower()})


def load_words(
    source: str = "builtin", cache_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """The sorted word list of a source (lowercase ASCII letters only)."""
    check_source(source)
    if source == "builtin":
        path = BUILTIN_WORDS
    else:
        path = hub.download_file(WORDS_URL, hub.resolve_cache_dir(cache_dir) / WORDS_FILE)
    words = _clean_words(path.read_text(encoding="utf-8", errors="replace").splitlines())
    if not words:
        raise ValueError(f"{path}: no words")
    return words


def build_word_list(min_modules: int = 2) -> list[str]:
    """Regenerate the builtin list: words of stdlib docstring prose (how data/words.txt was made).

    A word is kept when it is 3-12 lowercase letters, appears in the docstrings of at least
    `min_modules` top-level stdlib modules, is not a module name or keyword, and those modules
    use it as an identifier no more often than as prose (which drops `kwargs`, `struct`, ...).
    The result depends on the Python version, which is why the list is shipped, not rebuilt.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    word_pattern = re.compile(r"(?<![\w.'`])[a-z]{3,12}(?![\w'`(])")
    prose: collections.Counter[str] = collections.Counter()
    identifiers: collections.Counter[str] = collections.Counter()
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        in_prose, as_names = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                in_prose.update(word_pattern.findall(ast.get_docstring(node) or ""))
            if isinstance(node, ast.Name):
                as_names.add(node.id)
            elif isinstance(node, ast.Attribute):
                as_names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                as_names.add(node.name)
            elif isinstance(node, ast.arg):
                as_names.add(node.arg)
        prose.update(in_prose)
        identifiers.update(as_names)
    return sorted(
        word
        for word, count in prose.items()
        if count >= min_modules
        and word not in sys.stdlib_module_names
        and not keyword.iskeyword(word)
        and identifiers[word] <= count
    )


def spelled(word: str) -> str:
    """ "apple" -> "apple:a,p,p,l,e"."""
    return f"{word}:{','.join(word)}"


class _WordTask(Task):
    """A generated task: example i is built from a seed fixed by the split and i."""

    eval_type = "generative"

    def __init__(
        self,
        split: str,
        size: int,
        source: str = "builtin",
        cache_dir: str | os.PathLike[str] | None = None,
        words: list[str] | None = None,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        check_split(self.name, split, SPLITS)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{self.name} size must be a positive int, got {size!r}")
        self.split, self.size = split, size
        self.words = words if words is not None else load_words(source, cache_dir)
        if not self.words:
            raise ValueError(f"{self.name}: the word list is empty")

    def num_examples(self) -> int:
        return self.size

    def seed(self, index: int) -> int:
        return index if self.split == "train" else TEST_SEED_OFFSET + index


class SpellingBee(_WordTask):
    """Count one letter in a word; the answer ends "#### <count>", graded like GSM8K."""

    name = "SpellingBee"

    def get_example(self, index: int) -> dict[str, Any]:
        rng = random.Random(self.seed(index))
        word = rng.choice(self.words)
        # The calculator refuses expressions containing words like "exec" or "open" (a guard
        # against code injection), so a word such as "executable" could never be checked with
        # the tool at inference time: draw again (deterministically) instead of teaching an
        # output the tool would not give.
        for _ in range(1000):
            if _is_allowed_string_expression(f"'{word}'.count('a')"):
                break
            word = rng.choice(self.words)
        else:
            raise ValueError(f"{self.name}: the calculator refuses almost every word of the list")
        if rng.random() < LETTER_FROM_WORD:
            letter = rng.choice(word)
        else:
            letter = rng.choice(string.ascii_lowercase)
        question = rng.choice(_BEE_QUESTIONS).format(letter=letter, word=word)
        count = word.count(letter)
        steps, running = [], 0
        for position, char in enumerate(word, 1):
            if char == letter:
                running += 1
                steps.append(f"{position}:{char} hit! count={running}")
            else:
                steps.append(f"{position}:{char}")
        manual = (
            f"We are asked how many times the letter '{letter}' appears in the word '{word}'. "
            f"First I spell the word out:\n{spelled(word)}\n\n"
            f"Then I go through the letters one by one, counting each '{letter}':\n"
            + "\n".join(steps)
            + f"\n\nThat gives {count}.\n\nLet me double-check with Python:\n\n"
        )
        parts = [
            {"type": "text", "text": manual},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython also gives {count}.\n\n#### {count}"},
        ]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": parts},
            ],
            "word": word,
            "letter": letter,
        }

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        gold = str(conversation["word"].count(conversation["letter"]))
        predicted = extract_answer(completion)
        return predicted is not None and same_number(predicted, gold)


class SimpleSpelling(_WordTask):
    """Spell a word out letter by letter: "Spell the word: apple" -> "apple:a,p,p,l,e"."""

    name = "SimpleSpelling"

    def get_example(self, index: int) -> dict[str, Any]:
        word = random.Random(self.seed(index)).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": spelled(word)},
            ],
            "word": word,
        }

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        # Only the letters after the last ":" count; spacing around the commas does not.
        letters = completion.rsplit(":", 1)[-1]
        return "".join(letters.split()) == ",".join(conversation["word"])


def write_builtin_words(path: str | os.PathLike[str] = BUILTIN_WORDS) -> int:
    """Write `build_word_list()` to `path` (atomically); returns the number of words."""
    words = build_word_list()
    atomic_write(path, lambda f: f.write(("\n".join(words) + "\n").encode()))
    return len(words)


if __name__ == "__main__":
    print(f"wrote {write_builtin_words()} words to {BUILTIN_WORDS}")
