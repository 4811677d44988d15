"""The demo model's skills: problem generators whose every byte the project writes (no outside text).

Each skill makes (question, answer) pairs from a seeded `random.Random`; the training set and the held-out
evaluation set come from different seeds, and the evaluation keeps only problems the training set lacks.
Skills: 2-3 digit addition and subtraction, comparing numbers, unit conversion, reversing and spelling a
word, counting a letter, plus greetings and an honest self-description.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Letters for made-up words: every word the model reverses or spells is new, so the skill must generalise.
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7)]
SELF = ("I am llamaforge's small demo model. I can add and subtract numbers, compare them, convert units, "
        "and reverse, spell or count letters in a word. For real answers, point --model at Llama 2 weights.")
HELLO = "Hello! I am llamaforge's small demo model. Ask me to add, subtract, compare, convert, or spell."
GREETINGS = ["Hello", "Hi", "Hey", "Good morning", "Good evening", "Hi there", "Hello there"]
WHO = ["Who are you?", "What are you?", "What can you do?", "Tell me about yourself.", "What is your name?"]


def word(rng: random.Random) -> str:
    """A pronounceable made-up word of 3 to 7 letters."""
    length = rng.randint(3, 7)
    return "".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) if rng.random() < 0.85
                   else rng.choice(CONSONANTS + VOWELS) for i in range(length))


Problem = tuple[str, str, tuple]  # (question, answer, key: the problem whatever its phrasing)


def operands(rng: random.Random) -> tuple[int, int]:
    """Two numbers of 1-3 digits, mostly 2 (the skill the evaluation targets)."""
    return tuple(rng.randint(0, 10 ** rng.choice((2, 2, 3)) - 1) for _ in range(2))


def addition(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Compute {a} plus {b}."])
    return question.format(a=a, b=b), f"{a} + {b} = {a + b}.", (a, b)


def subtraction(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "Compute {a} minus {b}."])
    return question.format(a=a, b=b), f"{a} - {b} = {a - b}.", (a, b)


def compare(rng: random.Random) -> Problem:
    a, b = rng.sample(range(1000), 2)
    larger, smaller = max(a, b), min(a, b)
    if rng.random() < 0.5:
        question = rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"])
        return question.format(a=a, b=b), f"{larger} is larger than {smaller}.", (a, b)
    question = rng.choice(["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"])
    return question.format(a=a, b=b), f"{smaller} is smaller than {larger}.", (a, b)


def convert(rng: random.Random) -> Problem:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 999)
    question = rng.choice(["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}."])
    return question.format(small=small, n=n, big=big), f"{n} {big} is {n * factor} {small}.", (big, n)


def reverse(rng: random.Random) -> Problem:
    w = word(rng)
    question = rng.choice(["Reverse the word '{w}'.", "What is '{w}' backwards?", "Write '{w}' in reverse."])
    return question.format(w=w), f"'{w}' reversed is '{w[::-1]}'.", (w,)


def spell(rng: random.Random) -> Problem:
    w = word(rng)
    question = rng.choice(["Spell the word '{w}'.", "How do you spell '{w}'?", "Spell '{w}' letter by letter."])
    return question.format(w=w), "-".join(w), (w,)


def count(rng: random.Random) -> Problem:
    w = word(rng)
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice(CONSONANTS + VOWELS)
    n = w.count(letter)
    question = rng.choice(["How many times does the letter '{l}' appear in '{w}'?", "Count the letter '{l}' in '{w}'."])
    answer = f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in '{w}'."
    return question.format(l=letter, w=w), answer, (w, letter)


def greeting(rng: random.Random) -> Problem:
    hello = rng.choice(GREETINGS)
    question = rng.choice([hello, f"{hello}!", f"{hello}, how are you?"])
    return question, HELLO, ()


def self_description(rng: random.Random) -> Problem:
    return rng.choice(WHO), SELF, ()


SKILLS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": addition, "subtraction": subtraction, "compare": compare, "convert": convert,
    "reverse": reverse, "spell": spell, "count": count, "greeting": greeting, "self": self_description,
}
# Skills scored on held-out problems (greetings and self-description have fixed answers).
EVALUATED = ("addition", "subtraction", "compare", "convert", "reverse", "spell", "count")


def held_out(seed: int, per_skill: int) -> list[dict]:
    """Evaluation problems: `per_skill` distinct problems of each evaluated skill."""
    rng = random.Random(seed)
    found: list[dict] = []
    for name in EVALUATED:
        keys: set[tuple] = set()
        while len(keys) < per_skill:
            question, answer, key = SKILLS[name](rng)
            if key not in keys:
                keys.add(key)
                found.append({"skill": name, "question": question, "answer": answer, "key": list(key)})
    return found


def training(seed: int, per_skill: int, excluded: list[dict]) -> list[dict]:
    """`per_skill` problems of every skill, none of them an evaluation problem in any phrasing."""
    rng = random.Random(seed)
    banned = {(row["skill"], tuple(row["key"])) for row in excluded}
    found: list[dict] = []
    for name in SKILLS:
        kept = 0
        while kept < per_skill:
            question, answer, key = SKILLS[name](rng)
            if (name, key) not in banned:
                found.append({"skill": name, "question": question, "answer": answer})
                kept += 1
    return found
