"""`asl view` and `asl check --html` (reference/oracle/view.py, docs/view.md): the page's content, without a browser.

tests/test_view_browser.py opens the same pages in headless Chromium; the builders of the pages both files use
(a tiny bundle, planted-bug candidates, a hostile trace and tokenizer, a 100K-token trace) are here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import shutil
import time
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from reference.asl.generate import generate
from reference.asl.params import METHOD
from reference.asl.selection import select_k_prime
from reference.cli import main
from reference.io.checkpoint import eos_token_ids, load_weights
from reference.io.fetch import resolve_model
from reference.io.tokenizer import load_tokenizer
from reference.oracle.bundle import check_trace, write_bundle
from reference.oracle.candidate import CaseInputs, LayerDecision, build_candidate
from reference.oracle.goldens import default_cases
from reference.oracle.mutations import CATALOGUE, planted, run_case
from reference.oracle.trace import load_trace, make_trace, save_trace
from reference.oracle.view import PAGE_TOKENS, SCRIPT, Text, prompt_text, render_page, token_pieces, write_view

ROOT = Path(__file__).resolve().parent.parent
CASES = ("tiny-llama-asl", "tiny-llama-snapkv", "tiny-llama-pyramidinfer", "tiny-llama-full")
PLANTED = {"tiny-llama-asl": "gqa-one-head-per-group", "tiny-llama-snapkv": "gqa-one-head-per-group"}
HOSTILE_NAME = "</script><script>window.__pwned=1</script><marquee onmouseover=alert(1)>\"'&amp;\x1b[31m"
HOSTILE_NOTE = "a note with \"double\" and 'single' quotes, </style><style>*{display:none}</style> and \x07\x00"
HOSTILE_PIECES = ['<img src=x onerror="window.__pwned=2">', "</script><script>window.__pwned=3</script>",
                  "</style>", '"quoted\'', "\x1b[31mred\x00", "<!--", "]]>", "&lt;amp&gt;", "\u2028line"]


# ---------------------------------------------------------------- builders (tests/test_view_browser.py uses them)


def tiny_bundle(out: Path) -> Path:
    """A tiny-llama bundle of four cases: ASL, SnapKV, PyramidInfer and full."""
    cases = [c for c in default_cases() if c.name in CASES]
    return write_bundle("tiny-llama", cases, out, "float64", progress=False)


def planted_candidates(bundle: Path, out: Path) -> Path:
    """A candidate directory: ASL and SnapKV with a planted bug (FAIL), full as the oracle ran it (PASS), and
    PyramidInfer missing (ERROR)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = load_weights(resolve_model("tiny-llama"), "float64")
    for case, bug in PLANTED.items():
        with planted(next(m for m in CATALOGUE if m.name == bug)) as engine:
            trace, arrays = run_case(weights, bundle, case, engine)
        save_trace(trace, arrays, out / f"{case}.trace.json", with_arrays=True)
    for suffix in ("json", "npz"):
        shutil.copy(bundle / f"tiny-llama-full.trace.{suffix}", out / f"tiny-llama-full.trace.{suffix}")
    return out


def hostile_checkpoint(out: Path) -> Path:
    """tiny-llama's config with a tokenizer whose pieces are markup, quotes and control characters."""
    from tokenizers import Tokenizer, decoders, models

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(resolve_model("tiny-llama") / "config.json", out / "config.json")
    vocab = {p: i for i, p in enumerate(HOSTILE_PIECES)}
    vocab |= {f"t{i}": i for i in range(len(HOSTILE_PIECES), 259)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t20"))
    tok.decoder = decoders.Fuse()  # pieces joined as they are
    tok.save(str(out / "tokenizer.json"))
    return out


def hostile_trace(bundle: Path, out: Path) -> Path:
    """The bundle's ASL trace with a model name and notes that are markup, its prompt starting with the hostile
    tokenizer's pieces."""
    trace, arrays = load_trace(bundle / "tiny-llama-asl.trace.json")
    trace["model"]["name"] = HOSTILE_NAME
    trace["notes"] = [HOSTILE_NOTE]
    trace["prompt_ids"] = list(range(len(HOSTILE_PIECES))) + trace["prompt_ids"][len(HOSTILE_PIECES):]
    path = out / "hostile.trace.json"
    save_trace(trace, arrays, path, with_arrays=True)
    return path


@functools.cache
def long_trace(N: int = 100_000, layers: int = 8) -> tuple[dict, dict]:
    """A valid ASL trace of N tokens built with the implementer's kit (no model runs): scores that settle layer
    by layer, the selection at L_min. Built once per session (both test files read it; nothing changes it)."""
    rng = np.random.default_rng(0)
    p = dict(window=32, kernel=7, pooling="avg", select_k=2048, tau=0.5, l_min=4, l_obs=3, kv_budget=None,
             select_layer=6, filter_layer=6)
    shape = dict(model_type="llama", num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, hidden_size=32, intermediate_size=64, vocab_size=259)
    case = CaseInputs("long", "long-model", "0" * 64, rng.integers(3, 259, N).tolist(), "asl", p, 2, [], "float32")
    base = rng.random(N - p["window"]).astype(np.float32)
    first, select = p["l_min"] - p["l_obs"] + 1, p["l_min"]
    scores = {l: base + rng.random(N - p["window"]).astype(np.float32) * np.float32(0.5 ** l)
              for l in range(first, select + 1)}
    order = np.argsort(-scores[select], kind="stable")
    kept = np.sort(np.concatenate([order[:select_k_prime(p["select_k"], N, p["window"])],
                                   np.arange(N - p["window"], N)]))
    decisions = [LayerDecision(kv_positions=[np.arange(N) if l <= select else kept] * 2, scores=scores.get(l))
                 for l in range(layers)]
    return build_candidate(case, shape, layers=decisions, logits=np.zeros(259, np.float32), generated_ids=[5, 6],
                           generated_gaps=[1.0, 1.0], select_layer=select, kept_positions=kept)


class Page(HTMLParser):
    """The elements of a page and its text, as the HTML parser reads them (what a browser would build)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.text, self._in = [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = (tag, dict(attrs)) if tag == "script" else None
        if tag == "script":
            self.scripts.append([dict(attrs), ""])

    def handle_data(self, data):
        if self._in is not None and self.scripts:
            self.scripts[-1][1] += data
        else:
            self.text.append(data)

    def handle_endtag(self, tag):
        self._in = None

    def data(self) -> dict:
        return json.loads(next(body for attrs, body in self.scripts if attrs.get("type") == "application/json"))

    def all_text(self) -> str:
        return "".join(self.text)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("view") / "bundle")


@pytest.fixture(scope="module")
def candidates(bundle, tmp_path_factory) -> Path:
    return planted_candidates(bundle, tmp_path_factory.mktemp("view") / "candidate")


def _every_method_traces():
    """(name, trace, arrays) for every method and the edge cases that change what a page says, on tiny-llama."""
    weights = load_weights(resolve_model("tiny-llama"), "float64")
    eos = eos_token_ids(resolve_model("tiny-llama"), weights.config)
    wanted = ("full", "snapkv", "fastkv", "fastkv-kv-budget", "gemfilter", "asl", "asl-kv-budget", "asl-2pass",
              "pyramidinfer", "edge-n-le-w", "edge-never-fires", "edge-2pass-never-fires", "edge-v0-zero")
    out = []
    for case in default_cases():
        if case.model == "tiny-llama" and case.name.removeprefix("tiny-llama-") in wanted:
            gen = generate(weights, case.prompt_ids(), 4, eos, method=case.method, params=case.full_params())
            trace, arrays = make_trace(gen, model_name="tiny-llama", model_sha256="0" * 64, config=weights.config,
                                       dtype="float64")
            out.append((case.name, trace, arrays))
    return out


@pytest.fixture(scope="module")
def every_method():
    return _every_method_traces()


# ---------------------------------------------------------------- the page


def test_every_method_gets_a_page_with_its_run_charts_and_strip(every_method):
    text = Text(None, "token ids")
    seen = set()
    for name, trace, arrays in every_method:
        page = Page(render_page(trace, arrays, text))
        data = page.data()
        seen.add(trace["method"])
        shown = page.all_text()
        assert f"{trace['method']} on tiny-llama" in shown, name
        assert f"{trace['num_prompt_tokens']} tokens" in shown, name
        assert "KV cache after prefill".upper() in shown.upper() and "of full" in shown, name
        assert data["n"] == trace["num_prompt_tokens"] and data["views"], name
        charts = [a for t, a in page.tags if t == "svg"]
        assert charts, name
        criterion = any(a.get("aria-label") == "ASL ratio against tau" for a in charts)
        has_ratio = any(e["ratio"] is not None for e in trace["first_pass"] or trace["layers"])
        assert criterion == (METHOD[trace["method"]].decides == "criterion" and has_ratio), name
        if trace["select_layer"] is not None:
            assert data["views"][0]["key"] == "sel" and f"Selection at layer {trace['select_layer']}" in \
                data["views"][0]["label"], name
        if "never fired" in " ".join(trace["notes"]) and has_ratio:
            assert "never fired" in shown, name
        if METHOD[trace["method"]].per_layer:  # a kept set per pruning layer, the narrowest shown first
            kept = [v for v in data["views"] if v["key"].startswith("kept-")]
            assert len(kept) == sum(e["kept_tokens"] is not None for e in trace["layers"]) and \
                data["default"] == kept[-1]["key"], name
        if trace["params"]["kv_budget"] is not None and trace["num_prompt_tokens"] > trace["params"]["kv_budget"]:
            assert data["snap"] and any(v["kind"] == "snap" for v in data["views"]), name
    assert seen == set(METHOD)


def test_the_page_is_one_file_that_loads_nothing_and_runs_only_its_own_script(bundle):
    trace, arrays = load_trace(bundle / "tiny-llama-asl.trace.json")
    html_text = render_page(trace, arrays, Text(None, "token ids"))
    page = Page(html_text)
    csp = next(a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp
    code = next(body for attrs, body in page.scripts if "type" not in attrs)
    assert code == SCRIPT.read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp  # an injected script would not run, even if one got in
    assert not re.search(r"(src|href)\s*=", html_text.replace(code, "")), "the page links to nothing"
    assert "http://" not in html_text and "https://" not in html_text


def test_strings_from_files_are_text_never_markup(bundle, tmp_path):
    path = hostile_trace(bundle, tmp_path)
    ckpt = hostile_checkpoint(tmp_path / "ckpt")
    out = write_view(path, tmp_path / "hostile.html", model=str(ckpt))
    html_text = out.read_text(encoding="utf-8")
    page = Page(html_text)
    tags = [t for t, _ in page.tags]
    assert tags.count("script") == 2 and tags.count("style") == 1, "only the page's own script, data and style"
    assert not {"img", "marquee"} & set(tags)
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs), "no event handler attribute"
    data = page.data()
    assert data["pieces"][:len(HOSTILE_PIECES)] == HOSTILE_PIECES, "the tokenizer's pieces, verbatim, as data"
    title = next(body for body in page.text if "asl on" in body)
    assert "</script><script>window.__pwned=1</script><marquee onmouseover=alert(1)>\"'&amp;\\x1b[31m" in title
    assert "and 'single' quotes, </style><style>*{display:none}</style> and \\x07\\x00" in page.all_text()
    raw = html_text.split('id="asl-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in raw and ">" not in raw and "&" not in raw, "the data block holds no markup character"


def test_a_trace_without_arrays_gets_a_page_saying_what_it_cannot_show(bundle, tmp_path):
    trace, arrays = load_trace(bundle / "tiny-llama-asl.trace.json")
    path = tmp_path / "no-arrays.trace.json"
    save_trace(trace, arrays, path, with_arrays=False)
    page = Page(write_view(path).read_text(encoding="utf-8"))
    assert "saved without its arrays" in page.all_text() and "--trace-arrays" in page.all_text()
    data = page.data()
    assert data["scored"] == [] and data["hasArrays"] is False
    kept = data["views"][0]  # the kept positions still come from the JSON
    assert kept["key"] == "sel" and len(base64.b64decode(kept["kept"]["b"])) == 4 * len(trace["kept_positions"])


def test_a_bad_trace_gets_the_same_one_line_error_as_asl_trace(tmp_path, capsys, bundle):
    doc = json.loads((bundle / "tiny-llama-asl.trace.json").read_text())
    doc["layers"][3]["kv_tokens"] = [1]
    bad = tmp_path / "bad.trace.json"
    bad.write_text(json.dumps(doc))
    (tmp_path / "junk.json").write_text("{not json")
    for path in (bad, tmp_path / "junk.json", tmp_path / "missing.json"):
        assert main(["trace", str(path)]) == 2
        want = capsys.readouterr().err
        assert main(["view", str(path)]) == 2
        got = capsys.readouterr().err
        assert got == want and got.startswith("asl: error: ") and got.count("\n") == 1
    assert not (tmp_path / "bad.trace.html").exists()


def test_view_prints_the_page_it_writes(bundle, tmp_path, capsys):
    shutil.copy(bundle / "tiny-llama-asl.trace.json", tmp_path / "t.json")
    shutil.copy(bundle / "tiny-llama-asl.trace.npz", tmp_path / "tiny-llama-asl.trace.npz")
    assert main(["view", str(tmp_path / "t.json")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "t.html") and (tmp_path / "t.html").is_file()
    assert main(["view", str(tmp_path / "t.json"), "-o", str(tmp_path / "x.html")]) == 0
    assert "decoded with the tokenizer of" in (tmp_path / "x.html").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["view", str(tmp_path / "t.json"), "-o", str(tmp_path / "t.json")]) == 2
    assert "that is the trace itself" in capsys.readouterr().err and load_trace(tmp_path / "t.json")


# ---------------------------------------------------------------- the check


def test_golden_shows_the_checkers_verdict_and_the_positions_each_side_kept(bundle, candidates, tmp_path):
    cand = candidates / "tiny-llama-asl.trace.json"
    result = check_trace(bundle / "tiny-llama-asl.trace.json", cand)
    assert result.verdict == "FAIL" and result.findings[0].field == "kept_positions"
    page = Page(write_view(cand, tmp_path / "fail.html", golden=bundle).read_text(encoding="utf-8"))
    shown = page.all_text()
    assert "FAIL" in shown and "kept_positions" in shown and result.findings[0].message in shown
    data = page.data()
    diff = data["views"][0]
    assert diff["kind"] == "diff" and data["default"] == diff["key"] and data["focus"] == result.findings[0].position
    expected, _ = load_trace(bundle / "tiny-llama-asl.trace.json")
    got, _ = load_trace(cand)
    oracle = set(np.frombuffer(base64.b64decode(diff["oracle"]["b"]), "<u4").tolist())
    ours = set(np.frombuffer(base64.b64decode(diff["cand"]["b"]), "<u4").tolist())
    assert oracle == set(expected["kept_positions"]) and ours == set(got["kept_positions"])
    assert set(map(int, diff["detail"])) == oracle ^ ours
    q = min(oracle - ours)
    assert diff["detail"][str(q)].startswith("kept only by the oracle") and "from the boundary score" in \
        diff["detail"][str(q)]
    # the planted bug's kept set and the oracle's, both drawn on the same prompt: the candidate's name does not resolve
    assert got["model"]["name"] == "planted" and data["pieces"] is not None


def test_a_snapkv_fail_shows_the_kv_heads_caches_that_part(bundle, candidates, tmp_path):
    cand = candidates / "tiny-llama-snapkv.trace.json"
    first = check_trace(bundle / "tiny-llama-snapkv.trace.json", cand).findings[0]
    layer, head = map(int, re.match(r"kv_positions\[(\d+)\]\[(\d+)\]", first.field).groups())
    data = Page(write_view(cand, tmp_path / "kv.html", golden=bundle).read_text(encoding="utf-8")).data()
    assert data["default"] == f"diff-kv-{layer}-{head}"


def test_golden_takes_a_bundle_or_a_trace_and_names_a_missing_case(bundle, candidates, tmp_path, capsys):
    cand = candidates / "tiny-llama-asl.trace.json"
    by_file = write_view(cand, tmp_path / "a.html", golden=bundle / "tiny-llama-asl.trace.json")
    assert "FAIL" in Page(by_file.read_text(encoding="utf-8")).all_text()
    other = tmp_path / "other.trace.json"
    shutil.copy(cand, other)
    shutil.copy(candidates / "tiny-llama-asl.trace.npz", tmp_path / "tiny-llama-asl.trace.npz")
    doc = json.loads(other.read_text())
    doc["arrays_file"] = None
    other.write_text(json.dumps(doc))
    assert main(["view", str(other), "--golden", str(bundle)]) == 2
    assert "no case 'other'" in capsys.readouterr().err


def test_check_html_writes_a_page_per_case_and_an_index_of_verdicts(bundle, candidates, tmp_path, capsys):
    pages = tmp_path / "pages"
    status = main(["check", str(candidates), "--golden", str(bundle), "--html", str(pages)])
    out = capsys.readouterr().out
    assert status == 1 and f"pages: {pages / 'index.html'}" in out
    index = Page((pages / "index.html").read_text(encoding="utf-8"))
    links = [a["href"] for t, a in index.tags if t == "a"]
    assert sorted(links) == ["tiny-llama-asl.html", "tiny-llama-full.html", "tiny-llama-snapkv.html"]
    text = index.all_text()
    assert text.count("FAIL") >= 2 and "PASS" in text and "ERROR" in text and "missing" in text
    for link in links:
        assert (pages / link).is_file()
    fail = Page((pages / "tiny-llama-asl.html").read_text(encoding="utf-8"))
    assert "FAIL" in fail.all_text() and fail.data()["views"][0]["kind"] == "diff"
    passed = Page((pages / "tiny-llama-full.html").read_text(encoding="utf-8"))
    assert "PASS" in passed.all_text() and not any(v["kind"] == "diff" for v in passed.data()["views"])
    # --json keeps stdout machine-readable
    assert main(["check", str(candidates), "--golden", str(bundle), "--json", "--html", str(pages)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) and "pages:" in captured.err


# ---------------------------------------------------------------- long prompts, text, dependencies


def test_a_100k_token_prompt_gives_a_proportionate_page():
    trace, arrays = long_trace()
    N, scored = trace["num_prompt_tokens"], sum(e["scored"] for e in trace["layers"])
    start = time.perf_counter()
    html_text = render_page(trace, arrays, Text(None, "token ids"))
    seconds = time.perf_counter() - start
    data = Page(html_text).data()
    assert data["pageSize"] == PAGE_TOKENS and data["n"] == N
    # ids (~6 bytes each) and, per scored layer, a float32 score and a uint32 rank in base64 (~11 bytes)
    assert len(html_text) < N * (8 + 12 * scored) + 200_000, len(html_text)
    assert seconds < 10, seconds


def test_token_pieces_are_the_text_each_token_adds(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    text = "naïve café: 日本語 🙂 ok\n\tindented  <b>&amp;</b>"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert "\ufffd" not in "".join(pieces), "a character split over byte tokens goes to the token completing it"


def test_tiny_tokenizer_pieces_and_the_ids_fallback(bundle):
    trace, _ = load_trace(bundle / "tiny-llama-asl.trace.json")
    text = prompt_text(trace)
    assert text.pieces is not None and len(text.pieces) == trace["num_prompt_tokens"]
    trace["model"]["name"] = "no-such-model"
    text = prompt_text(trace)
    assert text.pieces is None and "no tokenizer at hand" in text.source and "--model" in text.source
    assert prompt_text(trace, ["tiny-llama"]).pieces is not None


def test_what_draws_pictures_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in project["dependencies"]]
    assert "matplotlib" in base, "asl report draws its PNGs with matplotlib: the base install must bring it"
    view = (ROOT / "reference" / "oracle" / "view.py").read_text()
    assert "matplotlib" not in view and "plotly" not in view, "the page draws its charts as SVG itself"
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"view.js", "view.css"} <= set(data["reference.oracle"]), "the page's script and styles ship with it"
