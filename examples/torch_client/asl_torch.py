"""ASL (and full / SnapKV / FastKV) written independently on PyTorch + Hugging Face transformers.

This is the worked example for implementers and a second opinion on the
NumPy reference: nothing here imports reference.asl.scoring / selection /
criterion / methods / model / engine. Every formula is re-derived from
the contract, docs/semantics.md (called SPEC; section numbers in the comments). transformers
supplies the weights and the modules (projections, MLP, embeddings, head);
the layer loop, RMSNorm, rotary angles, attention, scoring, selection,
ASL's criterion, caches and greedy decoding are written here.

    trace, arrays = run_case(model_dir, inputs)      # inputs: a bundle's CASE.inputs.json

The trace itself is written by the implementer's kit (reference.oracle.candidate):
the client hands it only its decisions (cached positions per KV head, scores,
ranks, ASL's criterion values, the selection, logits, generated ids and step
logits), and the kit fills the counts, FLOPs, totals, gaps and notes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from reference.oracle.candidate import (
    CaseInputs,
    LayerDecision,
    build_candidate,
    case_from_inputs,
    model_shape,
)

SUPPORTED = ("full", "snapkv", "fastkv", "asl")
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32"}


# ---------------------------------------------------------------- the model


@functools.lru_cache(maxsize=4)
def load_model(model_dir: str, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


def inverse_frequencies(cfg) -> torch.Tensor:
    """Rotary inverse frequencies in float64 (default and llama3 rope types).

    transformers computes these in float32; in float64 runs that alone would
    move logits by ~1e-7, so they are computed here from the config.
    """
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if not rope:  # older transformers: rope_theta / rope_scaling
        rope = dict(getattr(cfg, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", cfg.rope_theta)
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    base = float(rope["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise NotImplementedError(f"rope_type {kind!r}")
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in the run's dtype (transformers' own upcasts to float32 only)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (x: (heads, n, d), cos/sin: (n, d))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerCache:
    """One layer's cache: per KV head g, the cached positions (S_g,), keys and values (S_g, d)."""

    positions: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class Runner:
    """The layer loop over a transformers model, with per-layer, per-KV-head caches."""

    def __init__(self, model):
        self.model = model
        cfg = self.cfg = model.config
        self.L = cfg.num_hidden_layers
        self.H, self.H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.G = self.H // self.H_kv
        self.d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // self.H
        self.dtype = model.dtype
        self.inv_freq = inverse_frequencies(cfg)

    def angles(self, positions: torch.Tensor):
        a = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]  # (n, d/2)
        a = torch.cat((a, a), dim=-1)  # (n, d)
        return a.cos().to(self.dtype), a.sin().to(self.dtype)

    def qkv(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        """Normed input -> rotated q (H, n, d), k (H_kv, n, d) and v (H_kv, n, d)."""
        attn = self.model.model.layers[layer].self_attn
        h = rms_norm(self.model.model.layers[layer].input_layernorm, x)
        n = x.shape[0]
        q = attn.q_proj(h).view(n, self.H, self.d).transpose(0, 1)
        k = attn.k_proj(h).view(n, self.H_kv, self.d).transpose(0, 1)
        v = attn.v_proj(h).view(n, self.H_kv, self.d).transpose(0, 1)
        cos, sin = self.angles(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, layer: int, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
        """Attention output (H, n, d) -> o_proj, residual, post-norm MLP, residual."""
        block = self.model.model.layers[layer]
        n = x.shape[0]
        x = x + block.self_attn.o_proj(heads_out.transpose(0, 1).reshape(n, self.H * self.d))
        return x + block.mlp(rms_norm(block.post_attention_layernorm, x))

    def prefill_layer(self, layer: int, x: torch.Tensor, positions: torch.Tensor):
        """One layer over n tokens at their (original) positions; key j visible to query i iff pos_j ≤ pos_i."""
        q, k, v = self.qkv(layer, x, positions)
        kh = k.repeat_interleave(self.G, dim=0)  # (H, n, d): head h reads KV head h // G
        vh = v.repeat_interleave(self.G, dim=0)
        logits = q @ kh.transpose(1, 2) / math.sqrt(self.d)  # (H, n, n)
        visible = positions[None, :] <= positions[:, None]  # (n, n) by position
        logits = logits.masked_fill(~visible, float("-inf"))
        out = torch.softmax(logits, dim=-1) @ vh  # (H, n, d)
        return self.finish(layer, x, out), q, k, v

    def decode_layer(self, layer: int, x: torch.Tensor, position: int, cache: LayerCache) -> torch.Tensor:
        """One new token: append its k, v to every KV head's cache and attend over the whole cache."""
        pos = torch.tensor([position])
        q, k, v = self.qkv(layer, x, pos)  # q (H, 1, d)
        outs = []
        for g in range(self.H_kv):
            cache.positions[g] = torch.cat((cache.positions[g], pos))
            cache.keys[g] = torch.cat((cache.keys[g], k[g]))
            cache.values[g] = torch.cat((cache.values[g], v[g]))
            qg = q[g * self.G:(g + 1) * self.G, 0]  # (G, d)
            att = torch.softmax(qg @ cache.keys[g].T / math.sqrt(self.d), dim=-1)  # (G, S_g)
            outs.append(att @ cache.values[g])  # (G, d)
        return self.finish(layer, x, torch.cat(outs)[:, None, :])

    def logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(rms_norm(self.model.model.norm, x_last))  # (V,)

    def embed(self, ids) -> torch.Tensor:
        return self.model.model.embed_tokens(torch.as_tensor(ids, dtype=torch.long))


# ---------------------------------------------------------------- semantics.md §1-2: scores and ranks


def head_scores(q: torch.Tensor, k: torch.Tensor, w: int, G: int, kernel: int, pooling: str) -> torch.Tensor:
    """p[h, j]: pooled attention of the last w queries to prefix token j (SPEC 1, steps 1-4). (H, n-w)."""
    n, d = k.shape[1], k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    qw = q[:, n - w:].to(work)  # (H, w, d)
    kh = k.repeat_interleave(G, dim=0).to(work)  # (H, n, d)
    logits = qw @ kh.transpose(1, 2) / math.sqrt(d)  # (H, w, n)
    query_pos = torch.arange(n - w, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > query_pos, float("-inf"))  # causal inside the window
    u = torch.softmax(logits, dim=-1)[:, :, : n - w].sum(dim=1)  # (H, n-w)
    pad = kernel // 2
    if pooling == "avg":  # zeros as padding, divisor always s
        return F.avg_pool1d(u[:, None, :], kernel, stride=1, padding=pad, count_include_pad=True)[:, 0]
    if pooling == "max":  # padding is -inf: never wins
        return F.max_pool1d(u[:, None, :], kernel, stride=1, padding=pad)[:, 0]
    raise ValueError(f"pooling must be avg or max, got {pooling!r}")


def order(score: torch.Tensor) -> torch.Tensor:
    """Indices from the highest score down; equal scores: earlier index first (stable sort)."""
    return torch.sort(-score, stable=True).indices


def ranks_of(score: torch.Tensor) -> torch.Tensor:
    r = torch.empty(len(score), dtype=torch.int64)
    r[order(score)] = torch.arange(1, len(score) + 1)
    return r


def best(score: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(order(score)[:count]).values


# ---------------------------------------------------------------- semantics.md §3: the criterion


def rank_variance(window_ranks: list[torch.Tensor], k_prime: int) -> tuple[int, Fraction]:
    """(|U|, v) exactly: v = mean over layers and union tokens of (r - μ_j)²."""
    R = torch.stack(window_ranks)  # (L_obs, n-w)
    U = (R <= k_prime).any(dim=0)
    m = R.shape[0]
    RU = [[int(x) for x in row] for row in R[:, U].T.tolist()]  # per union token: its L_obs ranks
    numerator = sum(m * sum(r * r for r in rs) - sum(rs) ** 2 for rs in RU)  # = m² · |U| · v, an exact integer
    return len(RU), Fraction(numerator, m * m * len(RU))


# ---------------------------------------------------------------- prefill + decode


@dataclass
class Layer:
    """What one layer decided: the kit (reference.oracle.candidate.LayerDecision) takes these fields."""

    kv_positions: list = field(default_factory=list)  # per KV head: cached (original) positions
    scores: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    union_size: int | None = None
    v: float | None = None
    ratio: float | None = None
    kv_scores: torch.Tensor | None = None  # SnapKV's score_g (H_kv, n-w), where it decided


def prefill(r: Runner, ids: list[int], method: str, p: dict):
    N, w, k = len(ids), p["window"], p["select_k"]
    B = p.get("kv_budget")
    run = method
    if method != "full" and N <= w:
        run = "full"  # no token can be scored
    k_prime = min(k - w, N - w)
    first_scored = {"fastkv": p["select_layer"], "asl": p["l_min"] - p["l_obs"] + 1}.get(run, r.L)
    positions = torch.arange(N)
    x = r.embed(ids)
    records, caches, history = [], [], []
    v0 = None
    select_layer = kept = None
    for layer in range(r.L):
        n = len(positions)
        x_next, q, kk, vv = r.prefill_layer(layer, x, positions)
        rec = Layer()
        p_heads = None
        if select_layer is None and layer >= first_scored:
            p_heads = head_scores(q, kk, w, r.G, p["kernel"], p["pooling"])
            score = p_heads.sum(dim=0)  # (n-w,): every query head
            rank = ranks_of(score)
            rec.scores, rec.ranks = score, rank
            decide = run == "fastkv" and layer == p["select_layer"]
            if run == "asl":
                history.append(rank)
                if layer >= p["l_min"]:
                    size, v = rank_variance(history[-p["l_obs"]:], k_prime)
                    if layer == p["l_min"]:
                        v0 = v
                    ratio = (Fraction(0) if v == 0 else math.inf) if v0 == 0 else v / v0
                    rec.union_size, rec.v = size, float(v)
                    rec.ratio = math.inf if ratio == math.inf else float(ratio)
                    decide = ratio != math.inf and ratio < Fraction(p["tau"])
            if decide:
                select_layer = layer
                top = torch.nonzero(rank <= k_prime).flatten()  # top(k'), ascending
                kept = torch.cat((top, torch.arange(n - w, n)))
        # the cache: all n tokens, or SnapKV's per-KV-head subset (SPEC 5)
        rows = [torch.arange(n)] * r.H_kv
        if B is not None and n > B:
            if p_heads is None:
                p_heads = head_scores(q, kk, w, r.G, p["kernel"], p["pooling"])
            score_g = p_heads.view(r.H_kv, r.G, -1).sum(dim=1)  # (H_kv, n-w)
            rows = [torch.cat((best(s, B - w), torch.arange(n - w, n))) for s in score_g]
            rec.kv_scores = score_g
        cache = LayerCache([positions[i] for i in rows], [kk[g, i] for g, i in enumerate(rows)],
                           [vv[g, i] for g, i in enumerate(rows)])
        rec.kv_positions = [c.clone() for c in cache.positions]
        records.append(rec)
        caches.append(cache)
        x = x_next
        if select_layer == layer:  # one shot: kept tokens go on at their original positions
            x, positions = x[kept], positions[kept]
    logits = r.logits(x[-1])
    return logits, caches, records, select_layer, kept


def greedy(logits: torch.Tensor) -> int:
    """Arg-max, lowest id on exact ties."""
    return int(torch.nonzero(logits == logits.max())[0, 0])


# ---------------------------------------------------------------- the trace, by the kit


def run_case(model_dir, inputs: dict | CaseInputs, dtype: torch.dtype = torch.float64):
    """Run one bundle case (CASE.inputs.json as a dict, or reference.oracle.candidate.read_case's result)
    -> (trace dict, arrays) as docs/trace.md defines them, built by the kit from this run's decisions."""
    case = inputs if isinstance(inputs, CaseInputs) else case_from_inputs(inputs)
    method, p = case.method, dict(case.params)
    if method not in SUPPORTED:
        raise NotImplementedError(f"method {method!r} (this client runs {', '.join(SUPPORTED)})")
    model = load_model(str(Path(model_dir)), dtype)
    r = Runner(model)
    ids = list(case.prompt_ids)
    N = len(ids)
    eos = set(case.eos_token_ids)
    with torch.no_grad():
        logits, caches, records, select_layer, kept = prefill(r, ids, method, p)
        generated, steps = [], []
        step_logits, position = logits, N
        for _ in range(case.max_new_tokens):
            token = greedy(step_logits)
            generated.append(token)
            steps.append(step_logits.numpy())
            if token in eos or len(generated) == case.max_new_tokens:
                break
            x = r.embed([token])
            for layer in range(r.L):
                x = r.decode_layer(layer, x, position, caches[layer])
            step_logits, position = r.logits(x[-1]), position + 1

    layers = [LayerDecision(kv_positions=[pp.numpy() for pp in rec.kv_positions],
                            kv_scores=None if rec.kv_scores is None else list(rec.kv_scores.numpy()),
                            scores=None if rec.scores is None else rec.scores.numpy(),
                            ranks=None if rec.ranks is None else rec.ranks.numpy(),
                            union_size=rec.union_size, v=rec.v, ratio=rec.ratio) for rec in records]
    return build_candidate(case, model_shape(r.cfg), layers=layers, logits=logits.numpy(), generated_ids=generated,
                           step_logits=steps, select_layer=select_layer,
                           kept_positions=None if kept is None else kept.numpy(), dtype=DTYPE_NAMES[dtype])


if __name__ == "__main__":  # python examples/torch_client/asl_torch.py BUNDLE OUT_DIR [float32|float64]
    import sys

    from reference.oracle.candidate import read_cases, write_candidate

    bundle, out = Path(sys.argv[1]), Path(sys.argv[2])
    dt = {"float32": torch.float32, "float64": torch.float64}[sys.argv[3] if len(sys.argv) > 3 else "float64"]
    for case in read_cases(bundle):
        try:
            t, a = run_case(case.model_dir(), case, dt)
        except NotImplementedError as e:
            print(f"{case.name}: skipped ({e})")
            continue
        write_candidate(out, case, t, a)
        print(f"{case.name}: written")
