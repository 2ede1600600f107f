"""`python -m runner preview job.yaml`: what will be trained, before any GPU is held.

It reads the data and only the tokenizer (no weights), formats and tokenizes a sample of the rows (the first
and as many at random, said as a sample; `--full`: every row) exactly as `run` does (runner/data/sampled.py),
and shows: N examples as the model sees them with the loss mask marked, the format
and why, token-length statistics and a histogram, what maxLength cuts, packing, steps and tokens, and
warnings.
"""
from __future__ import annotations

import bisect
import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runner import store
from runner.api.spec import Job
from runner.api.status import Estimate
from runner.data import sampled

# What AutoTokenizer reads: never the weights.
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "*.model", "*.tiktoken", "config.json", "chat_template*"]
OPEN, CLOSE = "⟦", "⟧"  # the loss mask off a terminal: trained tokens between them
_MAX_CHECKED_ROWS = 200_000  # rows rendered for the empty-completion check


@dataclass
class Example:
    segments: list[tuple[str, bool]]  # (text, carries loss) in order, as the tokens decode
    tokens: int  # after truncation
    full_tokens: int
    trained_tokens: int


@dataclass
class Preview:
    name: str
    source: str
    split: str
    columns: list[str]
    fmt: str
    fmt_reason: str
    tokenizer_source: str
    rows: int
    eval_rows: int | None
    eval_note: str | None
    masked: bool  # loss on completions only
    max_length: int
    lengths: list[int]  # before truncation
    truncated: int
    completion_cut: int  # examples whose whole completion lies past maxLength: no loss at all
    empty_completion: int
    trained_tokens: int
    packing: bool
    packed_rows: int | None
    batch: int
    accumulation: int
    processes: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    examples: list[Example] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sample: str | None = None  # how the statistics were estimated from a sample (None: from every row)
    scale: float = 1.0  # rows per sampled row
    estimate: Estimate | None = None  # time and GPU-hours on the job's GPU kind (runner/train/estimate.py)


# ------------------------------------------------------------------------------------------ gathering
def gather(job: Job, *, n: int = 3, work: Path | None = None, gpu: str | None = None, full: bool = False) -> Preview:
    """What will be trained, from a sample of the rows (the first and some at random), or every row (`full`)."""
    own = work is None
    work = Path(work or tempfile.mkdtemp(prefix=f"finetune-preview-{job.name}-"))
    try:
        return _gather(job, n, work, gpu, full)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _gather(job: Job, n: int, work: Path, gpu: str | None = None, full: bool = False) -> Preview:
    from runner.model.load import load_tokenizer

    spec, d, places = job.spec, job.spec.dataset, job.places
    data_path = store.download(places.data, work / "data")
    read = sampled.read(data_path, d, full=full, cache_dir=work / "rows", seed=spec.training.seed)
    rows = read.rows
    model_dir = store.download(places.model, work / "model", allow_patterns=TOKENIZER_FILES)
    tokenizer = load_tokenizer(model_dir, spec.model)
    columns = list(rows.column_names)
    eval_rows, eval_note, total = None, None, read.total
    if d.eval_source:
        eval_note = f"from {d.eval_source} (not read by preview)"
    elif d.eval_split:
        eval_note = f"split {d.eval_split!r} of the source (not read by preview)"
    elif d.eval_fraction and not read.sampled:
        parts = rows.train_test_split(test_size=d.eval_fraction, seed=spec.training.seed)
        rows, eval_rows = parts["train"], len(parts["test"])
        total = len(rows)
        eval_note = f"{eval_rows} rows held out (dataset.evalFraction {d.eval_fraction})"
    elif d.eval_fraction:
        eval_rows = math.ceil(total * d.eval_fraction)
        total -= eval_rows
        eval_note = f"about {eval_rows:,} rows held out (dataset.evalFraction {d.eval_fraction})"
    tokens, formatter = sampled.tokenize(sampled.Rows(rows, total, read.first), d, tokenizer, work=work)
    scale = total / max(len(rows), 1)
    est = (lambda x: total if x == len(rows) else round(x * scale))  # noqa: E731 - counts in the sample -> all
    masked = formatter.fmt != "text"
    lengths = tokens.data.column("full_length").to_pylist()
    kept = [min(x, d.max_length) for x in lengths]
    trained = tokens.data.column("trained").to_pylist()
    cut = sum(1 for x in trained if x == 0) if masked else 0
    empty = _empty_completions(rows, formatter) if masked else 0
    examples = [_example(tokenizer, tokens[i]["input_ids"], tokens[i]["completion_mask"] if masked else None,
                         lengths[i]) for i in range(min(n, len(rows)))]
    t = spec.training
    processes = max(getattr(getattr(spec, "resources", None), "gpus", 1) or 1, 1)
    packed = est(pack_rows(kept, d.max_length)) if d.packing else None
    batches = math.ceil((packed or total) / (t.batch_size * processes))
    per_epoch = max(batches // t.gradient_accumulation_steps, 1)
    total_steps = t.max_steps or math.ceil(t.epochs * per_epoch)
    p = Preview(
        name=job.name, source=d.source, split=d.split, columns=columns, fmt=formatter.fmt,
        fmt_reason=format_reason(job, formatter), tokenizer_source=spec.model.source, rows=total,
        eval_rows=eval_rows, eval_note=eval_note, masked=masked, max_length=d.max_length, lengths=lengths,
        truncated=est(sum(1 for x in lengths if x > d.max_length)), completion_cut=est(cut),
        empty_completion=est(empty), trained_tokens=round(sum(trained) * scale), packing=d.packing,
        packed_rows=packed, batch=t.batch_size, sample=read.note(), scale=scale,
        accumulation=t.gradient_accumulation_steps, processes=processes, steps_per_epoch=per_epoch,
        total_steps=total_steps, epochs=t.epochs, examples=examples,
    )
    p.warnings = warnings_for(p, tokenizer, add_eos=d.add_eos)
    p.estimate = _estimate(job, p, model_dir, gpu)
    return p


def _estimate(job: Job, p: Preview, model_dir: Path, gpu: str | None) -> Estimate:
    """The cost on `gpu` (else the spec's GPU kind): this data's tokens after packing, the model's config."""
    from runner.train import estimate

    data = estimate.DataSize.of(p.lengths, examples=p.rows, max_length=p.max_length, packing=p.packing,
                                batch=p.batch, packed_rows=p.packed_rows)
    return estimate.for_job(job.spec, gpu, model_dir=model_dir, data=data, total_steps=p.total_steps)


def format_reason(job: Job, formatter) -> str:
    d = job.spec.dataset
    if d.format != "auto":
        return "set by dataset.format"
    if d.template.prompt or d.template.completion:
        return "from dataset.template.prompt/completion"
    if d.template.text:
        return "from dataset.template.text"
    return "inferred from the column" + ("s " if len(formatter.columns_used) > 1 else " ") + \
        ", ".join(formatter.columns_used)


def _example(tokenizer, ids: list[int], mask: list[int] | None, full: int) -> Example:
    """The tokens decoded in runs of equal mask. Each run is the difference of two prefix decodes, so the
    spaces between runs stay where the tokenizer puts them."""
    flags = mask if mask is not None else [1] * len(ids)
    runs: list[list[int]] = []  # [start, end, flag]
    for i, f in enumerate(flags):
        if runs and runs[-1][2] == f:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, f])
    segments, before = [], ""
    for start, end, flag in runs:
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(before):
            piece = text[len(before):]
        else:
            piece = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        segments.append((piece, bool(flag)))
        before = text
    return Example(segments, len(ids), full, sum(flags))


def _empty_completions(rows, formatter) -> int:
    empty = 0
    for i in range(min(len(rows), _MAX_CHECKED_ROWS)):
        try:
            ex = formatter.render(rows[i])
        except Exception:  # noqa: BLE001 - tokenize() already raised for rows that cannot be formatted
            continue
        if ex.trainable is not None and not any(ex.text[a:b].strip() for a, b in ex.trainable):
            empty += 1
    return empty


def pack_rows(lengths: list[int], capacity: int) -> int:
    """Rows of `capacity` tokens that best-fit-decreasing packing (trl's "bfd") fills with these examples."""
    spaces: list[int] = []  # free space of the rows not yet full, sorted
    rows = 0
    for n in sorted(lengths, reverse=True):
        i = bisect.bisect_left(spaces, n)
        if i < len(spaces):
            left = spaces.pop(i) - n
        else:
            rows, left = rows + 1, capacity - n
        if left > 0:
            bisect.insort(spaces, left)
    return rows


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def warnings_for(p: Preview, tokenizer, *, add_eos: bool) -> list[str]:
    out = []
    ordered = sorted(p.lengths)
    if p.completion_cut == p.rows and p.masked:
        out.append(f"ERROR: maxLength {p.max_length} cuts every example's completion (examples are "
                   f"{ordered[0]}-{ordered[-1]} tokens, median {percentile(ordered, 0.5)}); `run` would stop "
                   f"at Downloading. Raise dataset.maxLength (to {percentile(ordered, 0.95)} keeps 95% whole) "
                   "or shorten the prompts.")
    elif p.completion_cut:
        out.append(f"{p.completion_cut} example(s) lose their whole completion to maxLength {p.max_length}: "
                   "they add no loss")
    if p.truncated and p.completion_cut != p.rows:
        out.append(f"{p.truncated} of {p.rows} examples ({100 * p.truncated / p.rows:.1f}%) are longer than "
                   f"maxLength {p.max_length} and lose their end; maxLength {percentile(ordered, 0.95)} keeps "
                   f"95% whole, {ordered[-1]} keeps all")
    if p.empty_completion:
        out.append(f"{p.empty_completion} example(s) have an empty completion: they train only on "
                   + ("the EOS token" if add_eos else "nothing"))
    if add_eos and not tokenizer.eos_token:
        out.append("the tokenizer has no EOS token: the model will not learn where an answer ends")
    if p.total_steps < 10:
        out.append(f"only {p.total_steps} optimizer step(s): raise training.epochs or lower training.batchSize")
    return out


# ------------------------------------------------------------------------------------------ rendering
def render(p: Preview, *, color: bool, width: int = 100) -> str:
    c = _Colors(color)
    out = [c.bold(f"Preview of FineTuneJob {p.name}"), ""]
    rows = [
        ("data", f"{p.source} (split {p.split}): {p.rows} training rows; columns {', '.join(p.columns)}"),
        ("format", f"{p.fmt} ({p.fmt_reason})"),
        ("loss", "on the completion only (prompt tokens are context)" if p.masked else "on every token"),
        ("tokenizer", f"{p.tokenizer_source} (tokenizer files only; no weights read)"),
    ]
    if p.eval_note:
        rows.append(("eval", p.eval_note))
    out += _table(c, rows)
    legend = (f"{c.green('green')}: trained on (carries loss) · {c.dim('grey')}: context only (no loss)" if color
              else f"{OPEN}…{CLOSE}: trained on (carries loss) · the rest: context only (no loss)")
    out += ["", c.bold(f"Examples as the model sees them ({len(p.examples)} of {p.rows})") + "  " + legend]
    for i, ex in enumerate(p.examples, 1):
        head = f"── example {i} · {ex.tokens} tokens, {ex.trained_tokens} trained "
        out += ["", c.dim(head + "─" * max(width - len(head), 3))]
        text = "".join(c.green(s) if trained else c.dim(s) for s, trained in ex.segments) if color else \
            "".join(f"{OPEN}{s}{CLOSE}" if trained else s for s, trained in ex.segments)
        out += ["  " + ln for ln in text.split("\n")]
        if ex.full_tokens > ex.tokens:
            out.append(c.yellow(f"  ✂ cut at maxLength {p.max_length}: {ex.full_tokens - ex.tokens} of "
                                f"{ex.full_tokens} tokens dropped"))
    out += ["", c.bold("Token lengths")] + ["  " + ln for ln in length_lines(p, c)]
    out += ["", c.bold("Training")] + ["  " + ln for ln in training_lines(p)]
    if p.estimate is not None:
        from runner.train.estimate import lines

        out += ["", c.bold("Cost estimate")] + ["  " + ln for ln in lines(p.estimate)]
    if p.warnings:
        out += ["", c.bold(c.yellow("Warnings"))]
        out += [c.yellow("  ! ") + w for w in p.warnings]
    return "\n".join(out) + "\n"


def length_lines(p: Preview, c=None) -> list[str]:
    c = c or _Colors(False)
    s = sorted(p.lengths)
    lines = ([p.sample] if p.sample else []) + [
             f"{'a sample of ' if p.sample else ''}{len(s)} examples: min {s[0]} · median {percentile(s, 0.5)} · "
             f"mean {statistics.fmean(s):.1f} · p95 {percentile(s, 0.95)} · max {s[-1]} · maxLength {p.max_length}",
             f"cut at maxLength: {'about ' if p.sample else ''}{p.truncated} ({100 * p.truncated / p.rows:.1f}%)"
             + (f", {p.completion_cut} lose their whole completion" if p.completion_cut else ""), ""]
    return lines + histogram(s, p.max_length, c)


def histogram(lengths: list[int], max_length: int, c=None, *, bins: int = 10, width: int = 40) -> list[str]:
    c = c or _Colors(False)
    lo, hi = min(lengths), max(lengths)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts: dict[int, int] = {}
    for x in lengths:
        counts[(x - lo) // step] = counts.get((x - lo) // step, 0) + 1
    top = max(counts.values())
    label = len(str(hi)) * 2 + 1
    out = []
    for b in range((hi - lo) // step + 1):
        a, z = lo + b * step, lo + (b + 1) * step - 1
        n = counts.get(b, 0)
        bar = "█" * max(round(width * n / top), 1 if n else 0)
        span = (f"{a}-{z}" if step > 1 else f"{a}").rjust(label)
        note = ""
        if a > max_length:
            bar, note = c.yellow(bar.replace("█", "▒")), c.yellow("  cut") if n else ""
        elif z >= max_length:
            note = c.yellow(f"  ◀ maxLength {max_length}")
        out.append(f"{span} │{bar} {n}{note}")
    return out


def training_lines(p: Preview) -> list[str]:
    lines = []
    if p.packing:
        per_row = p.rows / max(p.packed_rows or 1, 1)
        lines.append(f"packing on: about {per_row:.1f} examples per {p.max_length}-token row -> {p.packed_rows} "
                     "rows (if the model keeps packed examples apart; the plan at Training says)")
    else:
        lines.append(f"packing off: {p.rows} rows, each padded to the longest in its batch")
    procs = f" × {p.processes} processes" if p.processes > 1 else ""
    lines.append(f"{p.steps_per_epoch} optimizer steps per epoch (batch {p.batch} × accumulation "
                 f"{p.accumulation}{procs}); {p.total_steps} steps in all"
                 + ("" if p.total_steps != math.ceil(p.epochs * p.steps_per_epoch) else f" ({p.epochs:g} epochs)"))
    kept = round(sum(min(x, p.max_length) for x in p.lengths) * p.scale)
    lines.append(f"{kept:,} tokens per epoch, {p.trained_tokens:,} of them trained on "
                 f"({100 * p.trained_tokens / max(kept, 1):.0f}%)")
    return lines


def _table(c, rows: list[tuple[str, str]]) -> list[str]:
    pad = max(len(k) for k, _ in rows)
    return ["  " + c.dim(k.ljust(pad)) + "  " + v for k, v in rows]


class _Colors:
    def __init__(self, on: bool):
        self.on = on

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on and text else text

    def bold(self, t: str) -> str:
        return self._wrap("1", t)

    def dim(self, t: str) -> str:
        return self._wrap("2", t)

    def green(self, t: str) -> str:
        return self._wrap("32", t)

    def yellow(self, t: str) -> str:
        return self._wrap("33", t)
