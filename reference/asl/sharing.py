"""Many methods, one prefill: the layers every method shares are computed once per prompt (issue 25).

Every method starts with the same layers: SnapKV's hidden states are the full run's at every layer (it
trims caches only), FastKV's through ℓ_f, ASL's through ℓ*, GemFilter's and two-pass ASL's first passes are
a prefix of the full run, PyramidInfer shares the layers before its first pruning. `SharedPrefill` is an
Engine around an engine: inside `with shared.sharing(ids):` it remembers the unpruned pass of that prompt,
layer by layer, and answers a layer from memory while the method's input is still that unpruned state.
`methods.py` does not know: each method runs its own loop, its own scoring, selections, second pass, caches
and decoding, and gets the numbers it would have computed itself, bit for bit.

The unpruned state, exactly: `layer(i, x, positions, q_rows)` is answered from memory when x *is* (by
identity) the array this wrapper handed out for layer i - 1 (for i = 0: `embed` of the prompt's ids) and
positions are 0 .. N-1. A pruned x (`select_rows` makes a new array), a second pass (other ids), the layers
after the memory bound: all go to the engine. What is remembered per layer:

- the hidden states the layer leaves (N, D);
- the layer's cache as the engine left it; a method gets `engine.copy_cache(cache)`, which it may take
  over (`compress` compacts the port's in place, `decode` appends past its length): the reference's
  caches are never written in place, so its copy is the cache itself; the port's is a real copy;
- the rotated queries of the widest window asked for so far, at least the last QUERY_ROWS (H, r, hd): a
  narrower window is its last rows (the engines slice one computation of every row's queries, so the values
  are the same); a wider request (PyramidInfer's R + 1 rows) runs the layer again and widens what is kept.

Memory is bounded: `bound_bytes`, by default half the memory available when `sharing` starts (the
host's, or the GPU's free memory and its pool's for CuPy). Where the next layer would pass the bound,
remembering stops (the layers kept are still shared, the later ones recomputed by each method), with one
line saying so; an out-of-memory error while the layers are held drops them and runs the layer again.
Scoring, compress, positions, select_rows, logits and decode pass straight through to the engine.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass

import numpy as np

MEMORY_FRACTION = 0.5  # of the memory available when sharing starts: the most the remembered layers may hold
QUERY_ROWS = 64  # queries kept per layer at least (the default window w is 32), so that GemFilter's one row, asked
# for first, does not make the next method's window run the layer again


def held_bytes(*objs) -> int:
    """Bytes of the arrays in objs (tuples, lists, dataclasses of arrays, nested), each array counted once."""
    seen, total, stack = set(), 0, list(objs)
    while stack:
        obj = stack.pop()
        if isinstance(obj, (tuple, list)):
            stack.extend(obj)
        elif is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in fields(obj))
        elif hasattr(obj, "nbytes") and hasattr(obj, "shape") and id(obj) not in seen:
            seen.add(id(obj))
            total += int(obj.nbytes)
    return total


def available_bytes(engine) -> int:
    """Memory free for the engine's arrays now: the GPU's (free plus CuPy's pool) for CuPy, else the host's."""
    xp = getattr(engine, "xp", np)
    if xp is not np and hasattr(xp, "cuda"):  # CuPy (the tests' CPU stand-in has no `cuda`: host memory)
        free, _ = xp.cuda.runtime.memGetInfo()
        return int(free) + int(xp.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


@dataclass
class _Memo:
    """The unpruned pass of one prompt, as far as it has run (and fits)."""

    ids: np.ndarray
    positions: np.ndarray  # 0 .. N-1
    bound: int  # bytes it may hold
    xs: list = field(default_factory=list)  # xs[0]: embed(ids); xs[i + 1]: the hidden states layer i leaves
    caches: list = field(default_factory=list)  # layer i's cache, as the engine left it (handed out as copies)
    queries: list = field(default_factory=list)  # layer i's rotated queries, the widest window asked for (H, r, hd)
    seconds: list = field(default_factory=list)  # how long layer i took when the engine ran it
    held: int = 0  # bytes of all of the above
    full: bool = False  # the bound was reached: nothing more is remembered for this prompt


class SharedPrefill:
    """An Engine that computes each unpruned layer of a prompt once for every method run on it (module docstring).

        shared = SharedPrefill(engine)
        with shared.sharing(ids):
            for method in methods:
                generate(shared, ids, n, eos, method=method, params=params)

    Outside `sharing`, or on an engine without `copy_cache`, it is the engine itself."""

    def __init__(self, engine, bound_bytes: int | None = None, say=None):
        self.engine = engine
        self.config = engine.config
        self.bound_bytes = bound_bytes  # None: MEMORY_FRACTION of the memory available when sharing starts
        self.say = say or (lambda line: print(f"asl: {line}", file=sys.stderr))
        self.layers_served = 0  # layers answered from memory
        self.layers_computed = 0  # layers the engine ran on the unpruned pass (each once, but for wider windows)
        self.reused_seconds = 0.0  # the time the served layers took when they ran: what their methods saved
        self._memo: _Memo | None = None
        self._told = False  # the fallback line is said once per wrapper

    def __getattr__(self, name):  # scoring, compress, positions, select_rows, all_finite, logits, decode, ...
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    @contextmanager
    def sharing(self, ids):
        """Remember the unpruned layers of the prompt `ids` inside the block; forget them when it ends."""
        copy = getattr(self.engine, "copy_cache", None)
        if copy is None:  # the engine cannot say how a cache is handed to a second owner: share nothing
            yield self
            return
        ids = np.array(ids, dtype=np.int64)
        bound = self.bound_bytes
        if bound is None:
            bound = int(MEMORY_FRACTION * available_bytes(self.engine))
        outer, self._memo = self._memo, _Memo(ids, np.arange(len(ids), dtype=np.int64), bound)
        try:
            yield self
        finally:
            self._memo = outer

    @property
    def remembered_bytes(self) -> int:
        """What the remembered layers of the current prompt hold now (0 outside `sharing`)."""
        return self._memo.held if self._memo is not None else 0

    def embed(self, ids):
        memo = self._memo
        if memo is None or len(ids) != len(memo.ids) or not np.array_equal(ids, memo.ids):
            return self.engine.embed(ids)
        if not memo.xs:
            x = self._run(self.engine.embed, ids)
            if not self._keep(memo, x):
                return x
            memo.xs.append(x)
        return memo.xs[0]

    def layer(self, i: int, x, positions: np.ndarray, q_rows: int):
        memo = self._memo
        if (memo is None or i >= len(memo.xs) or x is not memo.xs[i] or len(positions) != len(memo.positions)
                or not np.array_equal(positions, memo.positions)):
            return self.engine.layer(i, x, positions, q_rows)  # not the unpruned pass of the prompt
        if i + 1 < len(memo.xs):  # remembered
            if memo.queries[i].shape[1] >= q_rows:
                self.layers_served += 1
                self.reused_seconds += memo.seconds[i]
                x, cache, q = memo.xs[i + 1], memo.caches[i], memo.queries[i][:, -q_rows:].copy()
                return x, self._hand_out(memo, cache), q
            _, cache, q = self._run(self.engine.layer, i, x, positions, q_rows)  # a wider window: widen
            self.layers_computed += 1
            wide = q.copy()
            more = held_bytes(wide) - held_bytes(memo.queries[i])
            if self._memo is memo and not memo.full and memo.held + more <= memo.bound:
                memo.queries[i], memo.held = wide, memo.held + more
            return memo.xs[i + 1], cache, q
        rows = max(q_rows, min(QUERY_ROWS, len(positions)))
        start = time.perf_counter()
        new_x, cache, q = self._run(self.engine.layer, i, x, positions, rows)
        seconds = time.perf_counter() - start
        self.layers_computed += 1
        if self._memo is not memo:  # dropped for memory while it ran
            return new_x, cache, q[:, -q_rows:]
        kept = q.copy()  # these rows only, not a view that holds every row's queries
        if not self._keep(memo, new_x, cache, kept):
            return new_x, cache, q[:, -q_rows:]
        memo.xs.append(new_x)
        memo.caches.append(cache)
        memo.queries.append(kept)
        memo.seconds.append(seconds)
        return new_x, self._hand_out(memo, cache), q[:, -q_rows:]

    def _hand_out(self, memo: _Memo, cache):
        """A remembered cache as a method may take it over: a copy (the reference's: itself). With no memory for
        the copy, the layers are forgotten and the cache is the method's own."""
        try:
            return self.engine.copy_cache(cache)
        except MemoryError:
            self._drop(memo)
            return cache

    # ------------------------------------------------------------ memory

    def _keep(self, memo: _Memo, *arrays) -> bool:
        """Count the arrays into the memo's bytes, or refuse them (and what follows) past the bound."""
        if memo.full:
            return False
        more = held_bytes(*arrays)
        if memo.held + more <= memo.bound:
            memo.held += more
            return True
        memo.full = True
        layers = max(len(memo.xs) - 1, 0)
        self._tell(f"sharing the unpruned layers of a {len(memo.ids)}-token prompt: the next layer would pass the "
                   f"bound of {_size(memo.bound)} ({_size(memo.held)} held); {layers} of "
                   f"{self.config.num_hidden_layers} layers are shared, each method recomputes the rest")
        return False

    def _run(self, work, *args):
        """work(*args); an out-of-memory error while layers are held drops them and runs it again."""
        try:
            return work(*args)
        except MemoryError:
            if self._memo is None or not self._memo.held:
                raise
            self._drop(self._memo)
            return work(*args)

    def _drop(self, memo: _Memo) -> None:
        """Out of memory: forget every remembered layer of this prompt (the methods recompute theirs), with one line."""
        self._tell(f"sharing the unpruned layers of a {len(memo.ids)}-token prompt: out of memory with "
                   f"{_size(memo.held)} held; dropped them, each method recomputes its layers")
        memo.xs, memo.caches, memo.queries, memo.seconds, memo.held, memo.full = [], [], [], [], 0, True
        self._memo = None

    def _tell(self, line: str) -> None:
        if not self._told:
            self._told = True
            self.say(line)
