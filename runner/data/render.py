"""Bounds on rendering the Jinja a job brings (dataset.template.*, dataset.chatTemplate): a template is the user's
code, run once per example, so nothing it does may hang the runner or exhaust its memory.

    environment(immutable=...)   a sandboxed Jinja environment whose operations are bounded: `*`, `**` and `%`
                                 refuse results over MAX_CHARS (string or list repetition, huge powers), `range`
                                 over MAX_RANGE items, `lipsum` over MAX_LIPSUM paragraphs, any call or filter
                                 given a number over MAX_CHARS (`center`, `indent`, `format` widths)
    render(compiled, field, ...) one example: its text, at most MAX_CHARS characters, in at most MAX_SECONDS (a
                                 watchdog thread interrupts a render past its time, whatever thread runs it)
    static_problems(src, field)  what `validate` can refuse without data: literal repetitions, powers, ranges
                                 and lipsum sizes past the bounds, nested constant loops past MAX_ITERATIONS

A render past a bound is a RenderLimit, which the callers turn into their permanent error (exit 2) naming the
field.
"""
from __future__ import annotations

import ctypes
import functools
import math
import operator
import os
import threading
import time

MAX_CHARS = 4 << 20  # one rendered example; the longest training examples are a few hundred KiB of text
MAX_SECONDS = 5.0  # one example; real templates render in microseconds
MAX_RANGE = 100_000
MAX_LIPSUM = 20
MAX_ITERATIONS = 10_000_000  # nested loops over constant ranges, refused at validate
_NUMBER_ARG = MAX_CHARS


class RenderLimit(ValueError):
    """A template went past one of the bounds (the message says which, and how to stay within it)."""


def _too_big(what: str) -> RenderLimit:
    return RenderLimit(f"{what} would exceed {MAX_CHARS} characters, the most one example may render")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _times(left, right):
    if isinstance(left, int) and not isinstance(left, bool) and _size(right):
        left, right = right, left
    if _size(left) and isinstance(right, int) and _size(left) * max(right, 0) > MAX_CHARS:
        raise _too_big(f"repeating a value of length {_size(left)} {right} times")
    return operator.mul(left, right)


def _power(left, right):
    if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(left) > 1 and right > 0:
        if right * math.log2(abs(left)) > 4096:
            raise RenderLimit(f"{left} ** {right} is a number too large to render (over 4096 bits)")
    return operator.pow(left, right)


def _percent(left, right):
    if isinstance(left, str):
        _check_numbers((right,) if not isinstance(right, tuple) else right, "%")
        _check_widths(left)
    return operator.mod(left, right)


def _check_numbers(values, what: str) -> None:
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > _NUMBER_ARG:
            raise RenderLimit(f"{what} was given {v:g}, more than {_NUMBER_ARG} (the size bound of one example)")


def _check_widths(fmt: str) -> None:
    digits = 0
    for ch in fmt:
        digits = digits + 1 if ch.isdigit() else 0
        if digits > len(str(_NUMBER_ARG)):
            raise RenderLimit(f"a format width in {fmt[:40]!r} is more than {_NUMBER_ARG} characters")


def _bounded_filter(name: str, fn):
    skip = 1 + (getattr(fn, "jinja_pass_arg", None) is not None)  # the environment or context, then the value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _check_numbers(list(args[skip:]) + list(kwargs.values()), f"the filter {name}")
        if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
            _check_widths(args[skip - 1])
        return fn(*args, **kwargs)
    return wrapper


def _range(*args):
    _check_numbers(args, "range")
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise RenderLimit(f"range{args} has {len(r)} items, more than {MAX_RANGE}")
    return r


def environment(*, immutable: bool = False, **options):
    """A sandboxed Jinja environment (immutable: lists and dicts cannot be changed either) with the bounds above."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment
    from jinja2.utils import generate_lorem_ipsum

    base = ImmutableSandboxedEnvironment if immutable else SandboxedEnvironment

    class Bounded(base):  # type: ignore[valid-type, misc]
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, op, left, right):
            return {"*": _times, "**": _power, "%": _percent}[op](left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            _check_numbers(list(args) + list(kwargs.values()), getattr(__obj, "__name__", "a call"))
            bound = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            if getattr(bound, "__name__", "") in ("format", "format_map") and isinstance(
                    getattr(bound, "__self__", None), str):
                _check_widths(bound.__self__)
            return super().call(__context, __obj, *args, **kwargs)

    env = Bounded(**options)

    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja's names
        if n > MAX_LIPSUM or max > 100 or min > max:
            raise RenderLimit(f"lipsum(n={n}, min={min}, max={max}): at most n={MAX_LIPSUM}, max=100")
        return generate_lorem_ipsum(n=n, html=html, min=min, max=max)

    env.globals.update(range=_range, lipsum=lipsum)
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    return env


# ------------------------------------------------------------------------------------------- rendering
class _Watchdog:
    """One thread per process that interrupts renders past their deadline (an exception raised in the
    rendering thread at its next bytecode: a Jinja loop is Python code)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.deadlines: dict[int, float] = {}
        self.fired: set[int] = set()
        self.pid = None

    def after_fork(self) -> None:
        """In a forked worker (parallel tokenizing): no watchdog thread yet, and a fresh lock (the parent's
        may have been held by its watchdog at the fork)."""
        self.lock, self.deadlines, self.fired, self.pid = threading.Lock(), {}, set(), None

    def _ensure(self) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            threading.Thread(target=self._run, name="template-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            now = time.monotonic()
            with self.lock:
                for tid, deadline in list(self.deadlines.items()):
                    if now >= deadline:
                        del self.deadlines[tid]
                        self.fired.add(tid)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Timeout))

    def start(self, seconds: float) -> int:
        tid = threading.get_ident()
        with self.lock:
            self._ensure()
            self.deadlines[tid] = time.monotonic() + seconds
        return tid

    def stop(self, tid: int) -> bool:
        """Whether the render ran out of time (a pending interrupt is cancelled)."""
        with self.lock:
            self.deadlines.pop(tid, None)
            if tid in self.fired:
                self.fired.discard(tid)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
                return True
        return False


class _Timeout(BaseException):
    """Raised into a rendering thread by the watchdog (BaseException: no template catches it on the way)."""


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog.after_fork)


def render(compiled, **context) -> str:
    """The text of one example, within MAX_CHARS and MAX_SECONDS; past either, a RenderLimit."""
    parts: list[str] = []
    total = 0
    tid = _watchdog.start(MAX_SECONDS)
    timed_out = False
    try:
        for chunk in compiled.generate(**context):
            total += len(chunk)
            if total > MAX_CHARS:
                raise _too_big("the rendered text")
            parts.append(chunk)
    except _Timeout:
        timed_out = True
    finally:
        timed_out = _watchdog.stop(tid) or timed_out
    if timed_out:
        raise RenderLimit(f"rendering one example took more than {MAX_SECONDS:g}s (loops too large)")
    return "".join(parts)


# ------------------------------------------------------------------------------------------- validate
def static_problems(source: str, field: str, *, immutable: bool = False) -> list[str]:
    """What the template's text alone shows to be past the bounds (a syntax error is the caller's to report)."""
    from jinja2 import TemplateSyntaxError, nodes

    try:
        tree = environment(immutable=immutable).parse(source)
    except TemplateSyntaxError:
        return []
    problems: list[str] = []

    def const(node):
        return node.value if isinstance(node, nodes.Const) else None

    def loop_size(node) -> int:
        it = node.iter
        if isinstance(it, nodes.Call) and isinstance(it.node, nodes.Name) and it.node.name == "range":
            args = [const(a) for a in it.args]
            if args and all(isinstance(a, int) for a in args):
                try:
                    return len(range(*args))
                except (ValueError, TypeError):
                    return 1
        return 1

    def visit(node, iterations: int) -> None:
        if isinstance(node, nodes.For):
            iterations *= max(loop_size(node), 1)
            if iterations > MAX_ITERATIONS:
                problems.append(f"nested loops of {iterations} iterations (at most {MAX_ITERATIONS})")
                return
        try:
            if isinstance(node, nodes.Mul) and _literal(node):
                _times(const(node.left), const(node.right))
            elif isinstance(node, nodes.Pow) and _literal(node):
                _power(const(node.left), const(node.right))
            elif isinstance(node, nodes.Mod) and isinstance(const(node.left), str):
                _check_widths(const(node.left))
            elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
                args = [const(a) for a in node.args] + [const(k.value) for k in node.kwargs]
                numbers = [a for a in args if isinstance(a, (int, float))]
                if node.node.name == "range" and numbers:
                    _range(*[a for a in args if isinstance(a, int)])
                elif node.node.name == "lipsum":
                    kw = {k.key: const(k.value) for k in node.kwargs}
                    n = const(node.args[0]) if node.args else kw.get("n", 5)
                    if isinstance(n, int) and n > MAX_LIPSUM:
                        raise RenderLimit(f"lipsum(n={n}): at most n={MAX_LIPSUM}")
                _check_numbers(numbers, node.node.name)
            elif isinstance(node, nodes.Filter):
                _check_numbers([a for a in map(const, node.args) if isinstance(a, (int, float))],
                               f"the filter {node.name}")
        except RenderLimit as e:
            problems.append(str(e))
        for child in node.iter_child_nodes():
            visit(child, iterations)

    visit(tree, 1)
    return [f"{field}: {p}; make the template render each example in at most {MAX_CHARS} characters and "
            f"{MAX_SECONDS:g}s" for p in dict.fromkeys(problems)]


def _literal(node) -> bool:
    from jinja2 import nodes

    return isinstance(node.left, nodes.Const) and isinstance(node.right, nodes.Const)
