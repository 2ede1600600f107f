"""The best checkpoint and early stopping, on the eval loss (`output.publish: best`, `training.earlyStopping`).

Every evaluation (each evalSteps, and the last step) is compared with the best eval loss so far. With
`output.publish: best` the adapter of each new best is saved aside (all ranks take part under FSDP; rank 0
writes it); every durable checkpoint carries that adapter and its step in BEST_DIR, so a resumed attempt keeps the
best of the attempts before it. Early stopping counts the evaluations in a row that do not beat the best by more
than minDelta (as transformers' EarlyStoppingCallback does) and stops training after `patience` of them, saving a
checkpoint at that step; a resumed attempt that finds it stopped early trains no further. The evaluations are
replayed from the run's history (saved in every checkpoint), so the count survives a resume too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from runner.api.spec import FineTuneJobSpec

BEST_DIR = "finetune-best"  # inside a checkpoint: the best adapter so far and BEST_FILE
BEST_FILE = "best.json"  # {"step", "evalLoss"} of that adapter; {"stoppedEarly": step} once stopped


class Best:
    """The best eval loss so far, its step and adapter, and early stopping's count."""

    def __init__(self, spec: FineTuneJobSpec, scratch: Path):
        self.keep_adapter = spec.output.publish == "best"
        self.early = spec.training.early_stopping
        self.dir = Path(scratch) / "best-adapter"
        self.step: int | None = None
        self.loss: float | None = None
        self.evaluations = 0
        self.without_improvement = 0
        self.stopped_early: int | None = None  # the step training stopped at
        self.adapter_step: int | None = None  # the step of the adapter in self.dir

    # --------------------------------------------------------------------------------- the evaluations
    def observe(self, step: int, loss: float) -> bool:
        """One evaluation; True when it is a new best (its adapter should be kept)."""
        self.evaluations += 1
        if self.early is not None:
            beats = self.loss is None or self.loss - loss > self.early.min_delta
            self.without_improvement = 0 if beats else self.without_improvement + 1
            if self.without_improvement >= self.early.patience and self.stopped_early is None:
                self.stopped_early = step
        if self.loss is None or loss < self.loss:
            self.step, self.loss = step, float(loss)
            return True
        return False

    def should_stop(self) -> bool:
        return self.stopped_early is not None

    def replay(self, history: list[dict]) -> None:
        """The evaluations of the run so far (a resumed attempt's history), in order."""
        for h in history:
            if isinstance(h.get("evalLoss"), (int, float)) and isinstance(h.get("step"), int):
                self.observe(h["step"], h["evalLoss"])

    # ------------------------------------------------------------------------------- across attempts
    def persist(self, checkpoint_dir: Path) -> None:
        """Into a local checkpoint folder (rank 0, before it goes to the durable store)."""
        target = Path(checkpoint_dir) / BEST_DIR
        if self.adapter_step is None and self.stopped_early is None:
            return
        target.mkdir(parents=True, exist_ok=True)
        if self.adapter_step is not None and self.dir.is_dir():
            for f in self.dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, target / f.name)
        state = {"step": self.adapter_step, "evalLoss": self.loss if self.adapter_step == self.step else None,
                 "stoppedEarly": self.stopped_early}
        (target / BEST_FILE).write_text(json.dumps(state))

    def restore(self, checkpoint: Path | None, *, copy: bool) -> None:
        """From a fetched checkpoint: the adapter of the best step (`copy`: into self.dir, rank 0's part) and
        whether training had stopped early. Call after replay()."""
        if checkpoint is None:
            return
        source = Path(checkpoint) / BEST_DIR
        try:
            state = json.loads((source / BEST_FILE).read_text())
        except (OSError, ValueError):
            return
        if isinstance(state.get("stoppedEarly"), int):
            self.stopped_early = state["stoppedEarly"]
        if self.keep_adapter and state.get("step") == self.step and (source / "adapter_model.safetensors").is_file():
            self.adapter_step = self.step
            if copy:
                shutil.rmtree(self.dir, ignore_errors=True)
                shutil.copytree(source, self.dir, ignore=shutil.ignore_patterns(BEST_FILE))

    # ----------------------------------------------------------------------------------- the choice
    def published(self, spec: FineTuneJobSpec, last_step: int, last_eval: float | None) -> dict:
        """Which step's weights are published, and why: metrics.json `published`, the card, the status."""
        best_known = self.step is not None
        use_best = self.keep_adapter and best_known and self.adapter_step == self.step and self.step != last_step
        step = self.step if use_best else last_step
        loss = self.loss if use_best else last_eval
        evals = f"{self.evaluations} evaluation{'s' if self.evaluations != 1 else ''}"
        if spec.output.publish == "best":
            if use_best:
                reason = (f"output.publish is best: step {self.step} had the lowest eval loss ({self.loss:.4g}) of "
                          f"{evals}" + (f"; the last step ({last_step}) had {last_eval:.4g}" if last_eval is not None
                                        else f"; training ended at step {last_step}"))
            elif best_known and self.step == last_step:
                reason = f"output.publish is best: the last step ({last_step}) had the lowest eval loss " \
                         f"({self.loss:.4g}) of {evals}"
            elif best_known:  # resumed from a checkpoint that did not carry the best adapter (publish was last)
                reason = (f"output.publish is best, but the adapter of step {self.step} (the lowest eval loss, "
                          f"{self.loss:.4g}) was not kept by the attempt that evaluated it: the last step "
                          f"({last_step}) is published")
            else:
                reason = f"output.publish is best, but no evaluation ran: the last step ({last_step}) is published"
        else:
            reason = f"output.publish is last: the weights of the last step ({last_step})"
            if best_known and self.step != last_step:
                reason += f"; the lowest eval loss ({self.loss:.4g}) of {evals} was at step {self.step}"
        if self.stopped_early is not None and self.early is not None:
            reason += (f"; training stopped early at step {self.stopped_early}: {self.early.patience} evaluation(s) "
                       f"in a row did not lower the best eval loss by more than {self.early.min_delta:g}")
        chose_best = use_best or (spec.output.publish == "best" and best_known and self.step == last_step)
        out = {"step": step, "choice": "best" if chose_best else "last", "reason": reason, "lastStep": last_step}
        if loss is not None:
            out["evalLoss"] = loss
        if best_known:
            out["bestStep"], out["bestEvalLoss"] = self.step, self.loss
        if self.early is not None:
            out["stoppedEarly"] = self.stopped_early is not None
        return out


def callback(best: Best, reporter, save_adapter):
    """The Trainer callback: `save_adapter(dir)` writes the current adapter (every rank calls it)."""
    from transformers import TrainerCallback

    class BestCheckpoint(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            was_stopped = best.should_stop()
            if best.observe(state.global_step, float(loss)) and best.keep_adapter:
                save_adapter(best.dir)
                best.adapter_step = state.global_step
            if best.should_stop() and not was_stopped:
                control.should_training_stop = True
                control.should_save = True  # durable: a resumed attempt sees that training is over
                reporter.log(f"early stopping at step {state.global_step}: the eval loss has not improved on "
                             f"{best.loss:.4g} (step {best.step}) by more than {best.early.min_delta:g} in "
                             f"{best.early.patience} evaluation(s)")

    return BestCheckpoint()
