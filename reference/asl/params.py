"""The methods as data, and their parameters (SPEC's table) with defaults and range checks.

`METHOD[name]` says, for each method, the parameters it reads, how it decides
(nothing, a fixed layer, ASL's criterion, or GemFilter's last query), whether it
runs a second pass, and its first scored layer: every other module reads this
table instead of testing method names. A parameter is checked only when the
chosen method uses it; a value out of its range is an OracleError that names
the parameter and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from reference.errors import OracleError

POOLINGS = ("avg", "max")
GEMFILTER_KERNEL = 5  # GemFilter's own pooling width, not the `kernel` parameter
WINDOW_SCORING = ("window", "kernel", "pooling")  # what scoring by the last w queries reads
ASL = ("select_k", "tau", "l_min", "l_obs")
# PyramidInfer's parameters, under the authors' config keys (configs/llama3.1_8b.json), plus the oracle's switch
PYRAMID_PREFILL = ("recent_ratio", "prefill_decay_ratio", "prefill_decay_strategy", "min_context_length",
                   "layerwise_downsample_interval", "streamingllm_sink_len", "distance_weight")
PYRAMID_GEN = ("gen_decay_ratio", "gen_decay_strategy", "gen_compress_ratio", "exceed_length_to_compress",
               "gen_compress")
PYRAMID = PYRAMID_PREFILL + PYRAMID_GEN
STRATEGIES = ("cosine", "linear")  # "linear" runs as the constant ratio, as in the authors' code (pyramid.schedule)


@dataclass(frozen=True)
class Method:
    """One row of the methods table (docs/semantics.md §3-6b)."""

    name: str
    uses: tuple[str, ...]  # parameters it reads (kv_budget: any method, when set)
    decides: str | None  # None (no selection), "fixed" (FastKV's ℓ_f), "criterion" (ASL), "last-query" (GemFilter),
    # "pyramid" (PyramidInfer: a kept set at every deciding layer)
    two_pass: bool  # the kept ids are run again from scratch at fresh positions
    needs_budget: bool = False  # SnapKV alone: a method only when B is given

    @property
    def selects(self) -> bool:
        """It makes one selection at one layer (select_layer, kept_positions); PyramidInfer prunes per layer."""
        return self.decides not in (None, "pyramid")

    @property
    def per_layer(self) -> bool:
        """Its kept set shrinks at every deciding layer (PyramidInfer)."""
        return self.decides == "pyramid"

    @property
    def scores(self) -> bool:
        """It scores tokens (to select, or for SnapKV's caches); with N ≤ w nothing can be scored."""
        return self.decides is not None or self.needs_budget

    def first_scored(self, p: "Params", n_layers: int) -> int:
        """The first layer whose tokens are scored for the selection (n_layers: never)."""
        return {"fixed": p.select_layer, "criterion": p.l_min - p.l_obs + 1,
                "last-query": p.filter_layer, "pyramid": 0}.get(self.decides, n_layers)

    @property
    def window_scored(self) -> bool:
        """It scores with w from the parameters (docs/semantics.md §1; GemFilter too), so a prompt of N ≤ w tokens
        runs as full. PyramidInfer's window is its own (int(N · recent_ratio) + 1)."""
        return self.scores and not self.per_layer


METHOD = {m.name: m for m in (
    Method("full", (), None, False),
    Method("snapkv", WINDOW_SCORING, None, False, needs_budget=True),
    Method("fastkv", WINDOW_SCORING + ("select_k", "select_layer"), "fixed", False),
    Method("gemfilter", ("select_k", "filter_layer"), "last-query", True),
    Method("asl", WINDOW_SCORING + ASL, "criterion", False),
    Method("asl-2pass", WINDOW_SCORING + ASL, "criterion", True),
    Method("pyramidinfer", PYRAMID, "pyramid", False),
)}
METHODS = tuple(METHOD)


@dataclass(frozen=True)
class Params:
    """SPEC's parameters; names as on the command line (with dashes) and in traces."""

    window: int = 32  # w: trailing prompt tokens whose queries score the rest; always kept
    kernel: int = 7  # s: width of the pooling over token scores (odd)
    pooling: str = "avg"  # "avg" (zero padded, divisor s) or "max"
    select_k: int = 2048  # k: tokens propagated past the selection layer, window included
    tau: float = 0.3  # τ: threshold on the relative rank variance
    l_min: int = 10  # L_min: first layer at which ASL may decide
    l_obs: int = 8  # L_obs: most recent layers whose ranks are compared
    kv_budget: int | None = None  # B: per-layer, per-KV-head cache size after prefill (SnapKV)
    select_layer: int = 15  # ℓ_f: FastKV's fixed selection layer
    filter_layer: int = 13  # ℓ_g: GemFilter's fixed filter layer
    # PyramidInfer (the authors' configs/llama3.1_8b.json); docs/semantics.md, "PyramidInfer"
    recent_ratio: float = 0.2  # R = int(N · recent_ratio); the last R + 1 tokens are the window
    prefill_decay_ratio: float = 0.9  # d of the prefill schedule r(i)
    prefill_decay_strategy: str = "cosine"  # "cosine", or "linear" (= the constant d, as their code runs it)
    min_context_length: int = 64  # no pruning while the context is not longer than min(this, N - 1 - R)
    layerwise_downsample_interval: int = 1  # layers i with i % interval == 0 decide
    streamingllm_sink_len: int = 4  # the first context tokens, always kept
    distance_weight: float = 1.2  # window rows weighted by linspace(1, distance_weight, R + 1)
    gen_decay_ratio: float = 0.1  # d of the decoding schedule g(i)
    gen_decay_strategy: str = "cosine"
    gen_compress_ratio: float = 0.9  # of E scored cache entries, int(E · this · g(i)) (at least 1) stay
    exceed_length_to_compress: int = 16  # E
    gen_compress: bool = True  # the decode stage compresses (False: a prefill-only PyramidInfer)

    def to_dict(self, method: str | None = None) -> dict:
        """The parameters a trace records: the ten of SPEC's table, plus PyramidInfer's for that method."""
        d = asdict(self)
        return d if method == "pyramidinfer" else {k: v for k, v in d.items() if k not in PYRAMID}


def _fail(name: str, allowed: str, got) -> OracleError:
    return OracleError(f"parameter {name.replace('_', '-')} must be {allowed}, got {got!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_params(method: str, p: Params, n_layers: int) -> None:
    """Refuse a method or parameter value outside SPEC's ranges, naming it.

    Checked: the parameters the method reads, plus w, s and pooling whenever
    B is set (SnapKV scores with them under every method).
    """
    if method not in METHODS:
        raise OracleError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if METHOD[method].decides == "pyramid":
        if p.kv_budget is not None:
            raise OracleError("parameter kv-budget does not combine with pyramidinfer: it compresses its own "
                              "caches (layer by layer in prefill, slice by slice in decoding); drop --kv-budget")
        check_pyramid(p)
    if METHOD[method].needs_budget and p.kv_budget is None:
        raise OracleError("method snapkv needs --kv-budget B (the per-layer, per-KV-head cache size)")
    used = set(METHOD[method].uses) | (set(WINDOW_SCORING) | {"kv_budget"} if p.kv_budget is not None else set())
    for name in ("window", "kernel", "select_k", "l_min", "l_obs", "select_layer", "filter_layer", "kv_budget"):
        if name in used and not _is_int(getattr(p, name)):
            raise _fail(name, "an integer", getattr(p, name))
    if "window" in used and p.window < 1:
        raise _fail("window", "≥ 1", p.window)
    if "kernel" in used and (p.kernel < 1 or p.kernel % 2 == 0):
        raise _fail("kernel", "odd and ≥ 1", p.kernel)
    if "pooling" in used and p.pooling not in POOLINGS:
        raise _fail("pooling", f"one of {', '.join(POOLINGS)}", p.pooling)
    if "select_k" in used:
        if "window" in METHOD[method].uses and p.select_k <= p.window:
            raise _fail("select_k", f"> window ({p.window})", p.select_k)
        if p.select_k < 1:
            raise _fail("select_k", "≥ 1", p.select_k)
    if "l_min" in used and not 1 <= p.l_min < n_layers:
        raise _fail("l_min", f"in [1, {n_layers}) (L_min ≥ 1 leaves room for 2 observed layers; L_min < L = {n_layers})", p.l_min)
    if "l_obs" in used and not 2 <= p.l_obs <= p.l_min + 1:
        raise _fail("l_obs", f"in [2, l-min + 1 = {p.l_min + 1}] (one layer has no variance)", p.l_obs)
    if "tau" in used and not (isinstance(p.tau, (int, float)) and not isinstance(p.tau, bool) and p.tau > 0
                              and math.isfinite(p.tau)):
        raise _fail("tau", "a finite number > 0", p.tau)
    for name in ("select_layer", "filter_layer"):
        if name in used and not 0 <= getattr(p, name) < n_layers:
            raise _fail(name, f"in [0, {n_layers}) (the model's layers)", getattr(p, name))
    if "kv_budget" in used and p.kv_budget <= p.window:
        raise _fail("kv_budget", f"> window ({p.window})", p.kv_budget)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_pyramid(p: Params) -> None:
    """PyramidInfer's ranges; each refusal names the parameter (with the command line's dashes) and its range."""
    ranges = {  # name: (test, allowed)
        "recent_ratio": (lambda x: _number(x) and 0 <= x < 1, "a number in [0, 1) (1 or more leaves no context)"),
        "prefill_decay_ratio": (lambda x: _number(x) and 0 <= x <= 1, "a number in [0, 1]"),
        "gen_decay_ratio": (lambda x: _number(x) and 0 <= x <= 1, "a number in [0, 1]"),
        "gen_compress_ratio": (lambda x: _number(x) and 0 < x <= 1, "a number in (0, 1]"),
        "distance_weight": (lambda x: _number(x) and x > 0, "a finite number > 0"),
        "prefill_decay_strategy": (lambda x: x in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        "gen_decay_strategy": (lambda x: x in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        "min_context_length": (lambda x: _is_int(x) and x >= 0, "an integer ≥ 0"),
        "layerwise_downsample_interval": (lambda x: _is_int(x) and x >= 1, "an integer ≥ 1"),
        "streamingllm_sink_len": (lambda x: _is_int(x) and x >= 0, "an integer ≥ 0"),
        "exceed_length_to_compress": (lambda x: _is_int(x) and x >= 1, "an integer ≥ 1"),
        "gen_compress": (lambda x: isinstance(x, bool), "true or false"),
    }
    for name in PYRAMID:
        test, allowed = ranges[name]
        if not test(getattr(p, name)):
            raise _fail(name, allowed, getattr(p, name))


# The authors' settings (the defaults above) with k sized for ~1K-token prompts: what the demo, the SmolLM2
# bundles, tests and benchmarks use on SmolLM2, whose retrieval is reliable only up to about 1K tokens.
SMOLLM2_PARAMS = Params(select_k=256)
