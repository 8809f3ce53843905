"""A family of small tasks with checkable answers, the user's private data, and the public transfer set.

Pure code. The four categories stand in for the skill slices of the KNEXA-FL setting: each node holds a
Dirichlet-skewed share of them, so that what one node is good at another may learn from it.
"""

from __future__ import annotations

import json
import random
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CATEGORIES = ("arithmetic", "units", "strings", "dates")
GENERAL = "general"
MAX_FIELD_CHARS = 4096
MAX_ROWS = 100_000
MAX_FILE_BYTES = 64 * 1024 * 1024
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = (
    "cat", "dog", "mesh", "node", "peer", "model", "cache", "river", "stone", "cloud", "light", "graph",
    "token", "edge", "relay", "seed", "lamp", "tree", "bird", "apple",
)
PUBLIC_VALIDATION_SEED = 20_261_130  # fixed: every node validates on the same shared examples
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60))


T = TypeVar("T")


class DataError(ValueError):
    """The user's data file is unusable; the message names the line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    category: str = GENERAL

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer, "category": self.category}


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        return Example(f"What is {a} + {b}? Answer with the number only.", str(a + b), "arithmetic")
    a, b = max(a, b), min(a, b)
    return Example(f"What is {a} - {b}? Answer with the number only.", str(a - b), "arithmetic")


def _units(rng: random.Random) -> Example:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 9)
    return Example(f"Convert {n} {big} to {small}. Answer with the number only.", str(n * factor), "units")


def _strings(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        prompt = f"Write the word '{word}' in capital letters. Answer with the word only."
        return Example(prompt, word.upper(), "strings")
    return Example(f"Reverse the word '{word}'. Answer with the word only.", word[::-1], "strings")


def _dates(rng: random.Random) -> Example:
    start, n = rng.randrange(7), rng.randint(1, 6)
    return Example(
        f"What day of the week comes {n} days after {DAYS[start]}? Answer with the day only.",
        DAYS[(start + n) % 7],
        "dates",
    )


def _times_ten_or_double(rng: random.Random) -> Example:
    n = rng.randint(2, 49)
    if rng.random() < 0.5:
        return Example(f"What is {n} times 10? Answer with the number only.", str(n * 10), "arithmetic")
    return Example(f"What is double {n}? Answer with the number only.", str(2 * n), "arithmetic")


def _capitals_or_first_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        prompt = f"Write the word '{word}' in capital letters. Answer with the word only."
        return Example(prompt, word.upper(), "strings")
    return Example(f"What is the first letter of the word '{word}'? Answer with the letter only.", word[0], "strings")


def _next_or_previous_day(rng: random.Random) -> Example:
    start, step = rng.randrange(7), rng.choice((1, -1))
    return Example(
        f"What day of the week comes 1 day {'after' if step > 0 else 'before'} {DAYS[start]}? "
        "Answer with the day only.",
        DAYS[(start + step) % 7],
        "dates",
    )


# Two families of the same four categories. "hard" holds tasks SmolLM2-135M does not learn from a few dozen
# examples (two-number sums, reversing a word, day offsets up to six): a skewed agent's answers outside its
# slice, and many inside, are wrong. "learnable" holds tasks it learns in 48 LoRA steps on 30 examples (each
# category from 0-0.29 to 0.71-1.00 on held-out prompts, bench/learnable_tasks.py), so that an agent's answers
# in its own slice are right.
FAMILIES: dict[str, dict[str, Callable[[random.Random], Example]]] = {
    "hard": {"arithmetic": _arithmetic, "units": _units, "strings": _strings, "dates": _dates},
    "learnable": {"arithmetic": _times_ten_or_double, "units": _units, "strings": _capitals_or_first_letter,
                  "dates": _next_or_previous_day},
}
DEFAULT_FAMILY = "hard"


def _generators(family: str) -> dict[str, Callable[[random.Random], Example]]:
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family]


def generate_examples(category: str, n: int, seed: int, family: str = DEFAULT_FAMILY) -> list[Example]:
    generators = _generators(family)
    if category not in generators:
        raise ValueError(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
    rng = random.Random(f"{category}:{seed}")
    return [generators[category](rng) for _ in range(n)]


def transfer_set(n: int, seed: int, family: str = DEFAULT_FAMILY) -> list[str]:
    """Public prompts, all categories mixed, with no answers: what a teacher answers for its student."""
    return [e.prompt for e in transfer_examples(n, seed, family)]


def transfer_examples(n: int, seed: int, family: str = DEFAULT_FAMILY) -> list[Example]:
    """The transfer set with its answers: for grading what teachers send (the benchmark), never sent."""
    generators = _generators(family)
    rng = random.Random(f"transfer:{seed}")
    return [generators[CATEGORIES[i % len(CATEGORIES)]](rng) for i in range(n)]


def public_validation(per_category: int, seed: int = PUBLIC_VALIDATION_SEED, family: str = DEFAULT_FAMILY
                      ) -> list[Example]:
    """A validation set of every category that all nodes share (the same seed gives the same examples
    everywhere). A node's own split has its data's skew: what it learns from a teacher in a category it barely
    holds could not show in its gain or in its promotion without examples of that category."""
    return every_category(per_category, seed, family)


def every_category(per_category: int, seed: int, family: str = DEFAULT_FAMILY) -> list[Example]:
    """`per_category` examples of each category, category after category."""
    return [e for c in CATEGORIES for e in generate_examples(c, per_category, seed, family)]


def uses_task_family(examples: Iterable[Example]) -> bool:
    """Whether the data is of this task family: only then is the shared validation set about the same skills."""
    return any(e.category in CATEGORIES for e in examples)


# The generators' wordings: a prompt that only starts the same way ("What is the capital of France?") is not
# one of them, and must not be filtered or voted on as if its answer were checkable.
_TEMPLATES = (
    ("arithmetic", re.compile(r"What is (\d+ [+-] \d+|\d+ times 10|double \d+)\? Answer with the number only\.")),
    ("units", re.compile(r"Convert \d+ [a-z]+ to [a-z]+\. Answer with the number only\.")),
    ("strings", re.compile(r"(Write the word '[a-z]+' in capital letters|Reverse the word '[a-z]+')\. "
                           r"Answer with the word only\.|What is the first letter of the word '[a-z]+'\? "
                           r"Answer with the letter only\.")),
    ("dates", re.compile(r"What day of the week comes \d+ days? (after|before) [A-Z][a-z]+day\? "
                         r"Answer with the day only\.")),
)


def category_of(prompt: str) -> str:
    """The category of a prompt of this family, from its wording; GENERAL for any other prompt."""
    for example_category, template in _TEMPLATES:
        if template.fullmatch(prompt.strip()):
            return example_category
    return GENERAL


def answers_worth_learning(
    answers: Iterable[tuple[str, str]], teacher_skills: Mapping[str, float], own_skills: Mapping[str, float]
) -> list[tuple[str, str]]:
    """The teacher's answers in the categories where it validated better than the student (a category the
    student never validated counts as 0). A skewed peer's answers outside its own skills are mostly wrong and
    would train the student away from what it already does well. Prompts of no known category are kept when
    the teacher has no score to judge them by. An empty answer (a prompt the teacher left unanswered) is never
    kept."""
    kept = []
    for prompt, answer in answers:
        if not answer.strip():
            continue
        category = category_of(prompt)
        teacher = teacher_skills.get(category)
        if teacher is None:
            if category == GENERAL:
                kept.append((prompt, answer))
        elif teacher > own_skills.get(category, 0.0):
            kept.append((prompt, answer))
    return kept


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _first_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _last_number(line: str) -> float | None:
    numbers = _NUMBER.findall(line.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def _words(line: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", line)


def grade(example: Example, output: str) -> bool:
    """The last number (or word) on the first line of the output must be the answer: lenient about form
    ("17 + 25 = 42", "The answer is 42."), strict about content (echoing the question does not pass)."""
    first = _first_line(output)
    expected = example.answer.strip()
    if _NUMBER.fullmatch(expected):
        number = _last_number(first)
        return number is not None and number == float(expected)
    words = _words(first)
    if not words:
        return False
    if example.category == "strings":
        return words[-1] == expected  # case matters for the capital-letters task
    return words[-1].lower() == expected.lower()


def answer_key(output: str) -> str | None:
    """What grading would read from an answer without knowing the expected one: the last number of its first
    line, or else the last word (None: neither)."""
    first = _first_line(output)
    number = _last_number(first)
    if number is not None:
        return repr(number + 0.0)  # -0 and 0 grade the same
    words = _words(first)
    return words[-1] if words else None


def majority(outputs: Sequence[str]) -> str | None:
    """The first of the samples whose answer more than half of them give, or None where they disagree."""
    keys = [answer_key(o) for o in outputs]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    key, count = counts.most_common(1)[0]
    return outputs[keys.index(key)] if count * 2 > len(outputs) else None


def dirichlet_split(
    examples: Sequence[Example], n_nodes: int, alpha: float, seed: int
) -> list[list[Example]]:
    """Each category's examples dealt out in Dirichlet(alpha) shares: small alpha, skewed skills."""
    if n_nodes < 1 or alpha <= 0:
        raise ValueError("need n_nodes >= 1 and alpha > 0")
    rng = random.Random(f"dirichlet:{seed}")
    by_category: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_category[example.category].append(example)
    shards: list[list[Example]] = [[] for _ in range(n_nodes)]
    for category in sorted(by_category):
        items = by_category[category]
        weights = [rng.gammavariate(alpha, 1.0) for _ in range(n_nodes)]
        total = sum(weights) or 1.0
        cuts, acc = [], 0.0
        for w in weights[:-1]:
            acc += w / total
            cuts.append(round(acc * len(items)))
        bounds = [0, *cuts, len(items)]
        for node in range(n_nodes):
            shards[node].extend(items[bounds[node] : bounds[node + 1]])
    for shard in shards:
        rng.shuffle(shard)
    return shards


def dirichlet_slices(n_nodes: int, per_category: int, alpha: float, seed: int, family: str = DEFAULT_FAMILY
                     ) -> list[list[Example]]:
    """Each node's skewed slice of the family: `per_category` examples of every category dealt out in
    Dirichlet(alpha) shares, as the distillation benchmark gives its agents."""
    return dirichlet_split(every_category(per_category, seed, family), n_nodes, alpha, seed)


def split_train_val(
    examples: Sequence[Example], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A seeded split; each category keeps at least one validation example when it has two or more."""
    rng = random.Random(f"split:{seed}")
    train: list[Example] = []
    val: list[Example] = []
    by_category: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_category[example.category].append(example)
    for category in sorted(by_category):
        items = list(by_category[category])
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) >= 2 else 0
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return train, val


def skill_scores(results: Iterable[tuple[Example, bool]]) -> dict[str, float]:
    """Accuracy per category."""
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for example, correct in results:
        seen[example.category] += 1
        right[example.category] += int(correct)
    return {c: right[c] / seen[c] for c in sorted(seen)}


def _read_rows(path: Path, parse: Callable[[bytes, str], T], noun: str, max_bytes: int, max_rows: int
               ) -> list[T]:
    path = path.expanduser()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a directory, or a device or pipe that may never end
            raise DataError(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise DataError(f"{path} is {info.st_size} bytes, over the limit of {max_bytes}")
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise DataError(f"{path} is over the limit of {max_bytes} bytes")
    rows: list[T] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(rows) >= max_rows:
            raise DataError(f"{path}: more than {max_rows} rows")
        rows.append(parse(raw, f"{path}:{number}"))
    if not rows:
        raise DataError(f"{path} holds no {noun}")
    return rows


def load_jsonl(path: Path, max_bytes: int = MAX_FILE_BYTES, max_rows: int = MAX_ROWS) -> list[Example]:
    """The user's private data: one {"prompt", "answer", "category"?} object per line."""
    return _read_rows(path, _row, "examples", max_bytes, max_rows)


def load_prompts(path: Path, max_bytes: int = MAX_FILE_BYTES, max_rows: int = MAX_ROWS) -> list[str]:
    """A given public transfer set: one {"prompt"} object per line (any other field is ignored: a teacher
    gets prompts only)."""
    return _read_rows(path, lambda raw, where: _text_field(_object(raw, where), "prompt", where), "prompts",
                      max_bytes, max_rows)


def sample_prompts(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """The round's share of a given transfer set: n prompts drawn without replacement by the round's seed."""
    return random.Random(f"transfer:{seed}").sample(list(prompts), min(n, len(prompts)))


def _object(raw: bytes, where: str) -> dict:
    try:
        row = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: not a JSON object")
    return row


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name!r} must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise DataError(f"{where}: {name!r} is longer than {MAX_FIELD_CHARS} characters")
    return value


def _row(raw: bytes, where: str) -> Example:
    row = _object(raw, where)
    prompt, answer = _text_field(row, "prompt", where), _text_field(row, "answer", where)
    category = row.get("category", GENERAL)
    if not isinstance(category, str) or not 0 < len(category) <= 64:
        raise DataError(f"{where}: 'category' must be a string of 1-64 characters")
    return Example(prompt, answer, category)


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples))
