"""The demo model's skills: problem generators whose every byte the project writes (no outside text).

Each skill makes (question, answer) pairs from a seeded `random.Random`; the training set and the held-out
evaluation set come from different seeds, and the evaluation keeps only problems the training set lacks.
Skills: addition and subtraction of numbers up to 99, comparing numbers up to 999, unit conversion by
powers of ten, reversing and spelling a word, counting a letter, plus greetings, an honest
self-description, and for anything else one sentence saying what it can do. `WEIGHTS` gives each skill's
share of the training problems: most go to what is hard to learn (arithmetic), few to the fixed answers.

Questions come as people type them (`rephrase`: "47+38", lower case, no "?", "what's"), and in dialogs
(`dialog`): a question may follow earlier exchanges of any skill, and the answer is to the last one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from llamaforge.eval.tasks import DEMO_SKILLS, DEMO_VARIANTS

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
# The one answer to everything outside the skills: honest, and the same each time.
CAPABILITY = ("I can only add and subtract numbers up to 99, compare two numbers, convert units by powers of ten, "
              "and reverse, spell or count letters in a word.")
GREETINGS = ["Hello", "Hi", "Hey", "Good morning", "Good evening", "Hi there", "Hello there"]
WHO = ["Who are you?", "What are you?", "What can you do?", "Tell me about yourself.", "What is your name?",
       "Who made you?", "Are you a human?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "Be concise.", "You are a friendly assistant.",
                  "Answer the question."]

Problem = tuple[str, str, tuple]  # (question, answer, key: the problem whatever its phrasing)


def word(rng: random.Random) -> str:
    """A pronounceable made-up word of 3 to 7 letters."""
    length = rng.randint(3, 7)
    return "".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) if rng.random() < 0.85
                   else rng.choice(CONSONANTS + VOWELS) for i in range(length))


# Digit counts of the two operands and how often each pair is drawn. Uniform numbers from 0 to 99 give
# a 1-digit operand to only 19% of problems and two of them to 1%, and a model trained on that answered
# "0 + 0 = 4." and "9 - 48 = 43.": each mix now has its share.
OPERAND_DIGITS = {(2, 2): 0.6, (1, 2): 0.15, (2, 1): 0.15, (1, 1): 0.1}
# A one-digit operand is 0 one time in five (else 1-9): adding or taking away nothing was the rule a model
# trained on uniform digits got wrong most ("0 + 6 = 4.", 5 of its 6 misses on held-out sums).
ZERO = 0.2


def number(rng: random.Random, digits: int) -> int:
    """A number of one digit (0 as often as ZERO says) or of two."""
    if digits == 2:
        return rng.randint(10, 99)
    return 0 if rng.random() < ZERO else rng.randint(1, 9)


def operands(rng: random.Random) -> tuple[int, int]:
    """Two numbers from 0 to 99, with one- and two-digit ones mixed as OPERAND_DIGITS says."""
    first, second = rng.choices(list(OPERAND_DIGITS), list(OPERAND_DIGITS.values()))[0]
    return number(rng, first), number(rng, second)


def addition(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Compute {a} plus {b}."])
    return question.format(a=a, b=b), f"{a} + {b} = {a + b}.", (a, b)


def subtraction(rng: random.Random) -> Problem:
    a, b = operands(rng)
    question = rng.choice(["What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "Compute {a} minus {b}."])
    return question.format(a=a, b=b), f"{a} - {b} = {a - b}.", (a, b)


def compare(rng: random.Random) -> Problem:
    return compare_pair(rng, *rng.sample(range(1000), 2))


def compare_pair(rng: random.Random, a: int, b: int) -> Problem:
    """Which of a and b is larger (or smaller), asked one of four ways."""
    # The answer first restates the pair in the question's order with < or >, then names the one asked
    # for: copying in order is easy for a small model, picking one of two numbers to copy is not, and
    # here that pick comes from a short, regular distance.
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


# Questions outside the skills, for the one answer that says what the model can do. Their words become
# pieces of the tokenizer; anything else a person types is spelt letter by letter, as made-up words are.
PLACES = ["France", "Spain", "Italy", "Germany", "Japan", "China", "Brazil", "Egypt", "Canada", "Peru", "Kenya",
          "India", "Norway", "Chile", "Mexico", "Greece", "Poland", "Ireland", "Sweden", "Australia", "Texas",
          "the moon", "Mars", "Europe", "the country"]
TOPICS = ["the sea", "love", "a cat", "spring", "the moon", "llamas", "rain", "a king", "my dog", "the war",
          "music", "history", "the stars", "coffee", "friendship", "winter", "a robot", "the city", "money",
          "science", "football", "the weather", "my job", "Paris", "computers", "death", "food", "time"]
FORMS = ["a poem", "a story", "a song", "a joke", "a letter", "an essay", "a haiku", "a speech", "a summary",
         "a recipe"]
EVENTS = ["world cup", "election", "last game", "Nobel prize", "race", "war", "match", "award", "final",
          "Super Bowl", "tournament"]
REAL_WORDS = ["apple", "table", "run", "blue", "house", "green", "water", "tree", "car", "happy", "book", "sky",
              "dog", "big", "fast", "light", "night", "stone", "river", "paper", "red", "cold", "music", "phone"]
# Each is a question whose slots ({topic} ...) take a filler; held-out questions differ from training ones.
OFFTOPIC = [
    "What is the capital of {place}?", "Where is {place}?", "How big is {place}?", "Who lives in {place}?",
    "What language do they speak in {place}?", "Who won the {event}?", "When is the next {event}?",
    "Who will win the {event}?", "Write {form} about {topic}.", "Write {form}.", "Tell me {form}.",
    "Tell me about {topic}.", "Tell me {form} about {topic}.", "What do you think about {topic}?",
    "Explain {topic}.", "Why is the sky blue?", "What time is it?", "What day is it today?",
    "How is the weather today?", "What is the meaning of life?", "Can you help me with my homework?",
    "How do I cook {food}?", "What is your favorite {thing}?", "Do you like {topic}?", "What is {topic}?",
    "Translate '{real}' into French.", "What does '{real}' mean?", "Use '{real}' in a sentence.",
    "What rhymes with '{real}'?", "Define {real}.", "Is {topic} good or bad?", "Summarize {topic} for me.",
    "What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.", "Divide {a} by {b}.",
    "What is {a} / {b}?", "What is the square root of {a}?", "What is {a} squared?",
    "What is {big} + {b}?", "What is {a} - {big}?", "Add {big} and {b}.", "Which is larger, {huge} or {b}?",
    "What is the largest number?", "How old are you?", "Where do you live?", "What is the best movie?",
    "Recommend a book.", "Give me a list of {thing}s.", "How do I fix my {thing}?", "Should I buy a {thing}?",
    "What is the price of {food}?",
]
FOODS = ["rice", "pasta", "eggs", "bread", "soup", "fish", "potatoes", "beans", "chicken", "cake"]
THINGS = ["color", "car", "phone", "animal", "computer", "bike", "song", "food", "book", "game"]


def out_of_scope(rng: random.Random) -> Problem:
    """A question the model cannot answer, or words that are no question at all; its key is the text itself."""
    if rng.random() < 0.2:  # words, made up or real, in no question's shape
        words = [word(rng) if rng.random() < 0.6 else rng.choice(REAL_WORDS) for _ in range(rng.randint(1, 5))]
        text = " ".join(words)
        text = (text[0].upper() + text[1:] if rng.random() < 0.5 else text) + rng.choice(["", "", "?", ".", "!"])
        return text, CAPABILITY, ("words", plain(text))
    question = rng.choice(OFFTOPIC).format(
        place=rng.choice(PLACES), event=rng.choice(EVENTS), form=rng.choice(FORMS), topic=rng.choice(TOPICS),
        food=rng.choice(FOODS), thing=rng.choice(THINGS), real=rng.choice(REAL_WORDS), a=rng.randint(2, 99),
        b=rng.randint(2, 99), big=rng.randint(100, 999), huge=rng.randint(1000, 99999))
    return question, CAPABILITY, ("question", plain(question))


def plain(text: str) -> str:
    """The words of a text, whatever its case and final punctuation: an out-of-scope problem's key."""
    return text.lower().rstrip("?.!")


SKILLS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": addition, "subtraction": subtraction, "compare": compare, "convert": convert,
    "reverse": reverse, "spell": spell, "count": count, "out_of_scope": out_of_scope, "greeting": greeting,
    "self": self_description,
}
# Skills scored on held-out problems, each a task of `llamaforge eval` (greetings and self-description
# have fixed answers to a handful of questions).
EVALUATED = DEMO_SKILLS
# Share of the training problems per skill.
WEIGHTS = {"addition": 4.0, "subtraction": 6.5, "compare": 2.0, "convert": 0.6, "reverse": 2.0, "spell": 0.6,
           "count": 1.5, "out_of_scope": 0.6, "greeting": 0.1, "self": 0.1}


def rephrase(rng: random.Random, question: str) -> str:
    """The question as people also type it: "47+38" or "47 +38", "What's", lower case, no final "?" or "."."""
    if rng.random() < 0.5:
        question = re.sub(r" ([+\-=]) ", lambda m: rng.choice(["{}", " {}", "{} ", " {} "]).format(m[1]), question)
    if question.startswith("What is") and rng.random() < 0.5:
        question = "What's" + question[len("What is"):]
    if rng.random() < 0.4:
        question = question.lower()
    if question[-1:] in ("?", ".", "!") and rng.random() < 0.4:
        question = question[:-1].rstrip()
    return question


# How often a training question is rephrased, and how often a dialog starts with a system prompt.
REPHRASED, SYSTEM = 0.5, 0.05
# Earlier exchanges before an evaluated question in a multi-turn problem, and the most characters (questions,
# answers and system prompt) such a dialog has: at most about 250 tokens, within the 256-token training rows.
EARLIER_TURNS = (1, 5)
DIALOG_CHARS = 330


def exchange(rng: random.Random) -> dict:
    """One exchange of any skill as the training problems mix them, the question sometimes rephrased."""
    name = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
    question, answer, _ = SKILLS[name](rng)
    if rng.random() < REPHRASED:
        question = rephrase(rng, question)
    return {"skill": name, "question": question, "answer": answer}


def dialog(earlier: list[dict], question: str, system: str | None = None) -> list[dict]:
    """Messages of a dialog: the earlier exchanges answered, then the question."""
    messages = [{"role": "system", "content": system}] if system else []
    for turn in earlier:
        messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["answer"]}]
    return messages + [{"role": "user", "content": question}]


def history(rng: random.Random, question: str, answer: str) -> list[dict]:
    """1 to 5 earlier exchanges (and maybe a system prompt) before a question, as messages. The dialog's text
    stays within DIALOG_CHARS: exchanges that do not fit are drawn again, a few times, and after a long
    question (counting a 7-letter word) there may be fewer than asked for."""
    wanted = rng.randint(*EARLIER_TURNS)
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 2 * SYSTEM else None
    size = len(question) + len(answer) + len(system or "")
    earlier: list[dict] = []
    for _ in range(20 * wanted):
        turn = exchange(rng)
        if size + len(turn["question"]) + len(turn["answer"]) <= DIALOG_CHARS:
            earlier.append(turn)
            size += len(turn["question"]) + len(turn["answer"])
            if len(earlier) == wanted:
                break
    return dialog(earlier, question, system)[:-1]


def held_out(seed: int, per_skill: int) -> list[dict]:
    """Evaluation problems: `per_skill` distinct problems of each evaluated skill in each variant (one question;
    the last of a dialog; rephrased), none asked twice."""
    rng = random.Random(seed)
    found: list[dict] = []
    keys: dict[str, set[tuple]] = {name: set() for name in EVALUATED}
    for variant in DEMO_VARIANTS:
        for name in EVALUATED:
            kept = 0
            while kept < per_skill:
                question, answer, key = SKILLS[name](rng)
                asked = question
                if variant == "phrasing":  # another phrasing than the question's own, if it has one
                    asked = next((q for q in (rephrase(rng, question) for _ in range(20)) if q != question), None)
                if key in keys[name] or asked is None:
                    continue
                keys[name].add(key)
                kept += 1
                earlier = history(rng, question, answer) if variant == "multiturn" else []
                found.append({"skill": name, "variant": variant, "question": asked, "answer": answer, "key": list(key),
                              "history": earlier})
    return found


def training(seed: int, size: int, excluded: list[dict]) -> list[dict]:
    """About `size` problems shared by `WEIGHTS`, half of them rephrased, none of them an evaluation problem in any
    phrasing, in a seeded random order."""
    rng = random.Random(seed)
    banned = {(row["skill"], tuple(row["key"])) for row in excluded}
    found: list[dict] = []
    for name in SKILLS:
        kept = 0
        while kept < round(size * WEIGHTS[name] / sum(WEIGHTS.values())):
            question, answer, key = SKILLS[name](rng)
            if (name, key) not in banned:
                if rng.random() < REPHRASED:
                    question = rephrase(rng, question)
                found.append({"skill": name, "question": question, "answer": answer, "key": list(key)})
                kept += 1
    rng.shuffle(found)
    return found
