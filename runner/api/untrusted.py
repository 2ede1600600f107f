"""A job file is untrusted input: read it within bounds, and refuse what the typed spec would quietly accept.

    read_yaml(path) -> doc           UTF-8 text only, at most 1 MiB, YAML without duplicate keys, nesting or
                                     alias expansion past a small bound (no billion laughs)
    raw_problems(doc, prefix)        what pydantic's lax mode lets through but the cluster's schema does not:
                                     snake_case field names, booleans or numbers given as strings, .inf/.nan,
                                     NUL bytes and unpaired surrogates, nesting past MAX_DEPTH

Every problem is a line naming the field (or the file's line) and the fix; nothing here raises anything else.
"""
from __future__ import annotations

import math
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

MAX_FILE_BYTES = 1 << 20  # the controller passes the job file in a 256 KiB annotation; a spec is ~2 KiB
MAX_DEPTH = 32  # the deepest valid field is ~12 levels below the manifest (spec.affinity...values[])
MAX_NODES = 10_000  # values in the document once YAML aliases are expanded (a job has ~100)
_UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
         (b"\xfe\xff", "UTF-16"))


class FileProblem(Exception):
    """The job file cannot be read as a job; str() says why and what to do."""


def short(value: Any, limit: int = 60) -> str:
    """A bounded repr of a user's value, for messages."""
    text = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- the file
FIFO_FIRST, FIFO_WAIT = 2.0, 10.0  # seconds a job file that is a FIFO (`<(...)`) may take to start, and to end


def _read_fifo(path: Path) -> bytes:
    """A FIFO's bytes up to its end, never blocking on one that nobody writes."""
    import select
    import time

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data, started = b"", time.monotonic()
        while len(data) <= MAX_FILE_BYTES:
            waited = time.monotonic() - started
            if waited > (FIFO_WAIT if data else FIFO_FIRST):
                raise FileProblem(f"a FIFO (named pipe) that nothing {'finished writing' if data else 'wrote to'} "
                                  f"within {FIFO_WAIT if data else FIFO_FIRST:.0f}s; give the path of a YAML file")
            ready, _, _ = select.select([fd], [], [], 0.1)
            chunk = os.read(fd, 1 << 16) if ready else b""
            if chunk:
                data += chunk
            elif ready and data:
                break  # end of file: the writer closed it
        return data
    finally:
        os.close(fd)


def read_yaml(path: Path) -> Any:
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            data = _read_fifo(path)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise FileProblem(f"cannot read the job file ({e.strerror or e}); give the path of a YAML file") from e
    except ValueError as e:  # a NUL byte in the path itself
        raise FileProblem(f"cannot read the job file ({e}); give the path of a YAML file") from e
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem(f"larger than {MAX_FILE_BYTES >> 10} KiB; a job file is a few KiB of YAML")
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise FileProblem(f"the file is {name} text; save it as UTF-8")
    if b"\x00" in data:
        raise FileProblem("the file holds NUL bytes: it is binary (or UTF-16 without a byte-order mark), not "
                          "YAML text; save the job as UTF-8 YAML")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FileProblem(f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}; latin-1 or another "
                          "encoding?); save the file as UTF-8") from None
    loader = _Loader(text)
    loader.name = str(path)  # the file in YAML's own marks, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except FileProblem:
        raise
    except yaml.MarkedYAMLError as e:
        raise FileProblem(_yaml_problem(e)) from None
    except yaml.YAMLError as e:
        raise FileProblem(f"not valid YAML ({_bounded(str(e), 400)}); fix the syntax") from None
    except RecursionError:
        raise FileProblem(f"nested deeper than {MAX_DEPTH} levels; a job file is a few levels deep") from None
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.MarkedYAMLError) -> str:
    """One line: where (line, column), what, and what it was in the middle of."""
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    during = ""
    if e.context and e.context_mark is not None:
        during = f" ({e.context} from line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    what = _bounded(e.problem or e.context or "syntax error", 200)
    return f"not valid YAML at {where}{what}{during}; fix the syntax"


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, nesting past MAX_DEPTH and more than MAX_NODES values while
    composing (before anything is built)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._path: list[str] = []

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                raise FileProblem(f"holds more than {MAX_NODES:,} values (line {self.peek_event().start_mark.line + 1}"
                                  "); a job file holds a few dozen")
            if self._depth > MAX_DEPTH:
                raise FileProblem(f"nested deeper than {MAX_DEPTH} levels (line {self.peek_event().start_mark.line + 1}"
                                  "); a job file is a few levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor):
        """PyYAML's own, plus: a key given twice is refused, naming its path (YAML would keep the last)."""
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.MappingNode, None, start.implicit)
        node = yaml.MappingNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        seen: dict = {}
        while not self.check_event(yaml.MappingEndEvent):
            key = self.compose_node(node, None)
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    first = seen[(key.tag, key.value)]
                    lines = f"line {line}" if first == line else f"lines {first} and {line}"
                    path = ".".join([*self._path, _bounded(name, 80)])
                    raise FileProblem(f"duplicate key `{path}` ({lines}); YAML would keep only the last one: "
                                      "write it once")
                seen[(key.tag, key.value)] = line
            self._path.append(_bounded(name, 80))
            try:
                value = self.compose_node(node, key)
            finally:
                self._path.pop()
            node.value.append((key, value))
        node.end_mark = self.get_event().end_mark
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Aliases share nodes; the document they stand for must stay small and shallow (and not contain itself)."""
    memo: dict[int, tuple[int, int]] = {}  # id -> (values, height)
    busy: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in busy:
            raise FileProblem(f"an alias refers to a value that contains it (line {node.start_mark.line + 1}); "
                              "write the value out")
        if key not in memo:
            if isinstance(node, yaml.ScalarNode):
                memo[key] = (1, 0)
            else:
                busy.add(key)
                children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) \
                    else list(node.value)
                size, height = 1, 0
                for child in children:
                    s, h = measure(child, depth + 1)
                    size, height = size + s, max(height, h + 1)
                    if size > MAX_NODES:
                        raise FileProblem(f"expands to more than {MAX_NODES:,} values (YAML aliases, line "
                                          f"{node.start_mark.line + 1}); write the job without repeating anchors")
                busy.discard(key)
                memo[key] = (size, height)
        if depth + memo[key][1] > MAX_DEPTH:
            raise FileProblem(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded (line "
                              f"{node.start_mark.line + 1}); write the values out")
        return memo[key]

    measure(root, 0)


# ----------------------------------------------------------------------------------- the mapping
def shape_problem(doc: Any, where: str = "") -> str | None:
    """A document (from YAML or from a caller) too deep or too large to read any further, or None."""
    stack, nodes = [(doc, 0)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return f"{where or '(top)'}: more than {MAX_NODES:,} values; a job is a few dozen"
        if depth > MAX_DEPTH:
            return f"{where or '(top)'}: nested deeper than {MAX_DEPTH} levels; a job is a few levels deep"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _kinds(annotation: Any) -> set[type]:
    """The scalar types a field takes: {bool}, {int}, {float, int}, ... (None and models ignored)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    return {a for a in args if a in (bool, int, float)}


def raw_problems(doc: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Problems of `doc` (read as `model`) that the typed validation would let pass. Iterative, bounded."""
    problem = shape_problem(doc, prefix.rstrip("."))
    if problem:
        return [problem]
    problems: list[str] = []
    stack: list[tuple[Any, type[BaseModel] | None, str]] = [(doc, model, prefix.rstrip("."))]
    while stack:
        value, section, where = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: {value} is not a number a job can use; give a finite number")
        elif isinstance(value, str) and _UNSAFE_CHARS.search(value):
            bad = _UNSAFE_CHARS.search(value).group()
            what = "a NUL byte" if bad == "\x00" else f"an unpaired surrogate ({short(bad)})"
            problems.append(f"{where}: holds {what}, which no path, name or text can contain; remove it")
        elif isinstance(value, list):
            stack.extend((v, None, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            fields = {(f.alias or n): f for n, f in section.model_fields.items()} if section else {}
            snake = {n: f.alias for n, f in section.model_fields.items() if f.alias and f.alias != n} \
                if section else {}
            for key, v in reversed(list(value.items())):
                name = key if isinstance(key, str) else str(key)
                path = f"{where}.{name}" if where else name
                if isinstance(key, str) and _UNSAFE_CHARS.search(key):
                    problems.append(f"{short(path)}: the key holds a NUL byte or an unpaired surrogate; remove it")
                    continue
                if key in snake and key not in fields:
                    problems.append(f"{path}: snake_case spelling, which the cluster's FineTuneJob schema drops; "
                                    f"did you mean `{snake[key]}`?")
                    continue
                field = fields.get(key)
                if field is not None:
                    problem = _type_problem(path, v, _kinds(field.annotation))
                    if problem:
                        problems.append(problem)
                        continue
                stack.append((v, _model_in(field.annotation) if field is not None else None, path))
    return problems


def _type_problem(path: str, value: Any, kinds: set[type]) -> str | None:
    if not kinds or value is None:
        return None
    if kinds == {bool}:
        if not isinstance(value, bool):
            return f"{path}: must be true or false (got {short(value)}); write it unquoted: true or false"
        return None
    if isinstance(value, bool) or isinstance(value, str):
        return f"{path}: must be a number (got {short(value)}); write the number itself, unquoted"
    return None
