"""SmolTalk: general-purpose conversations for chat fine-tuning (no grader).

Hub: `HuggingFaceTB/smol-smoltalk`, the subset of SmolTalk meant for small models (~460K
train and ~24K test conversations); rows are converted on access, so the whole split is never
held as Python objects. Builtin: a few hundred short conversations generated from templates
with a seeded RNG -- greetings, definitions, small facts, text chores whose answers are
computed (sorting, reversing, counting words), arithmetic, unit conversions, tips, lists,
follow-up turns and system prompts -- so the offline pipeline fine-tunes on something
conversation-shaped. Train and test are generated from separate seeds and never share a
conversation.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.tasks import hub
from training.tasks.base import Task, check_source, check_split

HUB_REPO = "HuggingFaceTB/smol-smoltalk"
HUB_FOLDER = "data"
SPLITS = ("train", "test")
BUILTIN_SIZES = {"train": 240, "test": 48}
_SEED_BASE = {"test": 0, "train": 1_000_000}

Messages = list[dict[str, str]]

_GREETINGS = ("Hi!", "Hello", "Hey there!", "Good morning!", "Hello, how are you?", "hi",
              "Good evening!", "Hey, how's it going?")  # fmt: skip
_GREETING_REPLIES = (
    "Hello! How can I help you today?",
    "Hi there! What would you like to talk about?",
    "Hey! I'm happy to help. What's on your mind?",
    "Hello! I'm doing well, thanks for asking. What can I do for you?",
)
_FOLLOW_UPS = (
    ("What can you help me with?",
     "I can answer questions, explain ideas in simple terms, help with short pieces of writing, "
     "do quick calculations, and suggest ideas. Just ask!"),
    ("Can you help me with something?", "Of course! Tell me what you need and I'll do my best."),
    ("I'm just bored.",
     "Let's fix that! I could tell you a fun fact, give you a quick riddle, or help you plan "
     "something to do. Which sounds good?"),
)  # fmt: skip

# term -> definition; terms carry their article so questions read naturally.
_DEFINITIONS = {
    "photosynthesis": "Photosynthesis is the process plants use to turn sunlight, water and "
    "carbon dioxide into sugar for energy, releasing oxygen as a by-product.",
    "gravity": "Gravity is the force that pulls objects with mass toward each other. It keeps "
    "us on the ground and keeps the Moon in orbit around Earth.",
    "a noun": "A noun is a word that names a person, place, thing or idea, such as 'teacher', "
    "'city', 'book' or 'freedom'.",
    "a verb": "A verb is a word that describes an action or a state, such as 'run', 'think' or "
    "'is'.",
    "an adjective": "An adjective is a word that describes a noun, such as 'blue', 'tall' or "
    "'happy'.",
    "democracy": "Democracy is a system of government in which people choose their leaders and "
    "make decisions by voting.",
    "an atom": "An atom is the smallest unit of a chemical element. It has a nucleus of protons "
    "and neutrons, surrounded by electrons.",
    "a volcano": "A volcano is an opening in Earth's crust where melted rock, ash and gases "
    "escape from below the surface.",
    "inflation": "Inflation is the general rise in prices over time, which means the same amount "
    "of money buys less than before.",
    "an algorithm": "An algorithm is a step-by-step set of instructions for solving a problem or "
    "completing a task, like a recipe a computer can follow.",
    "a metaphor": "A metaphor is a figure of speech that describes something by saying it is "
    "something else, like 'time is a thief'.",
    "evaporation": "Evaporation is when a liquid turns into a gas, like water slowly drying from "
    "a puddle on a sunny day.",
    "a mammal": "A mammal is a warm-blooded animal with hair or fur that feeds its young with "
    "milk. Dogs, whales and humans are mammals.",
    "an ecosystem": "An ecosystem is a community of living things together with their "
    "environment, like a pond, a forest or a coral reef.",
    "a prime number": "A prime number is a whole number greater than 1 whose only divisors are 1 "
    "and itself, such as 2, 3, 5, 7 and 11.",
    "a fraction": "A fraction represents a part of a whole. It is written as one number over "
    "another, like 3/4, meaning three of four equal parts.",
    "friction": "Friction is the force that resists motion when two surfaces rub against each "
    "other. It is why a rolling ball eventually stops.",
    "a galaxy": "A galaxy is a huge system of stars, gas and dust held together by gravity. Our "
    "solar system is in the Milky Way galaxy.",
    "a virus": "A virus is a tiny infectious agent that can only reproduce inside the cells of a "
    "living host.",
    "a vaccine": "A vaccine trains the immune system to recognize a germ, so the body can fight "
    "it off quickly if it is exposed later.",
    "a database": "A database is an organized collection of data stored so that it can be "
    "searched, updated and managed easily.",
    "recycling": "Recycling is turning used materials such as paper, glass and plastic into new "
    "products instead of throwing them away.",
    "a budget": "A budget is a plan for how much money you expect to earn and how you will spend "
    "or save it.",
    "a haiku": "A haiku is a short Japanese-style poem of three lines with five, seven and five "
    "syllables.",
    "a peninsula": "A peninsula is a piece of land surrounded by water on three sides, like "
    "Italy or Florida.",
    "erosion": "Erosion is the wearing away of rock and soil by wind, water or ice, which slowly "
    "reshapes the land.",
    "a battery": "A battery stores chemical energy and releases it as electricity to power "
    "devices.",
    "a synonym": "A synonym is a word with the same or nearly the same meaning as another word, "
    "like 'big' and 'large'.",
    "a calorie": "A calorie is a unit of energy. On food labels it tells you how much energy the "
    "food gives your body.",
    "a hurricane": "A hurricane is a large, powerful storm with strong winds and heavy rain that "
    "forms over warm ocean water.",
    "a fossil": "A fossil is the preserved remains or traces of a plant or animal that lived "
    "long ago, usually found in rock.",
    "a compass": "A compass is a tool with a magnetized needle that points north, used to find "
    "directions.",
}
_DEFINITION_QUESTIONS = (
    "What is {term}?", "Can you explain what {term} is?", "Define {bare}.",
    "What does the word '{bare}' mean?", "Explain {term} in simple words.",
    "I keep hearing about {bare}. What is it?",
)  # fmt: skip

_FACTS = (
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in our "
     "solar system."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, "
     "Australia, Europe, North America and South America."),
    ("What gas do plants release?", "Plants release oxygen during photosynthesis."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain above sea "
     "level, at about 8,849 meters."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O: two "
     "hydrogen atoms and one oxygen atom."),
    ("Which is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("How many colors are in a rainbow?", "A rainbow is usually described as having seven "
     "colors: red, orange, yellow, green, blue, indigo and violet."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What is the boiling point of water at sea level?", "At sea level, water boils at 100 "
     "degrees Celsius, which is 212 degrees Fahrenheit."),
    ("How many players are on a soccer team on the field?", "Each soccer team has 11 players on "
     "the field, including the goalkeeper."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
)  # fmt: skip
_FACT_PREFIXES = ("", "Quick question: ", "I was wondering, ", "Hey, ")

_SIMPLE_WORDS = ("apple", "river", "candle", "mountain", "garden", "window", "planet", "basket",
                 "tiger", "violin", "forest", "pencil", "ocean", "bridge", "cloud", "rocket",
                 "lemon", "castle", "meadow", "anchor")  # fmt: skip
_SENTENCES = (
    "the cat sat on the warm windowsill",
    "we are going to the park after lunch",
    "learning a new language takes patience",
    "please remember to water the plants",
    "the train leaves at seven in the morning",
    "my favorite season is autumn",
    "she wrote a letter to her grandmother",
    "small steps add up to big changes",
)
_TIPS = {
    "sleeping better": ["Go to bed and wake up at the same time every day.",
                        "Keep screens out of the bedroom for the last hour before sleep.",
                        "Keep your room cool, dark and quiet.",
                        "Avoid caffeine in the afternoon and evening."],
    "studying for an exam": ["Start early and study a little every day instead of cramming.",
                             "Test yourself with practice questions.",
                             "Take short breaks every 25 to 50 minutes.",
                             "Explain the material out loud as if teaching someone else."],
    "staying focused at work": ["Write down the three most important tasks for the day.",
                                "Turn off notifications while you work on one task.",
                                "Work in short, timed blocks with breaks in between.",
                                "Keep your desk clear of distractions."],
    "saving money": ["Track what you spend for a month to see where it goes.",
                     "Set up an automatic transfer to savings on payday.",
                     "Wait a day before making any unplanned purchase.",
                     "Cook at home more often."],
    "writing an essay": ["Start with a clear main idea you can state in one sentence.",
                         "Make a short outline before you write.",
                         "Support each point with an example or evidence.",
                         "Read the essay out loud to catch awkward sentences."],
    "staying healthy": ["Drink enough water during the day.",
                        "Move your body for at least 30 minutes most days.",
                        "Eat plenty of vegetables and fruit.",
                        "Get enough sleep."],
}  # fmt: skip
_LISTS = {
    "fruits": ["apples", "bananas", "oranges", "grapes", "mangoes", "pears", "strawberries"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "white"],
    "mammals": ["dogs", "elephants", "whales", "horses", "bats", "lions", "rabbits"],
    "programming languages": ["Python", "JavaScript", "C", "Rust", "Java", "Go", "Ruby"],
    "planets": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "musical instruments": ["piano", "guitar", "violin", "drums", "flute", "trumpet", "cello"],
}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Keep your answers short.",
    "You are a patient tutor who explains things simply.",
)
_THANKS = ("Thanks!", "Thank you, that helps.", "Great, thanks a lot!", "ok thanks")
_WELCOMES = ("You're welcome!", "Happy to help!", "Glad I could help. Anything else?",
             "Anytime! Let me know if you have more questions.")  # fmt: skip


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _greeting(rng: random.Random) -> Messages:
    messages = [{"role": "user", "content": rng.choice(_GREETINGS)},
                {"role": "assistant", "content": rng.choice(_GREETING_REPLIES)}]  # fmt: skip
    if rng.random() < 0.5:
        question, answer = rng.choice(_FOLLOW_UPS)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]  # fmt: skip
    return messages


def _definition(rng: random.Random) -> Messages:
    term = rng.choice(sorted(_DEFINITIONS))
    bare = term.split(" ", 1)[1] if term.startswith(("a ", "an ")) else term
    question = rng.choice(_DEFINITION_QUESTIONS).format(term=term, bare=bare)
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": _DEFINITIONS[term]}]  # fmt: skip


def _fact(rng: random.Random) -> Messages:
    question, answer = rng.choice(_FACTS)
    prefix = rng.choice(_FACT_PREFIXES)
    if prefix:
        question = prefix + question[0].lower() + question[1:]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _text_chore(rng: random.Random) -> Messages:
    kind = rng.randrange(4)
    if kind == 0:
        words = rng.sample(_SIMPLE_WORDS, rng.randint(3, 6))
        question = f"Sort these words alphabetically: {', '.join(words)}"
        answer = f"Here they are in alphabetical order: {', '.join(sorted(words))}."
    elif kind == 1:
        word = rng.choice(_SIMPLE_WORDS)
        question = f"Write the word '{word}' backwards."
        answer = f"'{word}' written backwards is '{word[::-1]}'."
    elif kind == 2:
        sentence = rng.choice(_SENTENCES)
        question = f"Convert this to uppercase: {sentence}"
        answer = sentence.upper()
    else:
        sentence = rng.choice(_SENTENCES)
        question = f'How many words are in this sentence: "{sentence}"?'
        answer = f"That sentence has {len(sentence.split())} words."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _arithmetic(rng: random.Random) -> Messages:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question, answer = f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    elif kind == 1:
        a, b = rng.randint(10, 500), rng.randint(10, 500)
        question, answer = f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."
    elif kind == 2:
        a, b = sorted((rng.randint(10, 500), rng.randint(10, 500)), reverse=True)
        question, answer = f"What's {a} minus {b}?", f"{a} minus {b} is {a - b}."
    else:
        percent, n = rng.choice((10, 20, 25, 50)), 20 * rng.randint(1, 30)
        question = f"What is {percent}% of {n}?"
        answer = f"{percent}% of {n} is {n * percent // 100}."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _conversion(rng: random.Random) -> Messages:
    kind = rng.randrange(3)
    if kind == 0:
        km = rng.randint(2, 40)
        question = f"How many meters are in {km} kilometers?"
        answer = (
            f"There are {km * 1000} meters in {km} kilometers, since 1 kilometer is 1000 meters."
        )
    elif kind == 1:
        hours = rng.randint(2, 12)
        question = f"How many minutes are in {hours} hours?"
        answer = f"{hours} hours is {hours * 60} minutes."
    else:
        celsius = 5 * rng.randint(-4, 20)
        fahrenheit = celsius * 9 // 5 + 32
        question = f"Convert {celsius} degrees Celsius to Fahrenheit."
        answer = (f"{celsius} degrees Celsius is {fahrenheit} degrees Fahrenheit "
                  f"(multiply by 9/5, then add 32).")  # fmt: skip
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _tips(rng: random.Random) -> Messages:
    topic = rng.choice(sorted(_TIPS))
    count = rng.randint(2, 4)
    tips = rng.sample(_TIPS[topic], count)
    question = rng.choice(("Give me {n} tips for {topic}.", "What are {n} tips for {topic}?",
                           "Can you share {n} ideas for {topic}?")).format(
        n=_NUMBER_WORDS[count], topic=topic)  # fmt: skip
    body = "\n".join(f"{i}. {tip}" for i, tip in enumerate(tips, 1))
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": f"Here are {_NUMBER_WORDS[count]} tips for "
                                             f"{topic}:\n{body}"}]  # fmt: skip


def _listing(rng: random.Random) -> Messages:
    category = rng.choice(sorted(_LISTS))
    count = rng.randint(2, 4)
    items = rng.sample(_LISTS[category], count)
    n = _NUMBER_WORDS[count]
    return [{"role": "user", "content": f"Name {n} {category}."},
            {"role": "assistant", "content": f"Here are {n} {category}: {_join(items)}."}]  # fmt: skip


_FAMILIES: tuple[Callable[[random.Random], Messages], ...] = (
    _greeting, _definition, _fact, _text_chore, _arithmetic, _conversion, _tips, _listing,
)  # fmt: skip


def generate_conversation(seed: int) -> dict[str, Any]:
    """One builtin conversation: a template family's exchange, maybe a system prompt or thanks."""
    rng = random.Random(seed)
    messages = rng.choice(_FAMILIES)(rng)
    if rng.random() < 0.2:
        messages += [{"role": "user", "content": rng.choice(_THANKS)},
                     {"role": "assistant", "content": rng.choice(_WELCOMES)}]  # fmt: skip
    if rng.random() < 0.15:
        messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}, *messages]
    return {"messages": messages}


def generate_builtin(split: str, size: int | None = None) -> list[dict[str, Any]]:
    """`size` distinct conversations of a split; train never repeats a test conversation."""
    size = BUILTIN_SIZES[split] if size is None else size
    seen: set[str] = set()
    if split == "train":
        seen = {json.dumps(c, sort_keys=True) for c in generate_builtin("test")}
    conversations, seed = [], _SEED_BASE[split]
    while len(conversations) < size:
        conversation = generate_conversation(seed)
        seed += 1
        key = json.dumps(conversation, sort_keys=True)
        if key not in seen:
            seen.add(key)
            conversations.append(conversation)
    return conversations


class SmolTalk(Task):
    """SmolTalk conversations (training and validation loss only: there is no grader)."""

    name = "SmolTalk"
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
        self._rows: list[dict[str, Any]] | None = None
        self._column: Any = None
        if source == "hub":
            paths = hub.fetch_split(HUB_REPO, HUB_FOLDER, f"{split}-", cache_dir)
            tables = [pq.read_table(p, columns=["messages"]) for p in paths]
            self._column = pa.concat_tables(tables).column("messages")
        else:
            self._rows = generate_builtin(split, size)

    def num_examples(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._column)

    def get_example(self, index: int) -> dict[str, Any]:
        if self._rows is not None:
            return json.loads(json.dumps(self._rows[index]))
        messages = self._column[index].as_py()
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
