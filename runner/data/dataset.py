"""Dataset phase: load rows, turn each into training text, tokenize with a loss mask.

Every format ends up as the same thing: a text plus the character spans the loss is computed on
(None = the whole text). Tokenizing once with offsets and marking the tokens that start inside a span keeps
prompt/completion, instruction and chat handling in one place. trl then builds labels from
`completion_mask`, packs (best-fit, with position ids that restart per example) and collates.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.api.errors import PermanentError, DOWNLOAD_FAILED, INVALID_SPEC
from runner.data import chat, files
from runner.data.files import DATA_SUFFIXES
from runner.api.spec import CHAT_TEMPLATE_NAMES, DatasetSpec

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DEFAULT_ROLE_COLUMNS = {
    "text": "text",
    "prompt": "prompt",
    "completion": "completion",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "messages": "messages",
}
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


class DataError(PermanentError):
    def __init__(self, message: str):
        super().__init__(message, reason=INVALID_SPEC)


# ------------------------------------------------------------------------------------------- loading
def load_rows(local: Path, *, split: str, subset: str | None = None, cache_dir: Path | None = None,
              field: str = "dataset.source"):
    """Load a split from a local file or folder (a downloaded Hub dataset, an S3 prefix of shards, a user path)
    into Arrow files under `cache_dir` (memory-mapped; the datasets library's cache when None), shard by shard."""
    import datasets

    datasets.disable_progress_bars()
    if problem := files.problem(field, local):
        raise DataError(problem)
    if local.is_file():
        builder = DATA_SUFFIXES.get(local.suffix.lower())
        if builder is None:
            raise DataError(
                f"{field}: {local.name} is not a supported file; use .jsonl, .json, .csv or .parquet"
            )
        kwargs: dict[str, Any] = {"data_files": {"train": str(local)}}
    elif (found := files.shards(local)) is not None and subset is None and not (local / "README.md").exists():
        builder, kwargs = found.kind, {"data_files": {"train": [str(f) for f in found.files]}}
    else:
        builder, kwargs = str(local), {"name": subset}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        return datasets.load_dataset(builder, split=split, **kwargs)
    except ValueError as e:  # unknown split / bad slice
        raise DataError(f"dataset.split: {split!r} cannot be read from {local.name}: {e}") from e
    except (datasets.exceptions.DatasetGenerationError, json.JSONDecodeError, StopIteration) as e:
        raise PermanentError(
            f"{field}: {local.name} could not be parsed ({e.__class__.__name__}: {e}); "
            "check the file is valid JSON lines / CSV / Parquet",
            reason=DOWNLOAD_FAILED,
        ) from e


def peek(local: Path, *, split: str, subset: str | None = None, field: str = "dataset.source",
         cache_dir: Path | None = None) -> tuple[list[str], int]:
    """The data's columns and row count, read from the first row and the line count (or Parquet footers) where
    the data is JSON lines or Parquet shards; otherwise from the rows loaded."""
    if problem := files.problem(field, local):
        raise DataError(problem)
    plain = subset is None and split == "train" and not (local.is_dir() and (local / "README.md").exists())
    found = files.shards(local) if plain else None
    if found is None:
        rows = load_rows(local, split=split, subset=subset, field=field, cache_dir=cache_dir)
        return list(rows.column_names), len(rows)
    try:
        head = files.sample(found, 1)
    except (ValueError, UnicodeDecodeError) as e:
        raise PermanentError(f"{field}: {local.name} could not be parsed ({e.__class__.__name__}: {str(e)[:200]}); "
                             "check the file is valid JSON lines / Parquet", reason=DOWNLOAD_FAILED) from e
    if not head.rows or not isinstance(head.rows[0], dict):
        raise DataError(f"{field}: {local.name} holds no rows as JSON objects (read {head.total} line(s)); give one "
                        "JSON object per line")
    return list(head.rows[0]), head.total


# ------------------------------------------------------------------------------------------ formats
@dataclass(frozen=True)
class Example:
    text: str
    trainable: list[tuple[int, int]] | None  # character spans with loss; None = every token


@dataclass
class Formatter:
    """Turns one row into an Example, according to the dataset spec and the data's columns."""

    fmt: str
    render: Callable[[dict], Example]
    columns_used: list[str] = field(default_factory=list)


def _template_fn(template: str, columns: list[str], where: str) -> tuple[Callable[[dict], str], set[str]]:
    if "{{" in template or "{%" in template:
        from jinja2 import StrictUndefined
        from jinja2 import TemplateSyntaxError, meta

        from runner.data import render as bounds

        env = bounds.environment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            names = meta.find_undeclared_variables(env.parse(template))
            compiled = env.from_string(template)
        except TemplateSyntaxError as e:
            raise DataError(f"{where}: Jinja syntax error ({e}); fix the template")
        _require(names, columns, where)

        def render(row: dict) -> str:
            try:
                return bounds.render(compiled, **row)
            except Exception as e:  # noqa: BLE001 - the template is the user's code: any failure is theirs
                raise DataError(f"{where}: the template failed on a row ({e.__class__.__name__}: "
                                f"{str(e)[:300]}); fix the template") from e

        return render, set(names)
    names = set(_PLACEHOLDER.findall(template))
    _require(names, columns, where)

    def fill(row: dict) -> str:
        return _PLACEHOLDER.sub(lambda m: _as_text(row[m.group(1)]), template)

    return fill, names


def template_problems(spec: DatasetSpec) -> list[str]:
    """Jinja templates that do not compile, found before any download."""
    problems = []
    for key in ("text", "prompt", "completion"):
        template = getattr(spec.template, key)
        if not template or not ("{{" in template or "{%" in template):
            continue
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import SandboxedEnvironment

        from runner.data.render import static_problems

        try:
            SandboxedEnvironment().parse(template)
        except TemplateSyntaxError as e:
            problems.append(f"dataset.template.{key}: Jinja syntax error on line {e.lineno}: {str(e.message)[:200]}; "
                            "fix the template")
        problems += static_problems(template, f"dataset.template.{key}")
    problem = chat.syntax_problem(spec)
    return problems + ([problem] if problem else [])


def _require(names, columns: list[str], where: str) -> None:
    missing = sorted(set(names) - set(columns))
    if missing:
        raise DataError(
            f"{where}: placeholder(s) {', '.join('{' + m + '}' for m in missing)} name no column; "
            f"the data has columns {', '.join(columns)}"
        )


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def _column(spec: DatasetSpec, role: str, columns: list[str], *, required: bool = True) -> str | None:
    configured = getattr(spec.columns, role)
    name = configured or _DEFAULT_ROLE_COLUMNS[role]
    if name in columns:
        return name
    if configured or required:
        where = f"dataset.columns.{role}"
        raise DataError(
            f"{where}: column {name!r} is not in the data (columns: {', '.join(columns)}); "
            f"set {where} to the column that holds the {role}"
        )
    return None


def infer_format(spec: DatasetSpec, columns: list[str]) -> str:
    if spec.format != "auto":
        return spec.format
    t, c = spec.template, spec.columns
    if t.prompt or t.completion:
        return "prompt-completion"
    if t.text:
        return "text"
    has = lambda role: (getattr(c, role) or _DEFAULT_ROLE_COLUMNS[role]) in columns  # noqa: E731
    for fmt, roles in (
        ("chat", ("messages",)),
        ("prompt-completion", ("prompt", "completion")),
        ("instruction", ("instruction", "output")),
        ("text", ("text",)),
    ):
        if all(has(r) for r in roles):
            return fmt
    raise DataError(
        f"dataset.format: cannot infer the format from columns {', '.join(columns)}; set dataset.format "
        "and dataset.columns (e.g. columns: {prompt: commands, completion: actions}) or dataset.template"
    )


def build_formatter(spec: DatasetSpec, columns: list[str], *, chat_template: Callable | None = None) -> Formatter:
    fmt = infer_format(spec, columns)
    t = spec.template
    if spec.chat_template is not None and fmt != "chat":
        raise DataError(f"dataset.chatTemplate: used only with format chat, and this job's format is {fmt}; remove "
                        "dataset.chatTemplate, or set dataset.format: chat with a messages column")
    if fmt == "text":
        if t.text:
            fill, used = _template_fn(t.text, columns, "dataset.template.text")
        else:
            col = _column(spec, "text", columns)
            fill, used = (lambda row: _as_text(row[col])), {col}
        return Formatter(fmt, lambda row: Example(fill(row), None), sorted(used))

    if fmt in ("prompt-completion", "instruction"):
        if t.prompt and t.completion:
            prompt_fn, u1 = _template_fn(t.prompt, columns, "dataset.template.prompt")
            completion_fn, u2 = _template_fn(t.completion, columns, "dataset.template.completion")
            used = u1 | u2
        elif fmt == "prompt-completion":
            pc, cc = _column(spec, "prompt", columns), _column(spec, "completion", columns)
            prompt_fn, completion_fn, used = (
                (lambda row: _as_text(row[pc])),
                (lambda row: _as_text(row[cc])),
                {pc, cc},
            )
        else:
            ic = _column(spec, "instruction", columns)
            inc = _column(spec, "input", columns, required=False)
            oc = _column(spec, "output", columns)

            def prompt_fn(row: dict) -> str:
                extra = _as_text(row[inc]) if inc else ""
                block = f"### Input:\n{extra}\n\n" if extra.strip() else ""
                return INSTRUCTION_PROMPT.format(instruction=_as_text(row[ic]), input_block=block)

            completion_fn, used = (lambda row: _as_text(row[oc])), {ic, oc} | ({inc} if inc else set())

        def render_pc(row: dict) -> Example:
            prompt, completion = prompt_fn(row), completion_fn(row)
            return Example(prompt + completion, [(len(prompt), len(prompt) + len(completion))])

        return Formatter(fmt, render_pc, sorted(used))

    # chat
    mc = _column(spec, "messages", columns)
    if chat_template is None:
        raise DataError("dataset.chatTemplate: format chat needs a chat template, and this tokenizer has none (a base "
                        "model's, usually); set dataset.chatTemplate to a built-in (" + ", ".join(CHAT_TEMPLATE_NAMES)
                        + ") or to a Jinja chat template (README: Chat templates)")

    def render_chat(row: dict) -> Example:
        messages = row[mc]
        if isinstance(messages, str):
            messages = json.loads(messages)
        spans = []
        for i, msg in enumerate(messages):
            if msg.get("role") == "assistant":
                before = chat_template(messages[:i], add_generation_prompt=True) if i else ""
                after = chat_template(messages[: i + 1], add_generation_prompt=False)
                if not after.startswith(before):  # template renders prefixes differently: fall back
                    before = chat_template(messages[:i], add_generation_prompt=False) if i else ""
                spans.append((len(before), len(after)))
        text = chat_template(messages, add_generation_prompt=False)
        if not spans:
            raise DataError(f"dataset.columns.messages: a conversation has no assistant turn: {messages!r:.200}")
        return Example(text, spans)

    return Formatter(fmt, render_chat, [mc])


def row_formatter(spec: DatasetSpec, columns: list[str], tokenizer) -> Formatter:
    """The job's formatter (dataset.chatTemplate installed on the tokenizer when the format is chat), whose render
    raises DataError for a row that cannot be formatted."""
    fn = chat.chat_function(spec, tokenizer, install=infer_format(spec, columns) == "chat")
    built = build_formatter(spec, columns, chat_template=fn)

    def render(row: dict) -> Example:
        try:
            return built.render(row)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"dataset: row cannot be formatted as {built.fmt} ({e.__class__.__name__}: {e}); "
                            "check dataset.format, dataset.columns and dataset.template") from e

    return Formatter(built.fmt, render, built.columns_used)


# -------------------------------------------------------------------------------------- tokenizing
@dataclass
class TokenizedData:
    train: Any  # datasets.Dataset with input_ids (+ completion_mask), memory-mapped when made in a folder
    eval: Any | None
    fmt: str
    lengths: Any  # token lengths before truncation (train; a numpy array), for the histogram
    truncated: int
    has_completion_mask: bool
    rows_total: int | None = None  # training rows in the data
    tokenized: int | None = None  # rows tokenized by this process (0: reused)


@dataclass(frozen=True)
class Limit:
    """What maxSteps needs: `max_steps` optimizer steps of `per_step` sequences, packed or not."""

    max_steps: int
    per_step: int
    packing: bool


def check_rows(spec: DatasetSpec, rows, *, where: str = "dataset.source") -> None:
    """Data with no rows is the user's to fix: a permanent error naming the field, with what was read."""
    if len(rows) == 0:
        selected = spec.split not in ("train", "") and ("[" in spec.split or ":" in spec.split)
        if selected:
            raise DataError(f"dataset.split: {spec.split!r} selects 0 rows of {spec.source}; choose a larger split")
        raise DataError(f"{where}: {spec.source if where == 'dataset.source' else spec.eval_source} holds no rows "
                        "(0 rows read, none dropped); give data that holds at least one row")


def prepare(spec: DatasetSpec, train_rows, eval_rows, tokenizer, *, seed: int, into: Path | None = None,
            limit: Limit | None = None, key=None, rows_total: int | None = None) -> TokenizedData:
    """Rows -> TokenizedData. With `into` (a folder), the token ids go to memory-mapped Arrow files there and the
    folder becomes a complete entry (runner/data/tokenized.py) once `key`'s marker is written; with `limit`,
    only the rows maxSteps uses are tokenized (`rows_total`: the rows in the data, when `train_rows` holds only
    its first rows)."""
    import numpy as np

    from runner.data import tokenized as tk

    columns = list(train_rows.column_names)
    fn = tk.Tokenize(spec, columns, tokenizer, spec.max_length, row_formatter)
    formatter = fn.formatter()
    check_rows(spec, train_rows)
    if eval_rows is None and spec.eval_fraction:
        parts = train_rows.train_test_split(test_size=spec.eval_fraction, seed=seed)
        train_rows, eval_rows = parts["train"], parts["test"]
    rows_total = rows_total or len(train_rows)
    out = (lambda name: into / name) if into is not None else (lambda name: None)  # noqa: E731
    if limit is not None and limit.max_steps * limit.per_step < len(train_rows):
        first = min(len(train_rows), limit.max_steps * limit.per_step)
        train = tk.tokenize(train_rows.select(range(first)), fn, out_file=out("train-a.arrow"))
        mean = float(np.mean(np.minimum(_arrow_column(train, "full_length"), spec.max_length)))
        need = min(len(train_rows), tk.rows_for_steps(limit.max_steps, limit.per_step, packing=limit.packing,
                                                 max_length=spec.max_length, mean_tokens=mean))
        if need > first:
            import datasets

            more = tk.tokenize(train_rows.select(range(first, need)), fn, out_file=out("train-b.arrow"))
            train = datasets.concatenate_datasets([train, more])
    else:
        train = tk.tokenize(train_rows, fn, out_file=out("train.arrow"))
    ev = None
    if eval_rows is not None:
        missing = set(formatter.columns_used) - set(eval_rows.column_names)
        if missing:
            raise DataError(
                f"dataset.evalSource: eval data lacks column(s) {', '.join(sorted(missing))} the format uses"
            )
        ev = tk.tokenize(eval_rows, fn, out_file=out("eval.arrow"), desc="eval")
    data = finish(spec, train, ev, formatter.fmt, rows_total=rows_total)
    data.tokenized = len(train) + (len(ev) if ev is not None else 0)
    if into is not None and key is not None:
        tk.write_marker(into, key, {"fmt": formatter.fmt, "rows": len(train), "rowsTotal": rows_total,
                                    "evalRows": len(ev) if ev is not None else None})
    return data


def _arrow_column(ds, name: str):
    import numpy as np

    return np.asarray(ds.data.column(name).to_numpy())


def finish(spec: DatasetSpec, train, ev, fmt: str, *, rows_total: int | None = None) -> TokenizedData:
    """TokenizedData from tokenized datasets (made now or opened from an entry): statistics from the Arrow
    columns, the columns the trainer does not read dropped (no copy)."""
    import numpy as np

    lengths = _arrow_column(train, "full_length")
    trained = _arrow_column(train, "trained")
    truncated = int((lengths > spec.max_length).sum())
    has_mask = fmt != "text"
    if has_mask and len(trained) and not trained.any():
        s = np.sort(lengths)
        raise DataError(
            f"dataset.maxLength: every example's completion is cut off at {spec.max_length} tokens (examples are "
            f"{s[0]}-{s[-1]} tokens, median {s[len(s) // 2]}, 95% within "
            f"{s[max(0, -(-len(s) * 95 // 100) - 1)]}); raise dataset.maxLength or shorten the "
            "prompts (`python -m runner preview JOB` shows the histogram)"
        )
    drop = ["full_length", "trained"] + ([] if has_mask else ["completion_mask"])
    train = train.remove_columns(drop)
    ev = ev.remove_columns(drop) if ev is not None else None
    return TokenizedData(train, ev, fmt, lengths, truncated, has_mask, rows_total=rows_total)
