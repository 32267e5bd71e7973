"""Long-context tasks: deterministic, the answers really are in the prompt, lengths fit, scoring rules.

Expected facts are derived here from the prompt text itself (parsing the needles,
the JSON, the word list) and from the published rules, not read back from the
code under test.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter

import pytest

from reference.errors import OracleError
from reference.eval.tasks import (
    SCORING,
    TASKS,
    make_sample,
    needle_token_positions,
    niah_grid,
    niah_multikey,
    score,
)
from reference.io.tokenizer import encode_chat, load_tokenizer

ALL = ["niah_single", "niah_multikey", "niah_multikey_uuid", "niah_multivalue", "niah_multiquery",
       "vt", "cwe", "fwe", "passkey", "number_string", "kv_retrieval"]
DEPTH = ["niah_single", "niah_multikey", "niah_multikey_uuid", "passkey", "number_string", "kv_retrieval"]
FILLER_SENTENCES = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again."]
TINY_N = {"niah_multikey_uuid": 900}  # four uuid -> uuid needles are ~500 bytes; the rest fit in 600
LIMITS = {"niah_single": 128, "niah_multikey": 128, "niah_multikey_uuid": 128, "niah_multivalue": 128,
          "niah_multiquery": 128, "vt": 30, "cwe": 120, "fwe": 50, "passkey": 6, "number_string": 12,
          "kv_retrieval": 50}


def tol(n: int) -> int:
    return max(20, math.ceil(0.05 * n))


@functools.lru_cache(maxsize=None)
def tokenizer(path: str):
    return load_tokenizer(path)


@functools.lru_cache(maxsize=None)
def sample(path: str, task: str, n: int, seed: int, depth=None, chat=True):
    return make_sample(task, tokenizer(path), n, seed, chat=chat, depth=depth)


def count(text: str, s: str) -> int:
    return text.count(s)


def check_answers_in_text(task: str, s) -> None:
    """The facts the answers rest on, recovered from the prompt text alone."""
    text, answers = s.text, s.answers
    assert answers and all(a in text for a in answers)
    if task.startswith("niah"):
        kind = "uuid" if task == "niah_multikey_uuid" else "number"
        needles = re.findall(rf"One of the special magic {kind}s for (\S+) is: (\S+)\.", text)
        n_needles = {"niah_single": 1}.get(task, 4)
        assert len(needles) == n_needles
        asked = re.search(rf"special magic {kind}s? for (.+) mentioned in the provided text\?", text).group(1)
        asked_keys = [k.strip() for k in re.split(r",\s*(?:and\s+)?", asked)]
        expect = [v for k in asked_keys for kk, v in needles if kk == k]
        assert sorted(answers) == sorted(expect)
        assert len(answers) == {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
        for a in answers:
            assert count(text, a) == 1
    elif task == "vt":
        value = re.search(r"assigned the value (\d{5}) in the text above", text).group(1)
        assigns = re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", text)
        assert len(assigns) == 5
        holders = set()
        for name, rhs in assigns:  # in text order, the chain's order
            if rhs == value or rhs[4:] in holders:
                holders.add(name)
        assert sorted(answers) == sorted(holders) and len(holders) == 5
        assert count(text, value) == 2  # the first assignment and the question
    elif task == "cwe":
        listing = re.findall(r"\d+\. ([a-z]+)", text)
        counts = Counter(listing)
        assert len(answers) == 10 and all(counts[a] >= 3 for a in answers)
        others = [c for w, c in counts.items() if w not in answers]
        assert others and min(counts[a] for a in answers) >= 3 * max(others)
        numbers = [int(n) for n in re.findall(r"(\d+)\. [a-z]+", text)]
        assert numbers == list(range(1, len(numbers) + 1))
    elif task == "fwe":
        coded = text.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        ranked = Counter(coded).most_common()
        assert len(answers) == 3 and set(answers) == {w for w, _ in ranked[:3]}
        assert ranked[2][1] > ranked[3][1]  # no tie at the cut
    elif task in ("passkey", "number_string"):
        digits = {"passkey": 5, "number_string": 10}[task]
        (a,) = answers
        assert re.fullmatch(rf"\d{{{digits}}}", a)
        assert count(text, a) == 2  # "... is K. Remember it. K is ..."
        needle = ("The pass key is {0}. Remember it. {0} is the pass key." if task == "passkey" else
                  "The sequence of digits is {0}. Remember it. {0} is the sequence of digits.").format(a)
        assert count(text, needle) == 1
        assert re.findall(r"\d+", text) == [a, a]
    elif task == "kv_retrieval":
        obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
        key = re.search(r'Key: "([0-9a-f-]{36})"', text).group(1)
        assert obj[key] == answers[0]
        assert count(text, answers[0]) == 1
        for k, v in obj.items():
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k)
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
    else:
        raise AssertionError(task)


def measured_depth(task: str, s) -> float:
    """Where the asked needle sits: (fraction of haystack units before it, number of units)."""
    if task == "kv_retrieval":
        obj = json.loads(s.text[s.text.index("{"): s.text.rindex("}") + 1])
        keys = list(obj)
        key = re.search(r'Key: "([0-9a-f-]{36})"', s.text).group(1)
        return keys.index(key) / max(1, len(keys) - 1), len(keys) - 1
    pos = s.text.index(s.answers[0])
    before = sum(s.text[:pos].count(x) for x in FILLER_SENTENCES)
    total = sum(s.text.count(x) for x in FILLER_SENTENCES)
    return before / total, total


def depth_ok(task, s, depth) -> bool:
    """Within 0.05 of the asked depth, or half a haystack unit where units are coarser than that."""
    got, units = measured_depth(task, s)
    return abs(got - depth) <= max(0.05, 0.5 / units + 1e-9)


def check_sample(path, task, n) -> None:
    tok = tokenizer(path)
    a, b, c = sample(path, task, n, 0), sample(path, task, n, 0), sample(path, task, n, 1)
    # deterministic by seed, different seeds differ
    assert a.ids == b.ids and a.text == b.text and a.answers == b.answers
    assert a.ids != c.ids and a.answers != c.answers
    # the prompt is the text in the chat template; its length within tolerance
    assert a.ids == encode_chat(tok, a.text)
    assert abs(len(a.ids) - n) <= tol(n), (len(a.ids), n)
    assert (a.task, a.seed, a.n_tokens, a.max_answer_tokens) == (task, 0, n, LIMITS[task])
    assert (a.depth is not None) == (task in DEPTH)
    for s in (a, c):
        check_answers_in_text(task, s)
        # the answers score full marks under the task's own rule, an empty answer nothing
        assert score(task, " ".join(s.answers), s.answers) == 1.0
        assert score(task, "", s.answers) == 0.0


# --- every task on the tiny byte-level tokenizers --------------------------------------------


@pytest.mark.parametrize("task", ALL)
def test_task_on_tiny(tiny_dir, task):
    check_sample(str(tiny_dir), task, TINY_N.get(task, 600))


@pytest.mark.parametrize("task", ["niah_single", "cwe", "kv_retrieval"])
def test_without_chat_template(tiny_dir, task):
    n = 700
    s = sample(str(tiny_dir), task, n, 3, chat=False)
    assert s.ids == tokenizer(str(tiny_dir)).encode(s.text)
    assert abs(len(s.ids) - n) <= tol(n)


@pytest.mark.parametrize("task", DEPTH)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_depth_places_the_needle(tiny_dir, task, depth):
    n = TINY_N.get(task, 800)
    s = sample(str(tiny_dir), task, n, 5, depth=depth)
    assert s.depth == depth
    assert depth_ok(task, s, depth)
    if task != "kv_retrieval":  # and at about that fraction of the text's characters
        frac = s.text.index(s.answers[0]) / len(s.text)
        assert abs(frac - depth) <= 0.3


def test_niah_grid(tiny_dir):
    lengths, depths = [500, 800], [0.0, 0.5, 1.0]
    grid = niah_grid(tokenizer(str(tiny_dir)), lengths, depths, seed=7)
    assert [(s.n_tokens, s.depth) for s in grid] == [(n, d) for n in lengths for d in depths]
    assert len({s.answers[0] for s in grid}) == 1  # the same needle in every cell
    for s in grid:
        assert abs(len(s.ids) - s.n_tokens) <= tol(s.n_tokens)
        assert depth_ok("niah_single", s, s.depth)


@pytest.mark.parametrize("n_keys", [1, 2, 8, 16])
def test_niah_multikey_dial(tiny_dir, n_keys):
    """n_keys similar needles, one asked for: as many needles in the text as asked, the asked key in the question."""
    n = 400 + 100 * n_keys  # the tiny tokenizer spells bytes: each needle is ~80 tokens
    s = niah_multikey(tokenizer(str(tiny_dir)), n, 3, depth=0.5, n_keys=n_keys)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.text)
    assert len(needles) == n_keys and len({k for k, _ in needles}) == n_keys
    assert dict(needles)[re.search(r"magic number for (\S+) mentioned", s.text).group(1)] == s.answers[0]
    assert abs(len(s.ids) - n) <= tol(n)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "number_string"])
def test_needle_token_positions_decode_to_the_answer(tiny_dir, task):
    """Every position found holds a piece of the answer: each maximal run decodes to the answer (the bytes tokenizer
    splits digits alone), and the answer occurs in the text as often as runs are found."""
    tok = tokenizer(str(tiny_dir))
    s = sample(str(tiny_dir), task, 800, 2, depth=0.5)
    positions = needle_token_positions(tok, s)
    assert positions == sorted(set(positions)) and all(0 <= p < len(s.ids) for p in positions)
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append(positions[start:i])
            start = i
    assert runs and all(tok.decode([s.ids[p] for p in run]).strip() == s.answers[0] for run in runs)
    assert len(runs) == s.text.count(s.answers[0])


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_task_lists_known_ones(tiny_dir):
    tok = tokenizer(str(tiny_dir))
    for call in (lambda: TASKS["niah_bogus"], lambda: make_sample("niah_bogus", tok, 600, 0),
                 lambda: score("niah_bogus", "x", ["x"])):
        with pytest.raises(OracleError, match="niah_bogus") as e:
            call()
        assert all(t in str(e.value) for t in ALL)


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey_uuid", "vt", "cwe", "fwe", "kv_retrieval"])
def test_too_short_names_the_minimum(tiny_dir, task):
    tok = tokenizer(str(tiny_dir))
    with pytest.raises(OracleError, match=r"at least (\d+)") as e:
        make_sample(task, tok, 50, 0)
    minimum = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert minimum > 50
    s = make_sample(task, tok, minimum, 0)  # the minimum it names works ...
    assert abs(len(s.ids) - minimum) <= tol(minimum)
    with pytest.raises(OracleError, match="at least"):  # ... and one less does not
        make_sample(task, tok, minimum - 1, 0)


def test_bad_depth_and_length(tiny_dir):
    tok = tokenizer(str(tiny_dir))
    with pytest.raises(OracleError, match="depth"):
        make_sample("niah_single", tok, 600, 0, depth=1.5)
    with pytest.raises(OracleError, match="depth"):
        make_sample("niah_multivalue", tok, 600, 0, depth=0.5)
    with pytest.raises(OracleError, match="n_tokens"):
        make_sample("passkey", tok, 0, 0)
    for n_keys in (0, -1, 10_000, 2.5, True):
        with pytest.raises(OracleError, match="n_keys"):
            niah_multikey(tok, 900, 0, n_keys=n_keys)


# --- scoring: the published rules on hand-made predictions -------------------------------------


def test_scoring_rule_names():
    assert set(SCORING) == set(ALL)
    assert {SCORING[t] for t in ALL[:8]} == {"string_match_all"}
    assert SCORING["passkey"] == SCORING["number_string"] != SCORING["kv_retrieval"]


def test_score_string_match_all():
    assert score("niah_single", "The special magic number for apple is 8812345.", ["8812345"]) == 1.0
    assert score("niah_single", "It is 8812346.", ["8812345"]) == 0.0
    refs = ["1111111", "2222222", "3333333", "4444444"]
    assert score("niah_multivalue", "1111111, 3333333 and 9999999", refs) == 0.5
    assert score("niah_multiquery", "4444444\n3333333\n2222222\n1111111", refs) == 1.0
    assert score("vt", "they are: vqxab, KLMNO, and PQRST", ["VQXAB", "KLMNO", "PQRST", "ABCDE", "FGHIJ"]) == 0.6
    assert score("cwe", "1. bako 2. dumi", ["bako", "dumi", "fesa", "gilo"]) == 0.5
    assert score("fwe", "\x00zivo togu rune", ["zivo", "togu", "rune"]) == 1.0


def test_score_first_int_match():
    assert score("passkey", "The pass key is 71432.", ["71432"]) == 1.0
    assert score("passkey", "  71432 is the pass key, it was hidden on page 3", ["71432"]) == 1.0
    assert score("passkey", "Page 3 says the pass key is 71432.", ["71432"]) == 0.0  # a wrong run first
    assert score("passkey", "714320", ["71432"]) == 0.0
    assert score("passkey", "7143 2", ["71432"]) == 0.0
    assert score("passkey", "no digits here", ["71432"]) == 0.0
    assert score("number_string", "The sequence is 0012345678.", ["0012345678"]) == 1.0
    assert score("number_string", "The sequence is 12345678.", ["0012345678"]) == 0.0


def test_score_kv_retrieval():
    key, value = "2a3bd0f4-1c5e-4a8e-9b3f-5d6c7e8f9a0b", "c0ffee00-1234-4abc-8def-0123456789ab"
    assert score("kv_retrieval", f'The value is "{value}".', [value]) == 1.0
    assert score("kv_retrieval", f"{{'{key}': '{value}'}}", [value]) == 1.0
    assert score("kv_retrieval", f"{value}\n", [value]) == 1.0
    assert score("kv_retrieval", f'"{key}" is the key; its value is "{value[:-1]}0"', [value]) == 0.0
    assert score("kv_retrieval", f"{value}x", [value]) == 0.0  # not a whole word
    assert score("kv_retrieval", f"({value})", [value]) == 0.0  # parentheses are not in the clean-up
    assert score("kv_retrieval", value.upper(), [value]) == 0.0  # case-sensitive


# --- SmolLM2's tokenizer at 1000 tokens --------------------------------------------------------


@pytest.mark.smollm2
def test_every_task_on_smollm2(smollm2_dir):
    for task in ALL:
        check_sample(str(smollm2_dir), task, 1000)
    for task in DEPTH:
        for depth in (0.0, 0.5, 1.0):
            s = sample(str(smollm2_dir), task, 1000, 2, depth=depth)
            assert abs(len(s.ids) - 1000) <= tol(1000)
            assert depth_ok(task, s, depth)
