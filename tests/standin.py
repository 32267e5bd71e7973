"""A CPU stand-in for CuPy: NumPy wrapped so that it keeps the rules a device keeps.

The port (gpu/) has only run on NumPy, where a host array and a "device" array
are the same thing, so a host/device mistake costs nothing and goes unseen.
`standin()` returns an array module whose arrays behave as CuPy's do:

- `np.asarray(a)` / `a.__array__()` raise TypeError (CuPy's do: a device array
  reaches the host only by `.get()`);
- a host `np.ndarray` among a device operation's operands (`a + host`,
  `xp.maximum(a, host)`, `where=host`, `a[...] = host`) raises TypeError; NumPy
  scalars and host index arrays are accepted, as CuPy accepts them;
- reductions return 0-d device arrays, not NumPy scalars, so a `float()`,
  `bool()` or `int()` of one is a device-to-host copy, and is counted
  (`xp.syncs`) with every `.get()`;
- elementwise results and reductions in float32 are flushed to zero below
  2^-126, as CuPy's kernels (compiled with -ftz=true) flush them; matmul
  results are not (cuBLAS);
- it counts what would be slow on CuPy: matmuls with an operand of more than two
  dimensions (CuPy's batched path: FP32 compute, no tensor cores),
  float16-output matmuls (overflow above 65504), and einsum calls (`xp.calls`).

Host-to-device copies (`xp.asarray(host)`) are free and uncounted: CuPy makes
them asynchronously through pinned memory. Everything else is NumPy, so
results match the NumPy backend's to rounding.
"""

from __future__ import annotations

import collections
import functools
import operator

import numpy as np

TINY32 = np.float32(np.finfo(np.float32).tiny)  # 2^-126: below it CuPy's float32 kernels give 0
HOST_ONLY = ("asarray", "array", "ascontiguousarray")  # the ways onto the device: host arrays welcome


def _to_host(kind: str, convert):
    """A StandinArray method that copies to the host: the stand-in counts it as one sync of `kind`."""

    def method(self):
        self._xp._sync(kind)
        return convert(self._a)

    method.__name__ = kind
    return method


class StandinArray:
    """A device array: a NumPy array only the stand-in's functions may read."""

    __slots__ = ("_a", "_xp")
    __array_priority__ = 1000

    def __init__(self, a: np.ndarray, xp: Standin):
        self._a, self._xp = a, xp

    # --- the host boundary: every way out is counted, the implicit ones refused
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (stand-in for CuPy): use .get()")

    def get(self) -> np.ndarray:
        self._xp._sync("get")
        return self._a.copy()

    # each a device-to-host copy, counted under its name
    item = _to_host("item", lambda a: a.item())
    tolist = _to_host("tolist", lambda a: a.tolist())
    __float__ = _to_host("float", float)
    __int__ = _to_host("int", int)
    __index__ = _to_host("index", lambda a: a.__index__())
    __bool__ = _to_host("bool", bool)

    def __repr__(self):
        return f"StandinArray(shape={self._a.shape}, dtype={self._a.dtype})"

    # --- NumPy's own functions called on a device array go to the stand-in's (CuPy implements both protocols)
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            return NotImplemented
        return getattr(self._xp, ufunc.__name__)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return getattr(self._xp, func.__name__)(*args, **kwargs)

    # --- attributes: metadata as they are, methods and views wrapped
    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__, __array_struct__, buffer: NumPy may not read it
            raise AttributeError(name)
        value = getattr(self._a, name)
        if callable(value):
            return self._xp._wrap_function(value, name)
        return self._xp._wrap(value) if isinstance(value, np.ndarray) else value

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self._xp._wrap(row) for row in self._a)

    def __getitem__(self, index):
        return self._xp._wrap(self._a[self._xp._unwrap_index(index)])

    def __setitem__(self, index, value):
        self._a[self._xp._unwrap_index(index)] = self._xp._unwrap(value, "assignment")  # a copy: nothing flushed

    def __matmul__(self, other):
        return self._xp.matmul(self, other)

    def __rmatmul__(self, other):
        return self._xp.matmul(other, self)

    def __imatmul__(self, other):
        return NotImplemented


def _binary(name: str, reflected: bool = False, inplace: bool = False):
    op = getattr(operator, f"i{name.rstrip('_')}" if inplace else name)

    def method(self, other):
        xp = self._xp
        other_a = xp._unwrap(other, f"the operator {name.strip('_')}")
        if inplace:
            op(self._a, other_a)
            xp._flush(self._a)
            return self
        return xp._result(op(other_a, self._a) if reflected else op(self._a, other_a))

    return method


_OPERATORS = {"add": "add", "sub": "sub", "mul": "mul", "truediv": "truediv", "floordiv": "floordiv", "mod": "mod",
              "pow": "pow", "and": "and_", "or": "or_", "xor": "xor"}
for _dunder, _name in _OPERATORS.items():
    setattr(StandinArray, f"__{_dunder}__", _binary(_name))
    setattr(StandinArray, f"__r{_dunder}__", _binary(_name, reflected=True))
    setattr(StandinArray, f"__i{_dunder}__", _binary(_name, inplace=True))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(StandinArray, f"__{_name}__", _binary(_name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(StandinArray, f"__{_name}__", (lambda op: lambda self: self._xp._result(op(self._a)))(getattr(operator, _name)))
StandinArray.__hash__ = None


class _Random:
    """xp.random: NumPy's generators, their arrays made on the device."""

    def __init__(self, xp: Standin):
        self._xp = xp

    def default_rng(self, seed=None):
        xp, rng = self._xp, np.random.default_rng(seed)

        class Generator:
            def __getattr__(self, name):
                return xp._wrap_function(getattr(rng, name), name)

        return Generator()


class Standin:
    """The array module. `syncs` counts device-to-host copies; `calls` what would be slow on CuPy."""

    __name__ = "standin"
    ndarray = StandinArray

    def __init__(self, ftz: bool = True):
        self.ftz = ftz
        self.syncs = 0
        self.sync_kinds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.random = _Random(self)

    def reset(self) -> None:
        self.syncs = 0
        self.sync_kinds.clear()
        self.calls.clear()

    def _sync(self, kind: str) -> None:
        self.syncs += 1
        self.sync_kinds[kind] += 1

    # --- wrapping
    def _wrap(self, a):
        return StandinArray(a, self)

    def _result(self, r):
        """A NumPy result as the device's: arrays and NumPy scalars (reductions) become device arrays."""
        if isinstance(r, (tuple, list)):  # np.split's list, np.nonzero's tuple
            return type(r)(self._result(x) for x in r)
        if isinstance(r, (np.ndarray, np.generic)):
            a = np.asarray(r) if isinstance(r, np.generic) else r
            self._flush(a)
            return self._wrap(a)
        return r

    def _flush(self, a: np.ndarray) -> None:
        if self.ftz and a.dtype == np.float32 and a.size:
            if a.ndim == 0:
                if abs(a[()]) < TINY32 and a.flags.writeable:
                    a[()] = 0
                return
            a[np.abs(a) < TINY32] = 0

    def _unwrap(self, x, where: str):
        if isinstance(x, StandinArray):
            return x._a
        if isinstance(x, np.ndarray):
            raise TypeError(f"Unsupported type {type(x)} in {where} (stand-in for CuPy: a host array on the device); "
                            f"copy it over with xp.asarray first")
        if isinstance(x, (list, tuple)):
            return type(x)(self._unwrap(v, where) for v in x)
        return x

    def _unwrap_index(self, index):
        if isinstance(index, tuple):
            return tuple(self._unwrap_index(i) for i in index)
        if isinstance(index, StandinArray):
            return index._a
        return index  # ints, slices, Ellipsis, None and host index arrays (CuPy copies those over)

    def _wrap_function(self, func, name: str):
        @functools.wraps(func)
        def call(*args, **kwargs):
            self.calls[name] += 1
            if name in HOST_ONLY:
                args = tuple(a._a if isinstance(a, StandinArray) else a for a in args)
                return self._wrap(np.array(func(*args, **kwargs), copy=True))
            args = tuple(self._unwrap(a, f"{name}()") for a in args)
            out = kwargs.get("out")
            kwargs = {k: self._unwrap(v, f"{name}({k}=)") for k, v in kwargs.items()}
            owner = getattr(func, "__self__", None)
            result = func(*args, **kwargs)
            if out is not None:
                self._flush(out._a if isinstance(out, StandinArray) else out)
                return out
            inputs = [a for a in (owner, *args) if isinstance(a, np.ndarray)]
            if isinstance(result, np.ndarray) and any(np.may_share_memory(result, a) for a in inputs):
                return self._wrap(result)  # a view (reshape, transpose, astype(copy=False)): no kernel ran
            return self._result(result)

        return call

    def matmul(self, a, b, **kwargs):
        """As CuPy's: counted as batched when an operand has more than two dimensions; not flushed (cuBLAS)."""
        a_, b_ = self._unwrap(a, "matmul()"), self._unwrap(b, "matmul()")
        self.calls["matmul"] += 1
        if a_.ndim > 2 or b_.ndim > 2:
            self.calls["batched matmul"] += 1
        out = kwargs.pop("out", None)
        result = np.matmul(a_, b_, **kwargs) if out is None else np.matmul(a_, b_, out=self._unwrap(out, "matmul(out=)"),
                                                                            **kwargs)
        if result.dtype == np.float16:
            self.calls["float16 matmul"] += 1
        return out if out is not None else self._wrap(result)

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes, constants, finfo, ...
        return self._wrap_function(value, name)


def standin(ftz: bool = True) -> Standin:
    """A fresh stand-in module (its own counters)."""
    return Standin(ftz=ftz)
