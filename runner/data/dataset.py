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
from runner.data import chat
from runner.api.spec import CHAT_TEMPLATE_NAMES, DatasetSpec

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
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
def load_rows(local: Path, *, split: str, subset: str | None = None):
    """Load a split from a local file or folder (a downloaded Hub dataset, an S3 prefix, a user path)."""
    import datasets

    datasets.disable_progress_bars()
    if local.is_file():
        builder = DATA_SUFFIXES.get(local.suffix.lower())
        if builder is None:
            raise DataError(
                f"dataset.source: {local.name} is not a supported file; use .jsonl, .json, .csv or .parquet"
            )
        kwargs: dict[str, Any] = {"data_files": {"train": str(local)}}
    elif local.is_dir():
        builder, kwargs = str(local), {"name": subset}
    else:
        raise DataError(f"dataset.source: {local} does not exist; check the path")
    try:
        return datasets.load_dataset(builder, split=split, **kwargs)
    except ValueError as e:  # unknown split / bad slice
        raise DataError(f"dataset.split: {split!r} cannot be read from {local.name}: {e}") from e
    except (datasets.exceptions.DatasetGenerationError, json.JSONDecodeError) as e:
        raise PermanentError(
            f"dataset.source: {local.name} could not be parsed ({e.__class__.__name__}: {e}); "
            "check the file is valid JSON lines / CSV / Parquet",
            reason=DOWNLOAD_FAILED,
        ) from e


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


# -------------------------------------------------------------------------------------- tokenizing
@dataclass
class TokenizedData:
    train: Any  # datasets.Dataset with input_ids (+ completion_mask)
    eval: Any | None
    fmt: str
    lengths: list[int]  # token lengths before truncation (train), for the histogram
    truncated: int
    has_completion_mask: bool


def tokenize(rows, formatter: Formatter, tokenizer, *, max_length: int, add_eos: bool, desc: str = "train"):
    """Dataset of rows -> Dataset of input_ids (+ completion_mask when some tokens carry no loss)."""
    eos = tokenizer.eos_token or ""
    chat = formatter.fmt == "chat"

    def one_batch(batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        examples = []
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            try:
                ex = formatter.render(row)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"dataset: row cannot be formatted as {formatter.fmt} ({e.__class__.__name__}: {e}); "
                    "check dataset.format, dataset.columns and dataset.template"
                ) from e
            if add_eos and not chat and eos and not ex.text.endswith(eos):
                spans = ex.trainable
                if spans is not None:
                    spans = spans[:-1] + [(spans[-1][0], spans[-1][1] + len(eos))]
                ex = Example(ex.text + eos, spans)
            examples.append(ex)
        enc = tokenizer(
            [e.text for e in examples],
            add_special_tokens=not chat,
            return_offsets_mapping=True,
            truncation=False,
        )
        out: dict[str, list] = {"input_ids": [], "completion_mask": [], "full_length": []}
        for ex, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
            if ex.trainable is None:
                mask = [1] * len(ids)
            else:
                mask = [
                    int(end > start and any(a <= start < b for a, b in ex.trainable))
                    for start, end in offsets
                ]
            out["full_length"].append(len(ids))
            out["input_ids"].append(ids[:max_length])
            out["completion_mask"].append(mask[:max_length])
        return out

    tokenized = rows.map(one_batch, batched=True, remove_columns=rows.column_names, desc=f"tokenize {desc}")
    return tokenized


def prepare(spec: DatasetSpec, train_rows, eval_rows, tokenizer, *, seed: int) -> TokenizedData:
    columns = list(train_rows.column_names)
    # dataset.chatTemplate becomes the tokenizer's (published with the model) only when the format is chat
    chat_fn = chat.chat_function(spec, tokenizer, install=infer_format(spec, columns) == "chat")
    formatter = build_formatter(spec, columns, chat_template=chat_fn)
    if len(train_rows) == 0:
        raise DataError(f"dataset.split: {spec.split!r} selects no rows; choose a larger split")
    if eval_rows is None and spec.eval_fraction:
        parts = train_rows.train_test_split(test_size=spec.eval_fraction, seed=seed)
        train_rows, eval_rows = parts["train"], parts["test"]
    train = tokenize(train_rows, formatter, tokenizer, max_length=spec.max_length, add_eos=spec.add_eos)
    ev = None
    if eval_rows is not None:
        missing = set(formatter.columns_used) - set(eval_rows.column_names)
        if missing:
            raise DataError(
                f"dataset.evalSource: eval data lacks column(s) {', '.join(sorted(missing))} the format uses"
            )
        ev = tokenize(eval_rows, formatter, tokenizer, max_length=spec.max_length, add_eos=spec.add_eos, desc="eval")
    lengths = list(train["full_length"])
    truncated = sum(1 for n in lengths if n > spec.max_length)
    train, ev = train.remove_columns("full_length"), ev.remove_columns("full_length") if ev is not None else None
    has_mask = formatter.fmt != "text"
    if not has_mask:
        train = train.remove_columns("completion_mask")
        ev = ev.remove_columns("completion_mask") if ev is not None else None
    empty = sum(1 for m in train["completion_mask"] if not any(m)) if has_mask else 0
    if has_mask and empty == len(train):
        raise DataError(
            f"dataset.maxLength: every example's completion is cut off at {spec.max_length} tokens (examples are "
            f"{min(lengths)}-{max(lengths)} tokens, median {sorted(lengths)[len(lengths) // 2]}, 95% within "
            f"{sorted(lengths)[max(0, -(-len(lengths) * 95 // 100) - 1)]}); raise dataset.maxLength or shorten the "
            "prompts (`python -m runner preview JOB` shows the histogram)"
        )
    return TokenizedData(train, ev, formatter.fmt, lengths, truncated, has_mask)
