"""The chat-template sandbox: a checkpoint's Jinja chat template rendered with bounded work and size.

(Why ~700 lines: jinja2's sandbox stops attribute access, not work or size.
MiniJinja, the Rust engine Hugging Face's text-generation-inference renders chat
templates with, has a fuel limit but, measured, does not bound memory-doubling
or exponential-walk templates, and it aborts the process on a huge format width.
A forked child with rlimits would bound them, but is not portable and costs a
process per prompt. Each limit below is one check at the place where a template
could build something huge in one step.)

A chat template is code that comes with a downloaded checkpoint, so it is
treated as hostile: whatever it does, rendering ends within a few seconds with
either the text or one :class:`OracleError` naming the file, ``chat_template``
and the cause. Besides the sandbox's own rules (no private attributes, no
mutation of lists and dicts), rendering is bounded by:

* Source: at most ``MAX_TEMPLATE_CHARS`` (64 Ki) characters, and no
  ``{% include %}``, ``{% import %}`` or ``{% extends %}`` (there are no other
  files to read).
* Work: at most ``MAX_STEPS`` (100 000) steps plus ``STEPS_PER_MESSAGE``
  (2 000) per message, and ``MAX_SECONDS`` (10 s) of wall time. A step is
  one Python line executed in the compiled template or one Python function
  call anywhere while rendering (a loop iteration, a macro call, a filter),
  counted by a ``sys.settrace`` hook (installed for the render only, the
  caller's own trace function put back after). Real templates take a few
  hundred steps per message. Compiling is bounded by the source's length.
* Size: every value the template makes (string, list, dict, the whole
  output) holds at most ``max_len`` characters or items, nested containers
  counted in full, where ``max_len`` is ``TEXT_BASE`` (1 Mi) plus
  ``TEXT_FACTOR`` (4) times the characters of the messages. All values made
  together, plus every value compared, at most ``WORK_FACTOR`` (8) times
  ``max_len``. Integers at most ``MAX_INT_BITS`` (4096) bits, ``range`` at
  most ``MAX_RANGE`` (10 000) items, containers nested at most ``MAX_DEPTH``
  (64) deep. Operations that could build something huge in one C call
  (``*``, ``**``, ``%`` and ``format`` widths, ``~``, ``join``, ``replace``,
  ``center``, ``indent``, ``wordwrap``, ``batch``, ``slice``, ``tojson``'s
  indent, str methods such as ``ljust`` or ``expandtabs``) are checked
  *before* they run; ``sum`` adds numbers only; ``pprint`` and ``lipsum``
  are not available.

These limits are far above what chat templates need (the tiny checkpoints'
ChatML template takes ~125 steps; the Qwen3- and Phi-3.5-style templates of
tests/templates/, which render here exactly as transformers renders them, ~330
and ~70 steps per message of a long tool-using conversation) and far below what
would exhaust memory or patience; a template rendering to no text at all is
refused as well.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time

from reference.errors import OracleError

MAX_TEMPLATE_CHARS = 65_536
MAX_STEPS = 100_000
STEPS_PER_MESSAGE = 2_000
MAX_SECONDS = 10.0
TEXT_BASE = 1 << 20
TEXT_FACTOR = 4
WORK_FACTOR = 8
MAX_INT_BITS = 4096
MAX_RANGE = 10_000
MAX_DEPTH = 64
MAX_TOJSON_INDENT = 64
TEMPLATE_FILENAME = "<template>"  # what jinja2 names the code of templates made from strings

CHAT_FIX = "fix or remove chat_template there, or run without --chat and pass the raw prompt"


class _Refused(Exception):
    """A limit of the module docstring was reached; the message says which (never caught by jinja2)."""


_active = threading.local()  # .budget: the _Budget of the render running in this thread


def _budget() -> _Budget | None:
    return getattr(_active, "budget", None)


class _Budget:
    """Steps, time and sizes one render may use (a default one checks constant folding while compiling)."""

    def __init__(self, max_len: int, max_steps: int | None):
        self.max_len, self.max_work, self.max_steps = max_len, WORK_FACTOR * max_len, max_steps
        self.steps = self.work = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.error: str | None = None
        self.installed = False  # True while its tracer is the thread's trace function
        self._weights: dict[int, tuple[object, int, int]] = {}  # id -> (object kept alive, weight, depth)

        # The tracers raise only on a line of the template itself: never inside jinja2's or Python's own
        # code, where a generator being closed or a finalizer would print "Exception ignored" instead.
        # Work elsewhere is counted and flagged; the next template line or sandbox hook raises.
        def local(frame, event, arg):
            self.steps += 1
            if not self.steps & 1023:
                self._tick()
            if self.error is not None and event == "line":
                raise _Refused(self.error)
            return local

        def tracer(frame, event, arg):
            self.steps += 1
            if not self.steps & 1023:
                self._tick()
            return local if frame.f_code.co_filename == TEMPLATE_FILENAME else None

        self.tracer = tracer

    def _tick(self) -> None:
        if self.error is not None:
            return
        if self.max_steps is not None and self.steps > self.max_steps:
            self.error = f"took more than {self.max_steps} steps (loop iterations, calls)"
        elif time.monotonic() > self.deadline:
            self.error = f"took more than {MAX_SECONDS:g} s"

    def fail(self, why: str):
        if self.error is None:
            self.error = why
        raise _Refused(self.error)

    def alive(self) -> None:
        """Raise again if a limit was reached (in case jinja2 swallowed it) or the step counter was lost."""
        if self.error is not None:
            raise _Refused(self.error)
        # sys.settrace drops a tracer that raised (a RecursionError inside it): the counter is gone.
        if self.installed and sys.gettrace() is not self.tracer:
            self.fail("recursed too deeply")

    def charge(self, n: int) -> None:
        self.work += n
        if self.work > self.max_work:
            self.fail(f"made or compared more than {self.max_work} characters/items in all")

    def length(self, n: int, what: str = "a value") -> None:
        if n > self.max_len:
            self.fail(f"would make {what} of {n} characters/items, over the limit of {self.max_len}")

    def count(self, n, what: str) -> None:
        """An integer argument that sets a size (a width, a count)."""
        if isinstance(n, int) and abs(n) > self.max_len:
            self.fail(f"asks for {what} {n}, over the limit of {self.max_len}")

    def weight(self, x, depth: int = 0) -> int:
        """Characters + items of ``x``, nested containers counted in full; refused past the limits."""
        return self._measure(x, depth)[0]

    def _measure(self, x, depth: int) -> tuple[int, int]:
        if isinstance(x, (str, bytes, bytearray)):
            return len(x), 0
        if isinstance(x, bool) or x is None or isinstance(x, float):
            return 1, 0
        if isinstance(x, int):
            if x.bit_length() > MAX_INT_BITS:
                self.fail(f"made an integer of {x.bit_length()} bits, over the limit of {MAX_INT_BITS}")
            return 1 + x.bit_length() // 32, 0
        if isinstance(x, range):
            return 1 + len(x), 1
        cached = self._weights.get(id(x))
        if cached is not None and cached[0] is x:
            return cached[1], cached[2]
        children, cacheable = _children(x)
        if children is None:
            return 1, 0
        if depth >= MAX_DEPTH:
            self.fail(f"nested containers more than {MAX_DEPTH} deep")
        # List comprehensions, not a loop of calls: each Python call would count as a step. A scalar item
        # counts 1 (ints the template makes are checked when made), a string item 1 + its length.
        lengths = [len(c) for c in children if type(c) is str]
        others = [c for c in children if type(c) not in _SCALARS]
        w, d = 1 + len(children) - len(others) + sum(lengths), 0
        if w > self.max_len:
            self.length(w)
        weights = self._weights
        for child in others:
            seen = weights.get(id(child))
            cw, cd = (seen[1], seen[2]) if seen is not None and seen[0] is child else self._measure(child, depth + 1)
            w, d = w + cw, max(d, cd)
            if w > self.max_len:
                self.length(w)
        if d + 1 > MAX_DEPTH:
            self.fail(f"nested containers more than {MAX_DEPTH} deep")
        if cacheable:  # lists and dicts cannot change in the immutable sandbox
            self._weights[id(x)] = (x, w, d + 1)
        return w, d + 1

    def derive(self, result, op: str, left, right) -> None:
        """Record the weight of ``left + right`` or ``seq * n`` (lists, tuples) from the operands' weights."""
        if op == "+" and type(left) is type(right) is type(result):
            (wl, dl), (wr, dr) = self._measure(left, 0), self._measure(right, 0)
            self._weights[id(result)] = (result, wl + wr - 1, max(dl, dr))
        elif op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if type(seq) is type(result) and isinstance(n, int):
                w, d = self._measure(seq, 0)
                self._weights[id(result)] = (result, 1 + (w - 1) * max(n, 0), d)

    def made(self, x):
        """Check and account for a value the template just made."""
        self.alive()
        if isinstance(x, str):
            n = len(x)
        else:
            n = self.weight(x)
        self.length(n)
        self.charge(n)
        return x

    def depth(self, x) -> int:
        return self._measure(x, 0)[1]


_SCALARS = (str, int, float, bool, type(None))


def _children(x):
    """(items, cacheable): the items of a container (keys and values of a mapping) as a list, or (None, False)."""
    from jinja2.runtime import Namespace

    if isinstance(x, (list, tuple)):
        return x, True
    if isinstance(x, dict):
        return [*x.keys(), *x.values()], True
    if isinstance(x, (set, frozenset)) or type(x).__name__ in ("dict_keys", "dict_values"):
        return list(x), True
    if type(x).__name__ == "dict_items":
        return [y for item in x for y in item], True
    if isinstance(x, Namespace):  # {% set ns.attr = ... %} changes it: measured afresh each time
        attrs = x._Namespace__attrs
        return [*attrs.keys(), *attrs.values()], False
    return None, False


def _text_len(b: _Budget, x) -> int:
    return len(x) if isinstance(x, str) else b.weight(x)


def _total_len(b: _Budget, items) -> int:
    """Sum of _text_len over ``items``, in one comprehension (a call per item would count as a step)."""
    return sum([len(x) if type(x) is str else b.weight(x) for x in items])


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_percent(b: _Budget, fmt, args) -> None:
    """``fmt % args``: no width or precision past the limit (``*`` takes them from ``args``)."""
    if not isinstance(fmt, str):
        return
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                for a in args if isinstance(args, tuple) else (args,):
                    b.count(a, "a %-format width")
            elif g is not None:
                b.count(int(g[:12]), "a %-format width")


def _check_spec(b: _Budget, spec: str) -> None:
    for digits in _DIGITS.findall(spec):
        b.count(int(digits[:12]), "a format width")


def _check_binop(b: _Budget, op: str, left, right) -> None:
    if op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = right * (abs(left).bit_length() - 1)
            if bits > MAX_INT_BITS:
                b.fail(f"computes {left} ** {right}, over the limit of {MAX_INT_BITS} bits")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                b.fail(f"multiplies integers past the limit of {MAX_INT_BITS} bits")
        elif isinstance(right, int) and not isinstance(left, (int, float)):
            b.length(_text_len(b, left) * right)
        elif isinstance(left, int) and not isinstance(right, (int, float)):
            b.length(_text_len(b, right) * left)
    elif op == "+":
        if not isinstance(left, (int, float)) and not isinstance(right, (int, float)):
            b.length(_text_len(b, left) + _text_len(b, right))
    elif op == "%":
        _check_percent(b, left, right)


def _check_method(b: _Budget, obj, args: tuple, kwargs: dict) -> tuple:
    """Checks before a call of a str/bytes/int method that can build something big; returns the args to use."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes, bytearray)):
        n = len(owner)
        if name in ("ljust", "rjust", "center", "zfill"):
            b.count(args[0] if args else kwargs.get("width"), "a width")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            b.count(size, "a tab size")
            if isinstance(size, int):
                b.length(n + owner.count("\t" if isinstance(owner, str) else b"\t") * max(size, 0))
        elif name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            if isinstance(old, type(owner)) and isinstance(new, type(owner)):
                hits = n + 1 if not old else owner.count(old)
                if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                    hits = min(hits, args[2])
                b.length(n + hits * max(len(new) - len(old), 0))
        elif name == "join" and args:
            items = list(args[0])
            b.length(_total_len(b, items) + n * max(len(items) - 1, 0))
            return (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], (dict, list, tuple)):
            table = args[0].values() if isinstance(args[0], dict) else args[0]
            longest = max([len(v) for v in table if isinstance(v, (str, bytes))], default=1)
            b.length(n * max(longest, 1))
    elif isinstance(owner, int) and name == "to_bytes":
        b.count(args[0] if args else kwargs.get("length", 1), "a byte length")
    return args


def _make_env():
    """The sandboxed environment, its limits checked against the render's _Budget."""
    from jinja2.compiler import CodeGenerator, operators
    from jinja2.filters import make_attrgetter
    from jinja2.runtime import markup_join, str_join
    from jinja2.sandbox import (
        ImmutableSandboxedEnvironment,
        SandboxedEscapeFormatter,
        SandboxedFormatter,
    )
    from jinja2.utils import pass_environment
    from markupsafe import Markup

    def literal(x):
        b = _budget()
        if b is not None:
            b.alive()
            b.length(b.weight(x), "a literal")
            b.charge(len(x))
        return x

    def joined(markup, parts):  # the ~ operator
        b = _budget()
        if b is not None:
            b.alive()
            b.length(_total_len(b, parts), "a ~ concatenation")
        text = markup_join(parts) if markup else str_join(parts)
        return b.made(text) if b is not None else text

    def charged(x):  # an operand of a comparison
        b = _budget()
        if b is not None:
            b.alive()
            b.charge(_text_len(b, x))
        return x

    class Generator(CodeGenerator):
        """jinja2's code generator, with list/tuple/dict literals, ~ and comparisons going through the limits."""

        def _wrapped(self, visit, node, frame):
            self.write("environment.limit_literal(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self._wrapped(super().visit_List, node, frame)

        def visit_Dict(self, node, frame):
            self._wrapped(super().visit_Dict, node, frame)

        def visit_Tuple(self, node, frame):
            if node.ctx != "load":  # an assignment target, not a value
                return super().visit_Tuple(node, frame)
            self._wrapped(super().visit_Tuple, node, frame)

        def visit_Concat(self, node, frame):
            if frame.eval_ctx.volatile:
                markup = "context.eval_ctx.autoescape"
            else:
                markup = repr(bool(frame.eval_ctx.autoescape))
            self.write(f"environment.limit_concat({markup}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def visit_Compare(self, node, frame):
            self.write("(environment.limit_operand(")
            self.visit(node.expr, frame)
            self.write(")")
            for op in node.ops:
                self.visit(op, frame)
            self.write(")")

        def visit_Operand(self, node, frame):
            self.write(f" {operators[node.op]} environment.limit_operand(")
            self.visit(node.expr, frame)
            self.write(")")

    class CheckedSpec:
        def format_field(self, value, format_spec):
            b = _budget_or_default()
            _check_spec(b, format_spec)
            return b.made(super().format_field(value, format_spec))

    class Formatter(CheckedSpec, SandboxedFormatter):
        pass

    class EscapeFormatter(CheckedSpec, SandboxedEscapeFormatter):
        pass

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset(["+", "*", "%", "**"])
        limit_literal = staticmethod(literal)
        limit_concat = staticmethod(joined)
        limit_operand = staticmethod(charged)

        def concat(self, parts):  # block captures, macro and caller() results
            parts = parts if isinstance(parts, list) else list(parts)
            b = _budget()
            if b is not None:
                b.alive()
                b.length(sum([len(p) for p in parts if isinstance(p, str)]), "a block of output")
            text = "".join(parts)
            return b.made(text) if b is not None else text

        def call_binop(self, context, operator, left, right):
            b = _budget()
            if b is None:
                return super().call_binop(context, operator, left, right)
            b.alive()
            _check_binop(b, operator, left, right)
            result = super().call_binop(context, operator, left, right)
            if type(result) in (list, tuple):  # its weight follows from the operands' (no walk of the items)
                b.derive(result, operator, left, right)
            return b.made(result)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            b = _budget()
            if b is None:
                return super().call(__context, __obj, *args, **kwargs)
            b.alive()
            args = _check_method(b, __obj, args, kwargs)
            b.charge(_total_len(b, args) + _total_len(b, kwargs.values()))
            return b.made(super().call(__context, __obj, *args, **kwargs))

        def getitem(self, obj, argument):
            b = _budget()
            if b is not None:
                b.alive()
                if isinstance(argument, tuple):  # hashing a tuple key walks it
                    b.charge(b.weight(argument))
            value = super().getitem(obj, argument)
            if b is not None and isinstance(argument, slice):
                b.made(value)
            return value

        def getattr(self, obj, attribute):
            b = _budget()
            if b is not None:
                b.alive()
            return super().getattr(obj, attribute)

        def wrap_str_format(self, value):
            """jinja2's str.format sandboxing, with the width of every field checked first."""
            fmt = super().wrap_str_format(value)
            if fmt is None:
                return None
            f_self, is_format_map = value.__self__, value.__name__ == "format_map"
            formatter = (EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup)
                         else Formatter(self))

            def wrapper(*args, **kwargs):
                if is_format_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one positional argument")
                    args, kwargs = (), args[0]
                return type(f_self)(formatter.vformat(f_self, args, kwargs))

            return functools.update_wrapper(wrapper, value)

    def finalize(value):  # every {{ value }}: its text must fit
        b = _budget()
        if b is not None and not isinstance(value, str):
            b.length(b.weight(value), "printed text")
        return value

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], finalize=finalize)

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def safe_range(*args):
        r = range(*args)
        try:
            n = len(r)
        except OverflowError:
            n = sys.maxsize
        if n > MAX_RANGE:
            _budget_or_default().fail(f"asks for range() of {n} items, over the limit of {MAX_RANGE}")
        return r

    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = safe_range
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: no use in a chat template

    def tojson(x, indent=None):  # as Hugging Face does: no HTML escaping, non-ASCII kept
        b = _budget_or_default()
        if indent is not None:
            width = indent if isinstance(indent, int) else len(str(indent))
            if width > MAX_TOJSON_INDENT:
                b.fail(f"asks for tojson indent {indent!r}, over the limit of {MAX_TOJSON_INDENT}")
            b.length(b.weight(x) * (6 + max(width, 0) * b.depth(x)), "JSON text")
        return json.dumps(x, ensure_ascii=False, indent=indent)

    env.filters["tojson"] = tojson

    @pass_environment
    def sum_numbers(environment, iterable, attribute=None, start=0):
        values = list(iterable) if attribute is None else list(map(make_attrgetter(environment, attribute), iterable))
        if not all([isinstance(v, (int, float)) for v in [*values, start]]):
            raise TypeError("the sum filter adds numbers only (use join for strings)")
        return sum(values, start)

    env.filters["sum"] = sum_numbers
    env.filters.pop("pprint", None)  # pretty-printed nested data: no use in a chat template

    for name, func in list(env.filters.items()):
        env.filters[name] = _limited(name, func, _FILTER_CHECKS.get(name))
    for name, func in list(env.tests.items()):
        env.tests[name] = _limited(name, func, None)
    return env


def _budget_or_default() -> _Budget:
    """The render's budget; at compile time (jinja2 folds constants) a default one."""
    b = _budget()
    return b if b is not None else _Budget(TEXT_BASE, None)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _check_center(b, args, kwargs):
    b.count(_arg(args, kwargs, 1, "width", 80), "a width")


def _check_indent(b, args, kwargs):
    width = _arg(args, kwargs, 1, "width", 4)
    b.count(width, "an indent width")
    text = args[0] if args else ""
    per_line = len(width) if isinstance(width, str) else (width if isinstance(width, int) else 0)
    if isinstance(text, str):
        b.length(len(text) + (text.count("\n") + 1) * max(per_line, 0), "indented text")


def _check_wordwrap(b, args, kwargs):
    b.count(_arg(args, kwargs, 1, "width", 79), "a width")
    wrap = _arg(args, kwargs, 3, "wrapstring") or "\n"
    text = args[0] if args else ""
    if isinstance(text, str) and isinstance(wrap, str):
        b.length(len(text) + (len(text) + 1) * len(wrap), "wrapped text")


def _check_join(b, args, kwargs):
    if not args:
        return args, kwargs
    items = list(args[0])
    sep = _arg(args, kwargs, 1, "d", "")
    sep_len = len(sep) if isinstance(sep, str) else 0
    b.length(_total_len(b, items) + sep_len * max(len(items) - 1, 0), "joined text")
    return (items, *args[1:]), kwargs


def _check_replace(b, args, kwargs):
    if len(args) < 3:
        return
    text, old, new = (str(x) if not isinstance(x, str) else x for x in args[:3])
    count = _arg(args, kwargs, 3, "count")
    hits = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    b.length(len(text) + hits * max(len(new) - len(old), 0), "replaced text")


def _check_format(b, args, kwargs):
    if args:
        _check_percent(b, args[0], tuple(args[1:]) or kwargs)


def _check_batch(b, args, kwargs):
    n = _arg(args, kwargs, 1, "linecount" if len(args) < 2 else "slices")
    b.count(n, "a count")
    fill = _arg(args, kwargs, 2, "fill_with")
    if isinstance(n, int) and fill is not None:
        b.length(b.weight(args[0]) + abs(n) * b.weight(fill))


_FILTER_CHECKS = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "join": _check_join,
    "replace": _check_replace,
    "format": _check_format,
    "batch": _check_batch,
    "slice": _check_batch,
}


def _limited(name: str, func, check):
    """``func`` (a filter or test) with its arguments charged, ``check`` run first and its result checked."""
    lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps jinja_pass_arg, so jinja2 passes the same arguments
    def limited(*args, **kwargs):
        b = _budget_or_default()
        b.alive()
        own = args[lead:]
        if check is not None:
            changed = check(b, own, kwargs)
            if changed is not None:
                own, kwargs = changed
                args = (*args[:lead], *own)
        b.charge(_total_len(b, own) + _total_len(b, kwargs.values()))
        return b.made(func(*args, **kwargs))

    return limited


_env_lock = threading.Lock()
_env = None
_compiled: dict[str, object] = {}  # template source -> jinja2 Template, for repeated renders


def _environment():
    global _env
    with _env_lock:
        if _env is None:
            _env = _make_env()
        return _env


def _run_limited(budget: _Budget, fn):
    """``fn()`` with ``budget`` active in this thread and its step counter installed."""
    previous_trace = sys.gettrace()
    previous_budget = _budget()
    _active.budget = budget
    budget.installed = True
    sys.settrace(budget.tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous_trace)
        budget.installed = False
        _active.budget = previous_budget


def _compile(source: str):
    from jinja2 import nodes

    env = _environment()
    template = _compiled.get(source)
    if template is not None:
        return template
    if len(source) > MAX_TEMPLATE_CHARS:
        raise _Refused(f"is {len(source)} characters long, over the limit of {MAX_TEMPLATE_CHARS}")

    def compile_():
        ast = env.parse(source)
        for kind, what in ((nodes.Extends, "extends"), (nodes.Include, "include"), (nodes.Import, "import"),
                           (nodes.FromImport, "from ... import")):
            node = next(ast.find_all(kind), None)
            if node is not None:
                raise _Refused(f"uses {{% {what} %}} at line {node.lineno}, "
                               "but a chat template cannot read other files")
        return env.template_class.from_code(env, env.compile(ast), env.make_globals(None), None)

    template = compile_()  # bounded by the source's length; constant folding meets the default limits
    if len(_compiled) >= 16:
        _compiled.clear()
    _compiled[source] = template
    return template


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value, limit: int = 60) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _why(e: BaseException) -> str:
    """What went wrong in the template, as a phrase following "chat_template"."""
    from jinja2 import exceptions as jx

    if isinstance(e, _Refused):
        return str(e)
    if isinstance(e, jx.TemplateSyntaxError):
        return f"has a syntax error at line {e.lineno}: {_one_line(jx.TemplateError(e.message))}"
    if isinstance(e, jx.UndefinedError):
        return f"failed: {_one_line(e)}"
    if isinstance(e, jx.SecurityError):
        return f"was stopped by the sandbox: {_one_line(e)}"
    if isinstance(e, jx.TemplateNotFound):
        return f"tries to read another file ({_one_line(e)}), which a chat template cannot"
    if type(e) is jx.TemplateError:  # raise_exception(...) in the template
        return f"raised an error: {_one_line(e)}"
    if isinstance(e, RecursionError):
        return "recursed too deeply"
    if isinstance(e, MemoryError):
        return "ran out of memory"
    return f"failed: {type(e).__name__}: {_one_line(e)}"


def render(source: str, context: dict, n_messages: int, where: str) -> str:
    """The template `source` (from the file `where`) rendered with `context`, within the limits above;
    OracleError (one line naming `where`, chat_template and the cause) for anything else."""
    try:
        template = _compile(source)
        probe = _Budget(1 << 62, None)  # sizes the limits: characters of the messages
        max_len = TEXT_BASE + TEXT_FACTOR * probe.weight(context)
        budget = _Budget(max_len, MAX_STEPS + STEPS_PER_MESSAGE * n_messages)

        chunks = template.generate(**context)  # a generator: nothing runs yet

        def collect():
            parts, size = [], 0
            for chunk in chunks:
                size += len(chunk)
                budget.length(size, "output")
                parts.append(chunk)
            budget.alive()
            return "".join(parts)

        try:
            text = _run_limited(budget, collect)
        finally:
            chunks.close()  # a template stopped half-way is closed here, with the limits off
    except Exception as e:  # everything a template can do wrong: syntax, runtime, limits
        raise OracleError(f"{where}: chat_template {_why(e)}; {CHAT_FIX}") from None
    if not text:
        raise OracleError(f"{where}: chat_template rendered nothing for this prompt; {CHAT_FIX}")
    return text
