"""RULER's synthetic long-context tasks, reimplemented from ../shared/EVAL.md (Hsieh et al., "RULER: What's
the Real Context Size of Your Long-Context Language Models?", 2024).

Every sample is deterministic in (task, seed, index) and fitted to a target length in the model's own
tokens: the haystack grows by binary search until prompt + answer budget would pass the target.

Tasks (haystack / key / value / needles k / values per key v / queried q):
    niah_single_1    noise   words  numbers  1/1/1
    niah_single_2    essay   words  numbers  1/1/1
    niah_single_3    essay   words  uuids    1/1/1
    niah_multikey_1  essay   words  numbers  k=4
    niah_multikey_2  needle  words  numbers  (the haystack is distractor needles)
    niah_multikey_3  needle  uuids  uuids
    niah_multivalue  essay   words  numbers  v=4
    niah_multiquery  essay   words  numbers  q=4
    vt               variable tracking: one chain of 4 hops spread through noise
    fwe              frequent words: Zipf-distributed coded words, name the top 3
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Protocol

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER draws needle depths from 40 evenly spaced points between 0% and 100%.
DEPTH_POINTS = [i / 39 for i in range(40)]
_GOLDEN = 0.6180339887498949

_ADJECTIVES = (
    "abundant ancient bitter bold brave bright brisk calm careful cheerful clever cold cozy crisp curious "
    "daring deep distant eager early elegant empty faint fancy fierce fragile frozen gentle giant glossy "
    "golden graceful grand hollow honest humble hungry icy jolly kind lively lonely loud lucky mellow "
    "mighty modest narrow noble odd pale patient plain polite proud quick quiet rapid rare restless "
    "rough royal rustic shiny silent silver simple sleepy slow smooth solid sour spicy steady stormy "
    "strange sturdy sudden sweet swift tall tender tidy tiny tired vast velvet vivid warm wild wise witty"
).split()
_NOUNS = (
    "anchor apple arrow badge bakery balloon banjo barn basket beacon bicycle blanket bottle bridge bucket "
    "cabin camera candle canyon carpet castle cellar chimney circus cloud comet compass cottage crayon "
    "crystal curtain desert diamond dolphin dragon drum engine falcon feather fiddle forest fountain "
    "garden glacier guitar hammer harbor helmet island jacket kettle ladder lantern lemon lighthouse "
    "magnet maple meadow mirror mountain needle notebook ocean orchard otter paddle parrot pebble pencil "
    "piano pillow planet pocket puzzle quilt rabbit railway river rocket saddle sailboat shell shovel "
    "spider statue stove teapot thimble tiger tower trumpet tunnel umbrella valley violin wagon walrus "
    "whistle window wizard"
).split()


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used here."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One prompt with its gold answers.

    prompt: the full text fed to the model (chat template applied when requested), ending with the
        answer prefix so that generation continues the answer.
    answers: gold strings; the score is the fraction contained in the output (case-insensitive).
    prompt_tokens: len(tokenizer.encode(prompt)), what the fit measured.
    depths: relative positions (0..1) of the inserted needles/chain statements in the haystack.
    """

    task: str
    index: int
    prompt: str
    answers: tuple[str, ...]
    max_new_tokens: int
    prompt_tokens: int
    depths: tuple[float, ...]


@dataclass(frozen=True)
class _Body:
    """What a task builds for a haystack size: the user's input text, the answer prefix, the gold."""

    text: str
    answer_prefix: str
    answers: tuple[str, ...]
    depths: tuple[float, ...]


@dataclass(frozen=True)
class _Niah:
    haystack: str  # "noise" | "essay" | "needle"
    key: str  # "words" | "uuids"
    value: str  # "numbers" | "uuids"
    keys: int = 1  # needles with distinct keys (1 queried unless `queries` says more)
    values: int = 1  # values per queried key
    queries: int = 1


_NIAH: dict[str, _Niah] = {
    "niah_single_1": _Niah("noise", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", keys=4, queries=4),
}
# Answer budgets in tokens: SmolLM2's tokenizer spends one token per digit and ~25 per uuid.
_MAX_NEW: dict[str, int] = {
    "niah_single_1": 24,
    "niah_single_2": 24,
    "niah_single_3": 48,
    "niah_multikey_1": 24,
    "niah_multikey_2": 24,
    "niah_multikey_3": 48,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "vt": 32,
    "fwe": 32,
}
TASKS: tuple[str, ...] = (*_NIAH, "vt", "fwe")


@lru_cache(maxsize=1)
def essay_text() -> str:
    """Jane Austen's "Persuasion" (1817, public domain), shipped in mosaickv/eval/data (see its README)."""
    return resources.files("mosaickv.eval").joinpath("data/persuasion.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _essay_sentences() -> tuple[str, ...]:
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", essay_text().replace("\n\n", " ")) if s)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _first_depth(index: int) -> float:
    """A low-discrepancy walk over the 40 depth points: any first n samples cover depths evenly."""
    return DEPTH_POINTS[int(((index + 1) * _GOLDEN) % 1.0 * len(DEPTH_POINTS))]


def _depths(rng: random.Random, index: int, n: int) -> list[float]:
    first = _first_depth(index)
    rest = rng.sample([d for d in DEPTH_POINTS if d != first], n - 1)
    return sorted([first, *rest])


def _insert(units: Sequence[str], items: Sequence[str], depths: Sequence[float], sep: str) -> str:
    """Put items[i] between haystack units at relative depth depths[i] (depths sorted ascending)."""
    out = list(units)
    # Insert from the deepest so that earlier insertion points keep their index.
    for item, depth in sorted(zip(items, depths, strict=True), key=lambda p: -p[1]):
        out.insert(round(depth * len(units)), item)
    return sep.join(out)


def _unique(rng: random.Random, make: Callable[[random.Random], str], n: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < n:
        x = make(rng)
        if x not in seen:
            seen.append(x)
    return seen


def _niah_builder(spec: _Niah, rng: random.Random, index: int) -> Callable[[int], _Body]:
    make_key = _uuid if spec.key == "uuids" else _word_key
    make_value = _uuid if spec.value == "uuids" else (lambda r: str(r.randint(1_000_000, 9_999_999)))
    keys = _unique(rng, make_key, spec.keys)
    values = [[make_value(rng) for _ in range(spec.values)] for _ in keys]
    kind = spec.value  # "numbers" | "uuids"
    needles = [
        f"One of the special magic {kind} for {k} is: {v}."
        for k, vs in zip(keys, values, strict=True)
        for v in vs
    ]
    rng.shuffle(needles)
    depths = _depths(rng, index, len(needles))
    queried = keys[: spec.queries]
    gold = tuple(v for vs in values[: spec.queries] for v in vs)
    essay_start = rng.randrange(len(_essay_sentences()))
    # Distractor needles (the "needle" haystack) come from their own stream, restarted for every size
    # so that a haystack of n needles is the first n of the same sequence.
    distractor_seed = rng.random()

    def haystack(n: int) -> tuple[list[str], str]:
        if spec.haystack == "noise":
            return [NOISE_SENTENCE] * n, " "
        if spec.haystack == "essay":
            sents = _essay_sentences()
            return [sents[(essay_start + i) % len(sents)] for i in range(n)], " "
        r = random.Random(distractor_seed)
        out = []
        while len(out) < n:
            k = make_key(r)
            v = make_value(r)
            if k not in keys:
                out.append(f"One of the special magic {kind} for {k} is: {v}.")
        return out, "\n"

    query = ", ".join(queried[:-1]) + f", and {queried[-1]}" if len(queried) > 1 else queried[0]
    single = len(gold) == 1
    noun = kind[:-1] if single else kind
    if single:
        question = f"What is the special magic {noun} for {query} mentioned in the provided text?"
        prefix = f"The special magic {noun} for {query} mentioned in the provided text is"
    else:
        question = f"What are all the special magic {noun} for {query} mentioned in the provided text?"
        prefix = f"The special magic {noun} for {query} mentioned in the provided text are"

    def build(n: int) -> _Body:
        units, sep = haystack(n)
        context = _insert(units, needles, depths, sep)
        text = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n{context}\n{question}"
        )
        return _Body(text, prefix, gold, tuple(depths))

    return build


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _vt_builder(rng: random.Random, index: int, hops: int = 4) -> Callable[[int], _Body]:
    names = _unique(rng, _var_name, hops + 1)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = _depths(rng, index, len(chain))
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
        f"variables are assigned the value {value}, they are:"
    )

    def build(n: int) -> _Body:
        context = _insert([NOISE_SENTENCE] * n, chain, depths, " ")
        text = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{context}\n{question}"
        )
        return _Body(text, prefix, tuple(names), tuple(depths))

    return build


def _fwe_builder(rng: random.Random, vocab: int = 400, alpha: float = 2.0) -> Callable[[int], _Body]:
    words = _unique(rng, lambda r: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)), vocab)
    order_rng_seed = rng.random()

    def build(n: int) -> _Body:
        # Zipf counts: rank r appears floor(n / r**alpha) times (ranks with no occurrence are left
        # out, so the vocabulary grows with the text); the top 4 counts are made strictly
        # decreasing so that the top 3 are unambiguous.
        counts = [int(n / (r + 1) ** alpha) for r in range(vocab)]
        for r in range(1, 4):
            counts[r] = max(0, min(counts[r], counts[r - 1] - 1))
        seq = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
        random.Random(order_rng_seed).shuffle(seq)
        text = (
            "Read the following coded text and track the frequency of each coded word. Find the three "
            "most frequently appeared coded words. " + " ".join(seq) + "\nQuestion: Do not provide any "
            "explanation. What are the three most frequently appeared words in the above coded text?"
        )
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return _Body(text, prefix, tuple(words[:3]), ())

    return build


def format_prompt(tokenizer: object, text: str, answer_prefix: str, chat: bool) -> str:
    """The model's input: `text` as the user's turn (chat template) or raw, then the answer prefix."""
    if chat:
        template = getattr(tokenizer, "apply_chat_template", None)
        if template is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "chat=True needs a tokenizer with a chat template; pass chat=False for a base model"
            )
        head = template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return f"{head}{answer_prefix}"
    return f"{text}\n{answer_prefix}"


def _fit(build: Callable[[int], str], count: Callable[[str], int], budget: int) -> tuple[int, str, int]:
    """Largest n >= 0 with count(build(n)) <= budget, by doubling then bisection."""
    empty = build(0)
    n_empty = count(empty)
    if n_empty > budget:
        raise ValueError(f"the task's text alone takes {n_empty} tokens, over the budget of {budget}")
    lo, lo_text, lo_tokens = 0, empty, n_empty
    hi = 1
    while True:
        t = build(hi)
        c = count(t)
        if c > budget:
            break
        lo, lo_text, lo_tokens, hi = hi, t, c, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t = build(mid)
        c = count(t)
        if c <= budget:
            lo, lo_text, lo_tokens = mid, t, c
        else:
            hi = mid
    return lo, lo_text, lo_tokens


def generate(
    task: str,
    n_samples: int,
    target_tokens: int,
    tokenizer: Tokenizer,
    seed: int = 0,
    chat: bool = True,
) -> list[Sample]:
    """`n_samples` samples of `task`, each with prompt tokens + answer budget <= target_tokens.

    chat: wrap the input in the tokenizer's chat template (instruct models); False for base models.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    max_new = _MAX_NEW[task]

    def count(prompt: str) -> int:
        return len(tokenizer.encode(prompt, add_special_tokens=False))

    samples = []
    for index in range(n_samples):
        rng = random.Random(f"{task}:{seed}:{index}")
        if task in _NIAH:
            builder = _niah_builder(_NIAH[task], rng, index)
        elif task == "vt":
            builder = _vt_builder(rng, index)
        else:
            builder = _fwe_builder(rng)
        bodies: dict[int, _Body] = {}

        def render(
            n: int, builder: Callable[[int], _Body] = builder, bodies: dict[int, _Body] = bodies
        ) -> str:
            bodies[n] = body = builder(n)
            return format_prompt(tokenizer, body.text, body.answer_prefix, chat)

        n, prompt, tokens = _fit(render, count, target_tokens - max_new)
        body = bodies[n]
        samples.append(Sample(task, index, prompt, body.answers, max_new, tokens, body.depths))
    return samples


def score(output: str, answers: Sequence[str]) -> float:
    """Fraction (0..1) of gold strings contained in the output, case-insensitive."""
    if not answers:
        raise ValueError("a sample needs at least one gold answer")
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def score_task(outputs: Sequence[str], samples: Sequence[Sample]) -> float:
    """RULER's score for one task: mean over samples of the contained-gold fraction, in percent (0-100)."""
    if len(outputs) != len(samples) or not samples:
        raise ValueError(
            f"need one output per sample and at least one: {len(outputs)} outputs, {len(samples)} samples"
        )
    return 100.0 * sum(score(o, s.answers) for o, s in zip(outputs, samples, strict=True)) / len(samples)
