"""`asl view` and `asl check --html`: a run, or a check, as one self-contained HTML page.

    write_view("t.json")                                  # t.html beside the trace
    write_view("cand/CASE.trace.json", golden="bundle")   # the check of one case, on the prompt's own text
    write_check_pages(results, "cand", "bundle", "pages") # one page per case and pages/index.html

A page is one file: its styles and script (view.css, view.js beside this
module) and its data are inline, its charts are SVG drawn in Python
(reference/oracle/charts.py), and its Content-Security-Policy lets it load nothing
(`default-src 'none'`) and run only its own script (by hash). It shows the run
(model, method, parameters, prompt length, selection layer, KV and FLOP
saving), the tokens each layer processed and cached, ASL's ratio against τ,
and the prompt's own text (decoded with the checkpoint's tokenizer when it is
at hand, token ids otherwise) with the kept tokens highlighted; hovering a
token shows its score and rank at every scored layer. Long prompts are shown a
page of tokens at a time, with an overview of the whole prompt to jump from.

Every string that came from a file (model names, notes, decoded text, case
names, findings) reaches the page as text: escaped in the HTML, and in the data
block as JSON whose `<`, `>` and `&` are `\\u` escapes, set with textContent by
the script. docs/view.md describes the page.

(Length: one page: the data the script reads and the check's panel, which share the trace's reading of rows and
positions.)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from reference.asl import pyramid
from reference.asl.params import METHOD
from reference.asl.selection import boundary_score, ranks, select_k_prime
from reference.errors import OracleError
from reference.io.atomic import atomic_write
from reference.io.fetch import resolve_model
from reference.io.tokenizer import Tokenizer, load_tokenizer
from reference.model.config import load_config
from reference.oracle.bundle import ERROR, NOT_CHECKED, CaseResult, check_trace
from reference.oracle.charts import criterion_chart, number, tokens_chart
from reference.oracle.trace import load_trace
from reference.oracle.verdicts import FAIL, NEAR, NOTE, PASS

PAGE_TOKENS = 2048  # tokens drawn at once in the strip; longer prompts are paged
HERE = Path(__file__).parent
SCRIPT = HERE / "view.js"
STYLE = HERE / "view.css"
PARAM_NAMES = ("window", "kernel", "pooling", "select_k", "tau", "l_min", "l_obs", "kv_budget", "select_layer",
               "filter_layer")
PARAM_SYMBOL = {"window": "w", "kernel": "s", "select_k": "k", "tau": "τ", "l_min": "L_min", "l_obs": "L_obs",
                "kv_budget": "B", "select_layer": "ℓ_f", "filter_layer": "ℓ_g"}


# ---------------------------------------------------------------- text from files


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text) -> str:
    """A string from a file, made safe to write: lone surrogates become U+FFFD (the rest stays as it is)."""
    return str(text).encode("utf-8", "surrogatepass").decode("utf-8", "replace") if isinstance(text, str) else str(text)


def shown(text) -> str:
    """Text from a file as HTML text: control characters written as \\xNN, then escaped (quotes too)."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", clean(text)), quote=True)


def script_json(value) -> str:
    """JSON for a <script type="application/json"> block: no `<`, `>` or `&` that the HTML parser could read."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _packed(a: np.ndarray, kind: str) -> dict:
    """An array for the script: little-endian bytes in base64 and their type (f32, u16 or u32)."""
    dtype = {"f32": "<f4", "u16": "<u2", "u32": "<u4"}[kind]
    return {"t": kind, "b": base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")}


def _positions(a) -> dict:
    return _packed(np.asarray(a, dtype=np.int64), "u32")


# ---------------------------------------------------------------- the prompt's text


@dataclass(frozen=True)
class Text:
    pieces: list[str] | None  # one string per prompt token, or None: the page shows ids
    source: str  # how the prompt is shown, in a sentence
    decode: object = None  # ids -> text, when a tokenizer is at hand

    def words(self, ids) -> str:
        """Generated ids as the page shows them: decoded, or the ids."""
        return clean(self.decode(ids)) if self.decode is not None else " ".join(map(str, ids))


def token_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text: decode(context + token) minus decode(context), with 4 tokens of
    context, so SentencePiece's leading spaces and byte-level pieces come out as they read in the whole text;
    a character spread over several byte tokens goes to the token that completes it."""
    ctx = 4
    before = tok.backend.decode_batch([ids[max(0, i - ctx):i] for i in range(len(ids))], skip_special_tokens=False)
    after = tok.backend.decode_batch([ids[max(0, i - ctx):i + 1] for i in range(len(ids))], skip_special_tokens=False)
    pieces: list[str] = []
    for a, b in zip(before, after):
        if b.startswith(a):
            pieces.append(b[len(a):])
            continue
        stem = a.rstrip("\ufffd")  # the context ended inside a character that this token completes
        if b.startswith(stem):
            pending = len(a) - len(stem)  # its replacement characters sit at the end of earlier pieces: drop them
            for j in range(len(pieces) - 1, -1, -1):
                kept = pieces[j].rstrip("\ufffd")
                dropped = min(pending, len(pieces[j]) - len(kept))
                pieces[j] = pieces[j][:len(pieces[j]) - dropped]
                pending -= dropped
                if pending == 0 or kept:
                    break
            pieces.append(b[len(stem):])
            continue
        common = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pieces.append(b[common:])
    return [clean(p) for p in pieces]


def _tokenizer_for(names, trace: dict) -> tuple[Tokenizer | None, str]:
    """The first of `names` (aliases or directories) whose checkpoint has this trace's shape and a tokenizer that
    knows every id; else None and why."""
    why = []
    shape = trace["model"]
    for name in dict.fromkeys(n for n in names if n):
        try:
            model_dir = resolve_model(name)
            cfg = load_config(model_dir)
            if (cfg.num_hidden_layers, cfg.vocab_size, cfg.num_key_value_heads) != \
                    (shape["num_hidden_layers"], shape["vocab_size"], shape["num_key_value_heads"]):
                why.append(f"{name}: its config is not the trace's model (layers, vocabulary, KV heads)")
                continue
            tok = load_tokenizer(model_dir)
        except OracleError as e:
            why.append(str(e))
            continue
        size = tok.backend.get_vocab_size(with_added_tokens=True)
        if max(trace["prompt_ids"] + trace["generated_ids"], default=0) >= size:
            why.append(f"{name}: its tokenizer knows {size} ids, fewer than the trace uses")
            continue
        return tok, f"the prompt decoded with the tokenizer of {model_dir}"
    return None, "; ".join(why) or "no model named"


def prompt_text(trace: dict, names=()) -> Text:
    """The prompt as the page shows it: decoded when one of `names`, else the trace's model, resolves to a
    checkpoint with a tokenizer; token ids otherwise, saying why."""
    tok, source = _tokenizer_for([*names, trace["model"]["name"]], trace)
    if tok is None:
        return Text(None, f"token ids (no tokenizer at hand: {source}; pass --model DIR to decode the text)")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return Text(token_pieces(tok, trace["prompt_ids"]), source, decode)


# ---------------------------------------------------------------- reading a trace: rows, scores, sets


def _rows(trace: dict, arrays: dict, layer: int, first: bool) -> np.ndarray:
    """The prompt positions of a layer's rows, in row order (what scores/ℓ and kv_scores/ℓ/g index)."""
    N, select, kept = trace["num_prompt_tokens"], trace["select_layer"], trace["kept_positions"]
    if METHOD[trace["method"]].per_layer:
        return np.asarray(arrays.get(f"kv_positions/{layer}/0", np.arange(N)), dtype=np.int64)
    if first:
        return np.arange(N)
    if trace["first_pass"] is not None:  # a second pass: row j is kept_positions[j]
        return np.asarray(kept, dtype=np.int64)
    return np.asarray(kept, dtype=np.int64) if select is not None and layer > select else np.arange(N)


def _cached(trace: dict, arrays: dict, layer: int, head: int) -> np.ndarray | None:
    """Prompt positions KV head `head` of `layer` holds after prefill (second-pass positions mapped back)."""
    a = arrays.get(f"kv_positions/{layer}/{head}")
    if a is None:
        return None
    a = np.asarray(a, dtype=np.int64)
    return np.asarray(trace["kept_positions"], dtype=np.int64)[a] if trace["first_pass"] is not None else a


def window_of(trace: dict) -> tuple[int, int] | None:
    """[lo, hi): the prompt's last tokens that are always kept (none when nothing was scored)."""
    N, p, m = trace["num_prompt_tokens"], trace["params"], METHOD[trace["method"]]
    if m.per_layer:
        return N - min(N, pyramid.recent_length(N, p["recent_ratio"]) + 1), N
    if m.window_scored and m.decides != "last-query" and N > p["window"]:
        return N - p["window"], N
    if p["kv_budget"] is not None and N > p["window"]:
        return N - p["window"], N
    return None


def _top_count(trace: dict, entry: dict) -> int | None:
    """How many of a scored layer's ranked tokens its top set holds (k', GemFilter's min(k, N), PyramidInfer's
    kept context)."""
    m, p, N = METHOD[trace["method"]], trace["params"], trace["num_prompt_tokens"]
    if m.per_layer:
        W = window_of(trace)
        return None if entry["kept_tokens"] is None else entry["kept_tokens"] - (W[1] - W[0])
    if m.decides == "last-query":
        return min(p["select_k"], N)
    if N <= p["window"]:
        return None
    return select_k_prime(p["select_k"], N, p["window"])


@dataclass
class Scored:
    """One scored layer, indexed by prompt position: score (NaN where the layer did not rank it) and rank (0)."""

    layer: int
    first: bool  # the first pass of a two-pass method
    score: np.ndarray  # (N,) float
    rank: np.ndarray  # (N,) int, 0 = not ranked
    count: int | None  # its top set's size
    ranked: int  # how many tokens it ranked

    @property
    def name(self) -> str:
        return f"{'pass 1 · ' if self.first else ''}layer {self.layer}"


def scored_layers(trace: dict, arrays: dict) -> list[Scored]:
    """Every scored layer whose scores and ranks the arrays hold, first pass first."""
    N = trace["num_prompt_tokens"]
    out = []
    for first, entries in ((True, trace["first_pass"] or []), (False, trace["layers"])):
        prefix = "first_pass/" if first else ""
        for e in entries:
            s, r = arrays.get(f"{prefix}scores/{e['layer']}"), arrays.get(f"{prefix}ranks/{e['layer']}")
            if not e["scored"] or s is None or r is None:
                continue
            rows = _rows(trace, arrays, e["layer"], first)[:len(s)]
            score, rank = np.full(N, np.nan), np.zeros(N, dtype=np.int64)
            score[rows], rank[rows] = np.asarray(s, dtype=np.float64)[:len(rows)], np.asarray(r)[:len(rows)]
            out.append(Scored(e["layer"], first, score, rank, _top_count(trace, e), len(rows)))
    return out


def deciding(trace: dict, scored: list[Scored]) -> Scored | None:
    """The scored layer whose ranks chose `kept_positions` (the first pass's for a two-pass method)."""
    two_pass = trace["first_pass"] is not None
    return next((s for s in scored if s.layer == trace["select_layer"] and s.first == two_pass), None)


# ---------------------------------------------------------------- numbers in words


def _si(x: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _num(x) -> str:
    """A number from a trace as HTML text ("–" for null, "∞" for "inf")."""
    return shown(x) if isinstance(x, str) and x != "inf" else number(x)


def _span(layers: list[int]) -> str:
    if not layers:
        return "no layer"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def what_happened(trace: dict) -> list[str]:
    """The run in sentences a learner can follow (HTML, every number from the trace)."""
    m, p, N = METHOD[trace["method"]], trace["params"], trace["num_prompt_tokens"]
    L, sel, kept = len(trace["layers"]), trace["select_layer"], trace["kept_positions"]
    w, k = p["window"], p["select_k"]
    short = (m.window_scored or p["kv_budget"] is not None) and N <= w  # nothing can be scored: ran as full
    everything = kept is not None and len(kept) == N
    out = []
    if m.decides is None and not m.needs_budget:
        out.append(f"<b>Full attention</b>: all {L} layers processed and cached all {N} prompt tokens. Nothing was "
                   "pruned: this is the baseline every saving is measured against.")
    elif m.decides == "criterion" and trace["method"] == "asl":
        first = p["l_min"] - p["l_obs"] + 1
        out.append(f"<b>ASL</b> (adaptive selection layer): from layer {first} on, the last w = {w} tokens (the "
                   f"<i>window</i>) scored every earlier token by how much they attend to it. From layer L_min = "
                   f"{p['l_min']} on, ASL asks whether the ranking of the best tokens has settled: the variance of "
                   f"their ranks over the last L_obs = {p['l_obs']} layers, relative to layer L_min, is the "
                   f"<i>ratio</i>. The first layer where the ratio falls below τ = {_num(p['tau'])} is the "
                   "selection layer ℓ*.")
        if short:
            pass
        elif sel is None:
            out.append(f"Here the criterion <b>never fired</b>, so every layer processed all {N} tokens (the run is "
                       "a full one).")
        elif everything:
            out.append(f"Here it fired at <b>layer {sel}</b>, but the prompt's {N} tokens are no more than k = {k}: "
                       "the kept set is the whole prompt and nothing was pruned (a smaller --select-k prunes).")
        else:
            out.append(f"Here it fired at <b>layer {sel}</b>: layers 0–{sel} processed all {N} tokens; layers "
                       f"{sel + 1}–{L - 1} processed and cached only the <b>{len(kept)}</b> kept tokens (the "
                       f"{len(kept) - min(w, N)} best-ranked at layer {sel} and the window)." if sel < L - 1 else
                       f"Here it fired at the last layer, {sel}: every layer processed all {N} tokens.")
    elif m.decides == "criterion":
        out.append(f"<b>Two-pass ASL</b>: a first pass scores the prompt layer by layer, as ASL does, until the "
                   f"ratio falls below τ = {_num(p['tau'])} (or, if it never does, up to the last layer). The "
                   f"k = {k} best tokens there are then run again, from scratch, at fresh positions 0 … k−1: the "
                   "second pass, whose cache decoding uses.")
        if sel is not None:
            how = f"the first pass selected at <b>layer {sel}</b>" if not any(
                "never fired" in n for n in trace["notes"]) else \
                f"the criterion <b>never fired</b>, so the first pass fell back to the ranks of its last layer, {sel},"
            out.append(f"Here {how} and the second pass ran <b>{len(kept)}</b> of the {N} tokens through all {L} "
                       "layers.")
    elif m.decides == "fixed":
        out.append(f"<b>FastKV</b>: every layer up to its fixed layer ℓ_f = {p['select_layer']} processed all {N} "
                   f"tokens; there the window (the last w = {w} tokens) scored every earlier token, and the best "
                   f"k' = {max(k - w, 0)} with the window went on. Later layers process and cache only those.")
        if sel is not None:
            out.append(f"Here layers {sel + 1}–{L - 1} processed <b>{len(kept)}</b> of {N} tokens" +
                       (" (the whole prompt: N ≤ k)." if everything else "."))
    elif m.decides == "last-query":
        out.append(f"<b>GemFilter</b>: a first pass ran layers 0–{p['filter_layer']} over the whole prompt; at its "
                   f"filter layer ℓ_g = {p['filter_layer']} the last token's query scored every token, and the best "
                   f"k = {k} were run again from scratch at fresh positions 0 … k−1 through all {L} layers.")
        if sel is not None:
            out.append(f"Here the second pass ran <b>{len(kept)}</b> of the {N} tokens.")
    elif m.per_layer:
        pruned = [e["layer"] for e in trace["layers"] if e["kept_tokens"] is not None]
        every = "every layer" if p["layerwise_downsample_interval"] == 1 else \
            f"every layer that is a multiple of {p['layerwise_downsample_interval']}"
        out.append(f"<b>PyramidInfer</b>: {every} keeps a shrinking share r(ℓ) of the tokens it holds (the first "
                   f"{p['streamingllm_sink_len']} as sinks, the best by its window's attention, and the window: the "
                   "last int(N · recent_ratio) + 1 tokens), so the cache narrows like a pyramid. There is no single "
                   "selection layer: pick a layer above the prompt to see what it passed on.")
        out.append(f"Here {len(pruned)} layers pruned ({_span(pruned)}); layer 0 held {N} tokens, layer {L - 1} "
                   f"held {trace['layers'][-1]['prefill_tokens']}.")
    if short:
        out.append(f"This prompt has only N = {N} tokens, no more than the window w = {w}: no token can be scored, "
                   f"so the run is a full one (every layer processed and cached all {N} tokens).")
    if p["kv_budget"] is not None and not short:
        out.append(f"<b>SnapKV</b> (B = {p['kv_budget']}): at every layer that held more than B tokens, each KV head "
                   f"kept in its cache only the B − w = {p['kv_budget'] - w} prefix tokens it scored best, plus the "
                   "window. Prefill work is unchanged; the cache shrinks, and KV heads may keep different tokens.")
    return out


# ---------------------------------------------------------------- views of the token strip


def _view(key: str, label: str, kind: str, **fields) -> dict:
    return {"key": key, "label": label, "kind": kind, **fields}


def strip_views(trace: dict, arrays: dict, scored: list[Scored]) -> list[dict]:
    """What the strip can show: the selection, each scored layer's top set, PyramidInfer's kept set per layer,
    SnapKV's caches per layer (which KV heads hold each token)."""
    m, N = METHOD[trace["method"]], trace["num_prompt_tokens"]
    views = []
    index = {(s.layer, s.first): i for i, s in enumerate(scored)}
    two_pass = trace["first_pass"] is not None
    if trace["kept_positions"] is not None:
        shade = index.get((trace["select_layer"], two_pass))
        what = "its second pass ran" if two_pass else "went on past it"
        views.append(_view("sel", f"Selection at layer {trace['select_layer']}: the {len(trace['kept_positions'])} "
                           f"tokens that {what}", "set", kept=_positions(trace["kept_positions"]), shade=shade,
                           layer=trace["select_layer"]))
    if m.per_layer:
        for e in trace["layers"]:
            kept = arrays.get(f"kept/{e['layer']}")
            if e["kept_tokens"] is not None and kept is not None:
                views.append(_view(f"kept-{e['layer']}", f"Layer {e['layer']} passed on {e['kept_tokens']} of "
                                   f"{e['prefill_tokens']} (r = {_num(e['keep_ratio'])})", "set",
                                   kept=_positions(kept), shade=index.get((e["layer"], False)), layer=e["layer"]))
    else:
        for i, s in enumerate(scored):
            if s.count is None or (s.layer == trace["select_layer"] and s.first == two_pass):
                continue
            views.append(_view(f"rank-{'p1-' if s.first else ''}{s.layer}", f"{s.name}: its top {s.count} by score "
                               "(ranked here, not chosen)", "ranked", scored=i, layer=s.layer))
    heads = trace["model"]["num_key_value_heads"]
    for e in trace["layers"]:
        if e["kv_boundary_gaps"] is None:
            continue
        cached = [_cached(trace, arrays, e["layer"], g) for g in range(heads)]
        if any(c is None for c in cached):
            continue
        views.append(_view(f"kv-{e['layer']}", f"SnapKV cache of layer {e['layer']}: what each KV head kept "
                           f"({', '.join(map(str, e['kv_tokens']))})", "snap", heads=[_positions(c) for c in cached],
                           layer=e["layer"]))
    if not views:
        views.append(_view("all", f"Every token (nothing was pruned: all {N} processed and cached)", "all"))
    return views


def snap_layers(trace: dict, arrays: dict) -> list[dict]:
    """Per SnapKV layer, each KV head's cached positions: the hover's 'which KV heads kept it'."""
    heads = trace["model"]["num_key_value_heads"]
    out = []
    for e in trace["layers"]:
        if e["kv_boundary_gaps"] is not None:
            cached = [_cached(trace, arrays, e["layer"], g) for g in range(heads)]
            if all(c is not None for c in cached):
                out.append({"layer": e["layer"], "heads": [_positions(c) for c in cached]})
    return out


# ---------------------------------------------------------------- the check


@dataclass
class CheckView:
    """One case's check: the checker's result, and the oracle's trace it was judged against."""

    result: CaseResult
    expected: dict | None
    expected_arrays: dict
    case: str


def first_decisive(result: CaseResult):
    decisive = [f for f in result.findings if f.verdict != NOTE]
    return next((f for f in decisive if f.verdict == FAIL), decisive[0] if decisive else None)


def _distance_note(pos: int, scores: np.ndarray | None, rows: np.ndarray | None, count: int | None,
                   forced: np.ndarray | None = None) -> str:
    """Where the oracle ranked a position, and how far its score is from the oracle's top-`count` boundary."""
    if scores is None or rows is None or count is None:
        return "no oracle scores at hand to place it"
    row = {int(q): r for r, q in enumerate(rows)}.get(int(pos))
    if row is None:
        return "the oracle did not rank it here"
    scores = np.asarray(scores, dtype=np.float64)
    ranked = forced if forced is not None else scores
    rank = int(ranks(ranked)[row])
    b = boundary_score(ranked, count)
    scale = float(np.max(np.abs(scores))) or 1.0
    d = abs(float(scores[row]) - b) / scale
    side = f"{rank - count} place(s) past the boundary" if rank > count else \
        f"{count - rank + 1} place(s) inside the boundary"
    return (f"oracle rank {rank} of {len(scores)} (its top {count} are kept: {side}); score {float(scores[row]):.6g}, "
            f"{d:.3g} of the largest score from the boundary score {b:.6g}")


def diff_views(cv: CheckView, got: dict, got_arrays: dict) -> list[dict]:
    """The sets the two runs part on, on the prompt: kept by both, by the oracle only, by the candidate only,
    each differing position with the oracle's rank and its distance from the boundary."""
    exp, ea = cv.expected, cv.expected_arrays
    if exp is None:
        return []
    N, m = exp["num_prompt_tokens"], METHOD[exp["method"]]
    first = first_decisive(cv.result)
    field = first.field if first is not None else ""
    views = []

    def add(key, label, oracle_set, cand_set, scores, rows, count, layer, forced=None, window=()):
        o, c = set(map(int, oracle_set)), set(map(int, cand_set))
        if o == c:
            return
        detail = {}
        for q in sorted(o ^ c)[:2000]:
            who = "kept only by the oracle (the candidate dropped it)" if q in o else \
                "kept only by the candidate (the oracle dropped it)"
            where = "a window position: the window is always kept" if q in window else \
                _distance_note(q, scores, rows, count, forced)
            detail[str(q)] = f"{who}; {where}"
        views.append(_view(key, label, "diff", oracle=_positions(sorted(o)), cand=_positions(sorted(c)),
                           detail=detail, layer=layer))

    win = window_of(exp)
    window = set(range(*win)) if win else set()
    e_sel, g_sel = exp["select_layer"], got["select_layer"]
    if exp["kept_positions"] is not None or got["kept_positions"] is not None:
        two_pass = exp["first_pass"] is not None
        prefix = "first_pass/" if two_pass else ""
        layer = e_sel if e_sel is not None else g_sel
        scores = ea.get(f"{prefix}scores/{layer}") if e_sel is not None else None
        k, w = exp["params"]["select_k"], exp["params"]["window"]
        count = min(k, N) if m.decides == "last-query" else select_k_prime(k, N, w) if N > w else None
        where = f"layer {e_sel}" if e_sel == g_sel else f"the oracle's layer {e_sel}, the candidate's {g_sel}"
        add("diff-kept", f"Check: kept positions, oracle vs candidate ({where})",
            exp["kept_positions"] if exp["kept_positions"] is not None else range(N),
            got["kept_positions"] if got["kept_positions"] is not None else range(N),
            scores, np.arange(N) if scores is not None else None, count, layer, window=window)
    if m.per_layer:
        before = len(views)
        for e in exp["layers"]:
            layer = e["layer"]
            a, b = ea.get(f"kept/{layer}"), got_arrays.get(f"kept/{layer}")
            if a is None or b is None:
                continue
            s = ea.get(f"scores/{layer}")
            rows = _rows(exp, ea, layer, False)
            count = _top_count(exp, e)
            sinks = exp["params"]["streamingllm_sink_len"]
            forced = None if s is None else pyramid.sink_forced(np.asarray(s, dtype=np.float64), sinks)
            add(f"diff-kept-{layer}", f"Check: what layer {layer} passed on, oracle vs candidate", a, b, s,
                None if s is None else rows[:len(s)], count, layer, forced, window=window)
            if len(views) > before:
                break  # the first layer whose kept sets part: later layers ran on other tokens
    hit = re.match(r"kv_positions\[(\d+)\]\[(\d+)\]", field)
    if hit:
        layer, g = int(hit.group(1)), int(hit.group(2))
        a, b = _cached(exp, ea, layer, g), _cached(got, got_arrays, layer, g)
        if a is not None and b is not None:
            s = ea.get(f"kv_scores/{layer}/{g}")
            rows = _rows(exp, ea, layer, False)
            B, w = exp["params"]["kv_budget"], exp["params"]["window"]
            add(f"diff-kv-{layer}-{g}", f"Check: KV head {g} of layer {layer}'s cache, oracle vs candidate", a, b,
                s, None if s is None else rows[:len(s)], None if B is None else B - w, layer, window=window)
    pyramid_hit = re.match(r"kept\[(\d+)\]", field)
    want = "diff-kept" if field in ("kept_positions", "select_layer") else \
        f"diff-kv-{hit.group(1)}-{hit.group(2)}" if hit else \
        f"diff-kept-{pyramid_hit.group(1)}" if pyramid_hit else None
    views.sort(key=lambda v: v["key"] != want)
    return views


def check_panel(cv: CheckView, got: dict, text: Text) -> str:
    """The verdict, the first field that differs (with layer, position, margin), other findings and notes."""
    r = cv.result
    verdict = shown(r.verdict)
    cls = {PASS: "pass", NEAR: "near", FAIL: "fail"}.get(r.verdict, "other")
    out = [f'<section class="check {cls}" id="check"><h2>Check against the golden trace: '
           f'<span class="verdict" id="verdict">{verdict}</span></h2>',
           f'<p class="small">case <b>{shown(cv.case)}</b>, judged by the tolerance policy of docs/conformance.md '
           "(the same code as <code>asl check</code>). The page shows the candidate's run; the oracle's is the "
           "golden trace.</p>"]
    if r.error:
        out.append(f'<p class="finding">{shown(r.error)}</p></section>')
        return "".join(out)
    first = first_decisive(r)
    if first is None:
        out.append("<p>No decision, count or logit differs beyond the tolerances.</p>")
    else:
        where = ", ".join(x for x in (f"layer {first.layer}" if first.layer is not None else "",
                                      f"position {first.position}" if first.position is not None else "",
                                      f"step {first.step}" if first.step is not None else "") if x)
        margin = "" if first.margin is None else f" (margin {first.margin:.3g})"
        out.append(f'<p class="first">First difference: <code id="first-field">{shown(first.field)}</code>'
                   f'{" at " + shown(where) if where else ""}{shown(margin)}</p>'
                   f'<p class="finding" id="first-message">{shown(first.message)}</p>')
        if first.position is not None:
            out.append(f'<p><button type="button" id="goto-focus" data-pos="{int(first.position)}">Show position '
                       f"{int(first.position)} on the prompt</button></p>")
    exp = cv.expected
    if exp is not None and exp["generated_ids"] != got["generated_ids"]:
        out.append(f'<p>Generated by the oracle: <q id="oracle-answer">{shown(text.words(exp["generated_ids"]))}</q>'
                   f' · by the candidate: <q>{shown(text.words(got["generated_ids"]))}</q></p>')
    rest = [f for f in r.findings if f is not first]
    if rest:
        out.append("<details><summary>every finding</summary><ul>" + "".join(
            f"<li><b>{shown(f.verdict)}</b> <code>{shown(f.field)}</code>: {shown(f.message)}</li>" for f in rest)
            + "</ul></details>")
    if r.unchecked:
        out.append("<p class=\"small\">Not checked: " + "; ".join(shown(u) for u in r.unchecked) + "</p>")
    out.append("</section>")
    return "".join(out)


# ---------------------------------------------------------------- the page


def _summary(trace: dict, text: Text) -> str:
    t, p, m, N = trace["totals"], trace["params"], METHOD[trace["method"]], trace["num_prompt_tokens"]
    model = trace["model"]
    sel = trace["select_layer"]
    if m.per_layer:
        pruned = [e["layer"] for e in trace["layers"] if e["kept_tokens"] is not None]
        where = f"none (prunes at every deciding layer: {len(pruned)} did)"
    elif sel is None:
        where = "never fired" if m.decides == "criterion" else "none (nothing selected)"
    else:
        where = f"{sel} · kept {len(trace['kept_positions'])} of {N}"
    used = set(m.uses) | ({"kv_budget"} if p["kv_budget"] is not None else set())
    names = [n for n in (*PARAM_NAMES, *(k for k in p if k not in PARAM_NAMES)) if n in p]
    names.sort(key=lambda n: n not in used)  # the ones the method reads first
    params = " ".join(f'<span class="param{"" if n in used else " unused"}" '
                      f'title="{"read by this method" if n in used else "not read by this method"}">'
                      f'{shown(PARAM_SYMBOL.get(n, n))} = {_num(p[n])}</span>' for n in names)
    flops = t["prefill_flops"] / t["prefill_flops_full"] if t["prefill_flops_full"] else 1.0
    cards = [
        ("model", f"{shown(model['name'])} <span class=\"small\">({shown(model['model_type'])}, "
                  f"{model['num_hidden_layers']} layers, {model['num_attention_heads']} query / "
                  f"{model['num_key_value_heads']} KV heads, {shown(trace['dtype'])})</span>"),
        ("method", f"<b id=\"method\">{shown(trace['method'])}</b>"),
        ("prompt", f"<b id=\"n-tokens\">{N}</b> tokens"),
        ("selection layer", f'<b id="select-layer">{where}</b>'),
        ("KV cache after prefill", f"<b>{100 * t['kv_fraction']:.1f}%</b> of full · {_si(t['kv_bytes'], 'B')} of "
                                   f"{_si(t['kv_bytes_full'], 'B')} · <b>saves {100 * (1 - t['kv_fraction']):.1f}%</b>"
                                   f'<div class="meter"><div style="width:{100 * t["kv_fraction"]:.1f}%"></div></div>'),
        ("prefill work", f"<b>{100 * flops:.1f}%</b> of full · {_si(t['prefill_flops'], 'FLOP')} of "
                         f"{_si(t['prefill_flops_full'], 'FLOP')} · <b>saves {100 * (1 - flops):.1f}%</b>"
                         f'<div class="meter"><div style="width:{100 * flops:.1f}%"></div></div>'),
    ]
    out = ['<section class="cards">'] + [f'<div class="card"><div class="label">{k}</div><div>{v}</div></div>'
                                         for k, v in cards]
    out.append(f'</section><p class="params">parameters: {params}</p>')
    answer = text.words(trace["generated_ids"])
    if trace["generated_ids"]:
        count = len(trace["generated_ids"])
        out.append(f'<p class="answer">Generated ({count} token{"s" if count != 1 else ""}): '
                   f'<q id="answer">{shown(answer)}</q></p>')
    return "".join(out)


def _charts(trace: dict, check: CheckView | None) -> str:
    m, p, N, L = METHOD[trace["method"]], trace["params"], trace["num_prompt_tokens"], len(trace["layers"])
    sel = trace["select_layer"]
    kept = trace["kept_positions"]
    out = ['<section class="charts"><h2>Layer by layer</h2>',
           '<p class="small">Bars: the tokens each layer processed during prefill. Dark bars: the tokens each KV '
           'head kept in its cache, where that is fewer. Hover a bar for its numbers.</p>']
    decided = [e["layer"] for e in trace["layers"] if e["kept_tokens"] is not None] if m.per_layer else []
    if trace["first_pass"] is not None:
        label = f"ℓ = {sel}: {len(kept)} of {N} tokens go on to pass 2"
        out.append(tokens_chart(trace["first_pass"], "Pass 1 (scoring; its cache is thrown away)", N, sel, label))
        out.append(tokens_chart(trace["layers"], f"Pass 2: the {len(kept)} kept tokens at positions 0 … "
                                f"{len(kept) - 1} (the cache decoding uses)", N, None, ""))
    else:
        label = "" if sel is None else f"ℓ* = {sel}" + (
            f": kept all {N} tokens" if len(kept) == N else f": {N} → {len(kept)} tokens" if sel < L - 1 else "")
        title = "Tokens per layer" + (" (▾ a layer that pruned)" if decided else "")
        out.append(tokens_chart(trace["layers"], title, N, sel, label, decided))
    if m.decides == "criterion":
        entries = trace["first_pass"] or trace["layers"]
        fired = None if sel is None or any("never fired" in n for n in trace["notes"]) else sel
        never = "never fired: the ratio stayed at or above τ" + (
            f"; fell back to layer {sel}'s ranks" if trace["first_pass"] is not None and sel is not None else "")
        if not any(e["ratio"] is not None for e in entries):
            why = shown("; ".join(trace["notes"])) or "no layer reached L_min"
            out.append(f'<p class="missing">ASL\'s criterion was never computed here ({why}).</p>')
        else:
            oracle = oracle_fired = None
            if check is not None and check.expected is not None:
                exp = check.expected
                oracle = exp["first_pass"] or exp["layers"]
                oracle_fired = None if exp["select_layer"] is None or any("never fired" in n for n in exp["notes"]) \
                    else exp["select_layer"]
            out.append(criterion_chart(entries, p["tau"], p["l_min"], fired, never, oracle, oracle_fired))
            if oracle:
                out.append('<p class="small">Grey dashed: the oracle\'s ratio.</p>')
    out.append("</section>")
    return "".join(out)


def render_page(trace: dict, arrays: dict, text: Text, source: str = "", check: CheckView | None = None,
                page_tokens: int = PAGE_TOKENS) -> str:
    """The page's HTML for a validated trace (and, with `check`, the check of it against a golden trace)."""
    N = trace["num_prompt_tokens"]
    scored = scored_layers(trace, arrays)
    views = strip_views(trace, arrays, scored)
    if check is not None:
        views = diff_views(check, trace, arrays) + views
    big = N > 65535
    dec = deciding(trace, scored)
    win = window_of(trace)
    data = {
        "n": N,
        "ids": trace["prompt_ids"],
        "pieces": text.pieces,
        "pageSize": int(page_tokens),
        "window": list(win) if win else None,
        "method": trace["method"],
        "heads": trace["model"]["num_key_value_heads"],
        "scored": [{"layer": s.layer, "name": s.name, "count": s.count, "ranked": s.ranked,
                    "deciding": s is dec, "score": _packed(s.score, "f32"),
                    "rank": _packed(s.rank, "u32" if big else "u16")} for s in scored],
        "views": views,
        "snap": snap_layers(trace, arrays),
        "focus": None,
        "default": next((v["key"] for v in views if v["kind"] == "diff"), None) or
        next((v["key"] for v in reversed(views) if v["key"].startswith("kept-")), views[0]["key"]),
        "check": check is not None,
        "hasArrays": bool(arrays),
    }
    if check is not None:
        first = first_decisive(check.result)
        data["focus"] = None if first is None or first.position is None else int(first.position)
        if first is not None and first.layer is not None and not any(v["kind"] == "diff" for v in views):
            data["default"] = next((v["key"] for v in views if v.get("layer") == first.layer), data["default"])
    script = SCRIPT.read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; base-uri 'none'; "
           "form-action 'none'")
    title = f"{trace['method']} on {trace['model']['name']}" + (f" — {check.case}: {check.result.verdict}"
                                                                 if check else "")
    missing = []
    if not arrays:
        missing.append("This trace was saved without its arrays (.npz), so the page cannot show token scores and "
                       "ranks, per-layer top sets, PyramidInfer's per-layer kept sets or which KV head cached which "
                       "token: the strip shows the kept positions the JSON records. Save the run with "
                       "<code>--trace-arrays</code> to see them.")
    elif not scored and METHOD[trace["method"]].decides is not None and trace["select_layer"] is not None:
        missing.append("No scored layer's scores are in the arrays: the strip is not shaded by score.")
    body = [
        f'<header><h1>{shown(title)}</h1><p class="small">{shown(source)}</p></header>',
        check_panel(check, trace, text) if check is not None else "",
        _summary(trace, text),
        '<section class="story"><h2>What happened</h2>' + "".join(f"<p>{s}</p>" for s in what_happened(trace)),
        ("<ul class=\"notes\">" + "".join(f'<li class="note">note: {shown(n)}</li>' for n in trace["notes"]) + "</ul>")
        if trace["notes"] else "",
        "</section>",
        "".join(f'<p class="missing" id="no-arrays">{m}</p>' for m in missing),
        _charts(trace, check),
        _strip_section(trace, text, bool(arrays), check is not None),
    ]
    css = STYLE.read_text(encoding="utf-8")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{shown(title)}</title><style>{css}</style></head><body>{''.join(body)}"
            f'<script type="application/json" id="asl-data">{script_json(data)}</script>'
            f"<script>{script}</script></body></html>\n")


def _strip_section(trace: dict, text: Text, has_arrays: bool, check: bool) -> str:
    N = trace["num_prompt_tokens"]
    legend = ('<span class="key kept">kept</span> <span class="key dropped">dropped</span> '
              '<span class="key win">window (always kept)</span> ')
    if check:
        legend += ('<span class="key only-o">kept only by the oracle</span> '
                   '<span class="key only-c">kept only by the candidate</span> '
                   '<span class="key focus">the first finding\'s position</span>')
    shade = "darker = higher score at that layer" if has_arrays else "not shaded: no scores without the arrays"
    return (f'<section class="prompt"><h2>The prompt, token by token</h2>'
            f'<p class="small">{shown(text.source)}. Highlighted tokens are kept ({shade}); hover a token for its '
            f'score and rank at every scored layer, click to pin it.</p>'
            f'<div class="controls"><label>Show <select id="view"></select></label> '
            f'<span id="view-note" class="small"></span></div>'
            f'<div class="legend">{legend}</div>'
            f'<div class="overview" id="overview" title="the whole prompt: click to go there"></div>'
            f'<div class="pager"><button type="button" id="prev">◀</button> <span id="page-label"></span> '
            f'<button type="button" id="next">▶</button> <label class="small">go to position '
            f'<input id="goto" type="number" min="0" max="{N - 1}" step="1"></label></div>'
            f'<div class="stripwrap"><div class="strip" id="strip" lang="und"></div>'
            f'<aside class="inspector" id="inspector"><p class="small">Hover a token.</p></aside></div></section>')


# ---------------------------------------------------------------- files


def load_check(golden: str | Path, candidate: Path) -> CheckView:
    """The check of one candidate trace: `golden` is a bundle directory (the case is the trace's file name,
    CASE.trace.json) or the expected trace itself."""
    golden = Path(golden)
    case = candidate.name.removesuffix(".json").removesuffix(".trace")
    if golden.is_dir():
        expected = golden / f"{case}.trace.json"
        if not expected.is_file():
            raise OracleError(f"--golden {golden}: no case {case!r} there (no {expected.name}); name the trace as the "
                              "bundle names its case, or pass the expected trace file itself")
    elif golden.is_file():
        expected = golden
    else:
        raise OracleError(f"--golden {golden}: no such bundle directory or trace file")
    result = check_trace(expected, candidate)
    exp, ea = load_trace(expected)
    return CheckView(result, exp, ea, case)


def write_view(trace_path: str | Path, out: str | Path | None = None, golden: str | Path | None = None,
               model: str | None = None) -> Path:
    """`asl view`: the trace's page, written atomically to `out` (default: the trace with suffix .html)."""
    trace_path = Path(trace_path)
    trace, arrays = load_trace(trace_path)
    check = load_check(golden, trace_path) if golden is not None else None
    names = [model, check.expected["model"]["name"] if check and check.expected else None]
    text = prompt_text(trace, [n for n in names if n])
    out = Path(out) if out is not None else trace_path.with_suffix(".html")
    if out.resolve() in (trace_path.resolve(), trace_path.with_suffix(".npz").resolve()):
        raise OracleError(f"-o {out}: that is the trace itself; name the page another file, e.g. "
                          f"{trace_path.with_suffix('.html')}")
    page = render_page(trace, arrays, text, f"trace: {trace_path}" + (f" · golden: {golden}" if golden else ""),
                       check)
    _write(out, page)
    return out


def write_check_pages(results: list[CaseResult], candidate_dir: str | Path, bundle: str | Path,
                      out_dir: str | Path, model: str | None = None) -> Path:
    """`asl check --html DIR`: a page per checked case (the checker's results, not a second check) and
    DIR/index.html listing every verdict."""
    candidate_dir, bundle, out_dir = Path(candidate_dir), Path(bundle), Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OracleError(f"--html {out_dir}: cannot create the directory ({e.strerror or e})") from None
    texts: dict = {}
    rows = []
    for r in results:
        page = None
        if r.verdict not in (ERROR, NOT_CHECKED):
            cand = candidate_dir / f"{r.case}.trace.json"
            trace, arrays = load_trace(cand)
            exp, ea = load_trace(bundle / f"{r.case}.trace.json")
            key = (trace["model"]["name"], exp["model"]["name"], tuple(trace["prompt_ids"]))
            if key not in texts:
                texts[key] = prompt_text(trace, [n for n in (model, exp["model"]["name"]) if n])
            page = f"{r.case}.html"
            html_text = render_page(trace, arrays, texts[key], f"candidate: {cand} · golden: {bundle}",
                                    CheckView(r, exp, ea, r.case))
            _write(out_dir / page, html_text)
        rows.append((r, page))
    cases = {r.case for r in results}
    name = next(n for n in ("index", *(f"index-{i}" for i in range(1, len(cases) + 2))) if n not in cases)
    index = out_dir / f"{name}.html"  # a case named "index" keeps its page
    _write(index, index_page(rows, candidate_dir, bundle))
    return index


def _write(path: Path, text: str) -> None:
    try:
        atomic_write(path, text)
    except OSError as e:
        raise OracleError(f"cannot write the page {path}: {e.strerror or e}") from None


def index_page(rows, candidate_dir: Path, bundle: Path) -> str:
    counts: dict = {}
    for r, _ in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    lines = []
    for r, page in rows:
        first = first_decisive(r)
        what = r.error or ("" if first is None else f"{first.field}: {first.message}")
        cls = {PASS: "pass", NEAR: "near", FAIL: "fail"}.get(r.verdict, "other")
        name = f'<a href="{html.escape(quote(page))}">{shown(r.case)}</a>' if page else shown(r.case)
        lines.append(f'<tr class="{cls}"><td>{name}</td><td class="verdict">{shown(r.verdict)}</td>'
                     f"<td>{shown(what[:400])}</td></tr>")
    css = STYLE.read_text(encoding="utf-8")
    summary = ", ".join(f"{n} {shown(v)}" for v, n in counts.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>asl check: {summary}</title><style>{css}</style></head><body>"
            f"<header><h1>asl check</h1><p class=\"small\">candidate: {shown(candidate_dir)} · golden: "
            f"{shown(bundle)}</p></header><p id=\"summary\">{summary}</p>"
            f'<table class="index"><thead><tr><th>case</th><th>verdict</th><th>first difference, or why not checked'
            f"</th></tr></thead><tbody>{''.join(lines)}</tbody></table></body></html>\n")
