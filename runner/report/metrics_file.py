"""report/metrics.json, published with every output: its keys, what each holds, and the renamed keys still written
under their old names for one release.

One JSON object, written once when the report is assembled (after Merging, before Uploading).

Style: the top-level keys are snake_case. Most of them are the numbers trl/transformers' Trainer reports, under
the Trainer's own names, which are also their names in `status.metrics`, the terminal's summary, TensorBoard,
MLflow and W&B: one number, one name wherever a user meets it. Renaming them would break that, and the Trainer's
set is open (another evaluation metric brings another key), so the keys the runner adds follow the Trainer's
style. The objects under a key keep the API's camelCase: `published` is `status.published` as it is, `plan`
and `merge_check` are spelled like it.

The Trainer's numbers (train_runtime, train_samples_per_second, epoch, the final evaluation's eval_* and the
others it reports) are written as it reports them, except:
    train_loss             mean training loss over every step of the run, resumed steps included
    final_train_loss       the last logged training loss (the mean since the log before it)
    eval_loss              eval loss of the published weights (with an eval set)
    last_eval_loss         the last step's eval loss, when an earlier step was published
    global_step            optimizer steps of the run
    num_input_tokens_seen  tokens trained on
What the runner adds:
    published              which step's weights were published and why: {step, choice, reason, lastStep, bestStep,
                           bestEvalLoss, stoppedEarly} (status.published)
    phase_seconds          seconds spent in Validating, Downloading, Training and Merging (Uploading ends after
                           this file is published: the result event and status.metrics.uploading_seconds have it)
    merge_check            the merge's measured errors: {method, dtype, relativeLogitError, layerRelativeError,
                           maxAbsLogitError, tolerance, maxAbsWeight} (merge.enabled only)
    plan                   the memory and speed plan: strategy, precision, micro-batch, checkpointing (the plan's
                           log line)
    format, packing, strategy, processes
                           the dataset format, whether rows were packed, the parallel strategy, the processes
    examples               training examples
    truncated_examples     examples longer than dataset.maxLength (cut)
    resumed_from           the checkpoint the last attempt resumed from, or null
    checkpoints            where the checkpoints are
    estimate               the cost estimated as training started, on this GPU and plan (status.estimate's
                           shape, camelCase; null on CPU or a GPU kind the throughput table does not know)
    tracking, tensorboard  the experiment trackers' runs {runId, url}, and report/tensorboard when written

Deprecated, written too for one release with the same values: resumedFrom, truncatedExamples, mergeCheck and
phaseSeconds; `deprecated_keys` maps each old name to its new one.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "metrics.json"  # in report/

RESUMED_FROM = "resumed_from"
TRUNCATED_EXAMPLES = "truncated_examples"
MERGE_CHECK = "merge_check"
PHASE_SECONDS = "phase_seconds"

# The old name of each renamed key, written beside the new one until the next release drops it.
DEPRECATED = {"resumedFrom": RESUMED_FROM, "truncatedExamples": TRUNCATED_EXAMPLES, "mergeCheck": MERGE_CHECK,
              "phaseSeconds": PHASE_SECONDS}
DEPRECATED_KEYS = "deprecated_keys"


def document(metrics: dict) -> dict:
    """The object metrics.json holds: `metrics`, plus each renamed key under its deprecated name too."""
    old = {was: metrics[now] for was, now in DEPRECATED.items() if now in metrics}
    out = {**metrics, **old}
    if old:
        out[DEPRECATED_KEYS] = {was: DEPRECATED[was] for was in old}
    return out


def write(report_dir: Path, metrics: dict) -> None:
    (report_dir / NAME).write_text(json.dumps(document(metrics), indent=2, sort_keys=True, default=str))
