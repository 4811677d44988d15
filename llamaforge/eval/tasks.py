"""The Open LLM Leaderboard tasks, each prompted and scored exactly as lm-evaluation-harness 0.4.x does,
and the built-in demo model's skills.

Reference: the task YAMLs of lm-eval (`tasks/arc`, `hellaswag`, `mmlu/default`, `truthfulqa`, `winogrande`,
`gsm8k`) and `ConfigurableTask.fewshot_context` / `construct_requests`. A context is

    description + (question + " " + answer + "\\n\\n") for each few-shot example + question

and each choice is scored as the continuation " " + choice. docs/eval.md shows every task's template.
"""

from __future__ import annotations

import re

from llamaforge.checkpoint import DEMO_DIR
from llamaforge.errors import LlamaforgeError
from llamaforge.eval.data import Dataset
from llamaforge.eval.metrics import accuracy, gsm8k_scores, mc2, normalized_accuracy

TARGET_DELIMITER = " "  # between a question and its answer
FEWSHOT_DELIMITER = "\n\n"  # after each few-shot example


class Task:
    """A benchmark: where its rows come from, how a document becomes requests, how results become metrics."""

    name: str
    dataset: Dataset
    eval_split: str
    fewshot_split: str | None
    num_fewshot: int  # the leaderboard's
    metrics: tuple[str, ...]
    primary: str  # the metric the leaderboard reports
    kind = "loglikelihood"  # or "generate"
    first_n = False  # few-shot examples are the split's first n rows (else drawn at random)
    # lm-eval leaves the document itself out of its examples when the task's fewshot_split and test_split
    # settings are equal; for HellaSwag and Winogrande both are unset (None == None), so it does, and
    # draws n + 1 examples to have room: that extra draw changes which examples every later document gets.
    exclude_doc = False

    def description(self) -> str:
        return ""

    def keep(self, row: dict) -> bool:
        """Whether a row of the split is one of this task's documents (a task may be a slice of a dataset)."""
        return True

    def prepare(self, doc: dict) -> dict:
        """The row as the prompt reads it (lm-eval's process_docs)."""
        return doc

    def example(self, doc: dict) -> tuple[str, str]:
        """(question, answer) of a document shown as a few-shot example."""
        raise NotImplementedError

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        """(context, continuation) pairs whose log-likelihoods `score` needs."""
        raise NotImplementedError

    def score(self, doc: dict, results: list) -> dict[str, float]:
        """Metrics of one document from its requests' log-likelihoods (or its one generated text)."""
        raise NotImplementedError


class GenerateTask(Task):
    """A task whose document is one prompt, answered greedily until a stop sequence or EOS."""

    kind = "generate"
    until: tuple[str, ...] = ()
    max_new_tokens = 256  # lm-eval's HF backend default

    def prompt(self, doc: dict, prefix: str) -> str | list[dict]:
        """The text the model continues, or a dialog's messages for it to answer in the chat format."""
        raise NotImplementedError


class MultipleChoice(Task):
    """A question with choices: each choice is a continuation of the same context."""

    metrics = ("acc", "acc_norm")
    primary = "acc_norm"

    def question(self, doc: dict) -> str:
        raise NotImplementedError

    def choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def example(self, doc: dict) -> tuple[str, str]:
        return self.question(doc), self.choices(doc)[self.gold(doc)]

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        context = prefix + self.question(doc)
        return [(context, TARGET_DELIMITER + choice) for choice in self.choices(doc)]

    def score(self, doc: dict, results: list[float]) -> dict[str, float]:
        gold = self.gold(doc)
        return {"acc": accuracy(results, gold), "acc_norm": normalized_accuracy(results, self.choices(doc), gold)}


class ArcChallenge(MultipleChoice):
    name = "arc_challenge"
    dataset = Dataset("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", ("question", "choices.text",
                                                                           "choices.label", "answerKey"))
    eval_split, fewshot_split, num_fewshot = "test", "train", 25

    def question(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return doc["choices"]["text"]

    def gold(self, doc: dict) -> int:
        return doc["choices"]["label"].index(doc["answerKey"])


def clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's " [title]" becomes ". ", other [tags] go, double spaces halve."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


class HellaSwag(MultipleChoice):
    name = "hellaswag"
    dataset = Dataset("hellaswag", "Rowan/hellaswag", None, ("activity_label", "ctx_a", "ctx_b", "endings", "label"))
    eval_split, fewshot_split, num_fewshot = "validation", "train", 10
    exclude_doc = True

    def prepare(self, doc: dict) -> dict:
        # str.capitalize also lower-cases the rest of ctx_b, as lm-eval's does.
        query = clean_hellaswag(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
        return {**doc, "query": query, "choices": [clean_hellaswag(ending) for ending in doc["endings"]]}

    def question(self, doc: dict) -> str:
        return doc["query"]

    def choices(self, doc: dict) -> list[str]:
        return doc["choices"]

    def gold(self, doc: dict) -> int:
        return int(doc["label"])


# MMLU's 57 subjects and the category lm-eval groups each under (mmlu_stem, mmlu_humanities, ...).
MMLU_SUBJECTS = {
    "stem": ("abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
             "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
             "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
             "high_school_mathematics high_school_physics high_school_statistics machine_learning"),
    "humanities": ("formal_logic high_school_european_history high_school_us_history high_school_world_history "
                   "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                   "prehistory professional_law world_religions"),
    "social_sciences": ("econometrics high_school_geography high_school_government_and_politics "
                        "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                        "human_sexuality professional_psychology public_relations security_studies sociology "
                        "us_foreign_policy"),
    "other": ("business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
              "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"),
}
MMLU_CATEGORY = {subject: category for category, names in MMLU_SUBJECTS.items() for subject in names.split()}


class MMLUSubject(MultipleChoice):
    """One MMLU subject; `mmlu` is all 57, weighted by their sizes (lm-eval's group)."""

    eval_split, fewshot_split, num_fewshot = "test", "dev", 5
    first_n = True  # lm-eval's mmlu uses the dev split's first five rows, in order
    metrics = ("acc",)
    primary = "acc"

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.name = f"mmlu_{subject}"
        self.dataset = Dataset(f"mmlu/{subject}", "cais/mmlu", subject, ("question", "choices", "answer"))

    def description(self) -> str:
        return f"The following are multiple choice questions (with answers) about {subject_words(self.subject)}.\n\n"

    def question(self, doc: dict) -> str:
        a, b, c, d = doc["choices"]
        return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return ["A", "B", "C", "D"]

    def gold(self, doc: dict) -> int:
        return doc["answer"]

    def score(self, doc: dict, results: list[float]) -> dict[str, float]:
        return {"acc": accuracy(results, self.gold(doc))}


def subject_words(subject: str) -> str:
    return " ".join(subject.split("_"))


TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


class TruthfulQAMC2(MultipleChoice):
    """TruthfulQA MC2: zero-shot behind a fixed six-question QA preamble; any number of true answers."""

    name = "truthfulqa_mc2"
    dataset = Dataset("truthfulqa", "truthfulqa/truthful_qa", "multiple_choice",
                      ("question", "mc2_targets.choices", "mc2_targets.labels"))
    eval_split, fewshot_split, num_fewshot = "validation", None, 0
    metrics = ("mc2",)
    primary = "mc2"

    def question(self, doc: dict) -> str:
        return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {doc['question']}\nA:"

    def choices(self, doc: dict) -> list[str]:
        return doc["mc2_targets"]["choices"]

    def gold(self, doc: dict) -> int:
        return 0  # lm-eval's doc_to_target: the first choice is a true answer

    def score(self, doc: dict, results: list[float]) -> dict[str, float]:
        return {"mc2": mc2(results, doc["mc2_targets"]["labels"])}


class Winogrande(Task):
    """Partial evaluation: each option fills the blank in the context; the shared rest of the sentence is scored."""

    name = "winogrande"
    dataset = Dataset("winogrande", "allenai/winogrande", "winogrande_xl", ("sentence", "option1", "option2", "answer"))
    eval_split, fewshot_split, num_fewshot = "validation", "train", 5
    metrics = ("acc",)
    primary = "acc"
    exclude_doc = True

    def prepare(self, doc: dict) -> dict:
        blank = doc["sentence"].index("_")
        return {**doc, "contexts": [doc["sentence"][:blank] + doc[option] for option in ("option1", "option2")],
                "rest": doc["sentence"][blank + 1:].strip(), "gold": {"1": 0, "2": 1}[doc["answer"]]}

    def example(self, doc: dict) -> tuple[str, str]:
        return doc["contexts"][doc["gold"]], doc["rest"]

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        return [(prefix + context, TARGET_DELIMITER + doc["rest"]) for context in doc["contexts"]]

    def score(self, doc: dict, results: list[float]) -> dict[str, float]:
        return {"acc": accuracy(results, doc["gold"])}


class GSM8K(GenerateTask):
    """Greedy generation until a stop sequence; the answer after "####" (or the last number) must match."""

    name = "gsm8k"
    dataset = Dataset("gsm8k", "openai/gsm8k", "main", ("question", "answer"))
    eval_split, fewshot_split, num_fewshot = "test", "train", 5
    metrics = ("exact_match", "exact_match_flexible")
    primary = "exact_match"
    until = ("Question:", "</s>", "<|im_end|>")

    def question(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def example(self, doc: dict) -> tuple[str, str]:
        return self.question(doc), doc["answer"]

    def prompt(self, doc: dict, prefix: str) -> str:
        return prefix + self.question(doc)

    def score(self, doc: dict, results: list[str]) -> dict[str, float]:
        return gsm8k_scores(results[0], doc["answer"])


# The demo model's skills, each scored on the held-out problems recipes/demo/run.py wrote beside the model.
DEMO_SKILLS = ("addition", "subtraction", "compare", "convert", "reverse", "spell", "count", "out_of_scope")
# How a problem is asked: as the only question; as the last question of a dialog whose earlier exchanges
# (of any skill) are answered correctly; rephrased as people type ("47+38", lower case, no "?").
DEMO_VARIANTS = ("single", "multiturn", "phrasing")
DIGIT_SKILLS = ("addition", "subtraction")  # also scored by the digits of their operands


class DemoSkill(GenerateTask):
    """One skill of the built-in demo model: its held-out problems asked in the chat format, answered greedily.

    A problem counts when the answer, stripped, is exactly the expected text; the model must also stop
    (EOS), since anything it adds makes the text differ. `digits` keeps the problems whose operands both
    have two digits (2), or those with a one-digit operand (1).
    """

    dataset = Dataset("demo", None, None, ("skill", "variant", "question", "answer", "key", "history"),
                      bundled=DEMO_DIR / "heldout.jsonl")
    eval_split, fewshot_split, num_fewshot = "test", None, 0
    metrics = ("exact_match",)
    primary = "exact_match"
    max_new_tokens = 96  # the longest answer (counting out a long word) is about 60 tokens

    def __init__(self, skill: str, variant: str = "single", digits: int | None = None) -> None:
        self.skill = skill
        self.variant = variant
        self.digits = digits
        self.name = f"demo_{skill}" + ("" if variant == "single" else f"_{variant}") + (
            f"_{digits}digit" if digits else "")

    def keep(self, row: dict) -> bool:
        if row["skill"] != self.skill or row["variant"] != self.variant:
            return False
        return self.digits is None or (min(row["key"]) >= 10) == (self.digits == 2)

    def example(self, doc: dict) -> tuple[str, str]:
        return doc["question"], doc["answer"]

    def prompt(self, doc: dict, prefix: str) -> list[dict]:
        # The dialog itself, encoded as `LLM.chat` encodes it: earlier exchanges end in EOS and the next starts
        # with BOS, ids that no text prompt can carry. The task is zero-shot, so there is no prefix.
        return [*doc["history"], {"role": "user", "content": doc["question"]}]

    def score(self, doc: dict, results: list[str]) -> dict[str, float]:
        return {"exact_match": float(results[0].strip() == doc["answer"])}


DEMO_TASKS = {DemoSkill(skill, variant).name: (skill, variant, None) for variant in DEMO_VARIANTS
              for skill in DEMO_SKILLS} | {
    DemoSkill(skill, "single", digits).name: (skill, "single", digits) for skill in DIGIT_SKILLS for digits in (2, 1)}
SINGLE_TASKS: dict[str, type[Task]] = {task.name: task for task in (ArcChallenge, HellaSwag, TruthfulQAMC2,
                                                                      Winogrande, GSM8K)}
# Groups report the size-weighted mean of their members (lm-eval's weight_by_size).
GROUPS: dict[str, list[str]] = {
    "mmlu": [f"mmlu_{category}" for category in MMLU_SUBJECTS],
    **{f"mmlu_{category}": [f"mmlu_{s}" for s in names.split()] for category, names in MMLU_SUBJECTS.items()},
    # `llamaforge eval` with no flags: the demo model's single questions (a few seconds); the other variants
    # are groups of their own.
    "demo": [f"demo_{skill}" for skill in DEMO_SKILLS],
    "demo_multiturn": [f"demo_{skill}_multiturn" for skill in DEMO_SKILLS],
    "demo_phrasing": [f"demo_{skill}_phrasing" for skill in DEMO_SKILLS],
}
PRESETS = {"leaderboard": ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]}


def known_tasks() -> str:
    return ", ".join([*SINGLE_TASKS, "mmlu", "mmlu_<category>", "mmlu_<subject>", "demo", "demo_multiturn",
                      "demo_phrasing", "demo_<skill>", "demo_<skill>_multiturn", "demo_<skill>_phrasing",
                      "demo_<skill>_2digit", "demo_<skill>_1digit"])


def make_task(name: str) -> Task:
    """One task by name (not a group)."""
    if name in SINGLE_TASKS:
        return SINGLE_TASKS[name]()
    if name.startswith("mmlu_") and name[5:] in MMLU_CATEGORY:
        return MMLUSubject(name[5:])
    if name in DEMO_TASKS:
        return DemoSkill(*DEMO_TASKS[name])
    raise LlamaforgeError(f"unknown task {name!r}; known tasks: {known_tasks()}; presets: {', '.join(PRESETS)}")


def leaves(name: str) -> list[str]:
    """The single tasks a name stands for: itself, or a group's members."""
    return [leaf for member in GROUPS[name] for leaf in leaves(member)] if name in GROUPS else [name]


def resolve(names: str | None, preset: str | None) -> list[str]:
    """The requested task and group names, checked; `preset` gives the list when `names` is not given."""
    if preset is not None and preset not in PRESETS:
        raise LlamaforgeError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    requested = [n.strip() for n in names.split(",") if n.strip()] if names else PRESETS.get(preset, [])
    if not requested:
        raise LlamaforgeError(f"give --tasks (known: {known_tasks()}) or --preset ({', '.join(PRESETS)})")
    for name in requested:
        for leaf in leaves(name):
            make_task(leaf)
    return list(dict.fromkeys(requested))
