"""The demo model's skills: problem generators whose every byte the project writes (no outside text).

Each skill makes (question, answer) pairs from a seeded `random.Random`; the training set and the held-out
evaluation set come from different seeds, and the evaluation keeps only problems the training set lacks.
Skills: addition and subtraction of numbers up to 99, comparing numbers up to 999, unit conversion by
powers of ten, reversing and spelling a word, counting a letter, plus greetings and an honest
self-description. `WEIGHTS` gives each skill's share of the training problems: most go to what is hard
to learn (arithmetic), few to the fixed answers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from llamaforge.eval.tasks import DEMO_SKILLS

# Letters for made-up words: every word the model reverses or spells is new, so the skill must generalise.
CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
# Conversions by powers of ten: the answer is the number with zeros appended, which generalises to any n.
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
         ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("dollars", "cents", 100),
         ("centuries", "years", 100), ("decades", "years", 10)]
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
    """Two numbers from 0 to 99 (nine in ten have two digits); a difference may be negative."""
    return rng.randint(0, 99), rng.randint(0, 99)


def addition(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Compute {a} plus {b}."])
    return question.format(a=a, b=b), f"{a} + {b} = {a + b}.", (a, b)


def subtraction(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "Compute {a} minus {b}."])
    return question.format(a=a, b=b), f"{a} - {b} = {a - b}.", (a, b)


def compare(rng: random.Random) -> Problem:
    # The answer first restates the pair in the question's order with < or >, then names the one asked
    # for: copying in order is easy for a small model, picking one of two numbers to copy is not, and
    # here that pick comes from a short, regular distance.
    a, b = rng.sample(range(1000), 2)
    relation = f"{a} {'>' if a > b else '<'} {b}"
    if rng.random() < 0.5:
        question = rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"])
        return question.format(a=a, b=b), f"{relation}, so {max(a, b)} is larger.", (a, b)
    question = rng.choice(["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"])
    return question.format(a=a, b=b), f"{relation}, so {min(a, b)} is smaller.", (a, b)


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
    # The count (0-3) is drawn evenly: in natural words it is nearly always 1, and a model trained on
    # that learns to say 1 rather than to count.
    n = rng.randint(0, 3)
    letter = rng.choice(CONSONANTS + VOWELS)
    others = [c for c in CONSONANTS + VOWELS if c != letter]
    letters = [rng.choice(others) if c == letter else c for c in word(rng)]
    for i in rng.sample(range(len(letters)), n):
        letters[i] = letter
    w = "".join(letters)
    question = rng.choice(["How many times does the letter '{l}' appear in '{w}'?", "Count the letter '{l}' in '{w}'."])
    # The answer counts out loud, a running count after each letter: each step looks only at the letter
    # and the count before it, which a small model learns far sooner than counting in one go.
    running = ", ".join(f"{c} {w[:i + 1].count(letter)}" for i, c in enumerate(w))
    answer = f"{running}. The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in '{w}'."
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
# Skills scored on held-out problems, each a task of `llamaforge eval` (greetings and self-description
# have fixed answers).
EVALUATED = DEMO_SKILLS
# Share of the training problems per skill.
WEIGHTS = {"addition": 3.0, "subtraction": 4.0, "compare": 2.5, "convert": 0.75, "reverse": 1.25, "spell": 0.75,
           "count": 1.5, "greeting": 0.1, "self": 0.1}


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


def training(seed: int, size: int, excluded: list[dict]) -> list[dict]:
    """About `size` problems shared by `WEIGHTS`, none of them an evaluation problem in any phrasing."""
    rng = random.Random(seed)
    banned = {(row["skill"], tuple(row["key"])) for row in excluded}
    found: list[dict] = []
    for name in SKILLS:
        kept = 0
        while kept < round(size * WEIGHTS[name] / sum(WEIGHTS.values())):
            question, answer, key = SKILLS[name](rng)
            if (name, key) not in banned:
                found.append({"skill": name, "question": question, "answer": answer})
                kept += 1
    return found
