"""A training step without host synchronisations: what is only logged stays on the device until it is logged.

trl's SFTTrainer and transformers' Trainer read values back from the GPU every micro-batch, only to log them: trl's
entropy, token accuracy and token count (`.item()`, `num_valid > 0`), the Trainer's NaN/inf check of the loss
(`logging_nan_inf_filter`) and its count of the input tokens seen (moved to the device, gathered, `.item()`). Each
read waits for the GPU to finish everything queued, and the CPU loses its lead over the GPU. `NoHostSyncs`, a mixin
before trl's SFTTrainer (runner/train/fsdp.py's QLoRATrainer), owns the replacement:

  loss            computed with trl's own tensor operations (the plain path: no compute_loss_func, label smoothing,
                  sequence parallelism, MoE aux loss or return_outputs; those go to trl as they are), so losses and
                  gradients are bit-equal. A non-finite micro-batch loss is replaced on the device as the Trainer's
                  filter does (by the mean of the window's others), counted there, and reported with the next log
                  (`nonfinite_losses`): set `logging_nan_inf_filter=False` in the arguments, this filter replaces it.
  entropy, mean_token_accuracy, num_tokens
                  each micro-batch's sums kept on the device; at a log they are gathered across ranks (two
                  collectives instead of three a micro-batch) and read in one go, giving trl's numbers: the mean
                  over micro-batches of each one's ratio of the ranks' sums.
  num_input_tokens_seen
                  counted on the host when a batch is collated (`CountingCollator`, CPU memory, in the data loader),
                  the Trainer's `non_padding`/`all` count exactly; one process adds it to the state at once (exact
                  after every step), several add their own and settle the other ranks' at every log and checkpoint.

A padding-free batch on the varlen path also skips transformers' attention-mask preparation, which reads back
once per forward (runner/model/attention.py `ready_mask`).

The pending values are read at every log, before an evaluation and before every checkpoint's state is saved, and
every FLUSH_EVERY micro-batches (which bounds the memory they hold). All ranks read at the same points: under
several processes the reads are collectives. The evaluation loop is left to trl as it is.
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch

from runner.model import attention as attention_kernels

# The host count of a batch's input tokens, put into the batch by CountingCollator and taken out before the model.
TOKENS_KEY = "finetune_input_tokens"
FLUSH_EVERY = 256  # micro-batches between reads when no log comes sooner


class CountingCollator:
    """A collator that adds the batch's input-token count, counted on the host as the Trainer's
    `include_num_input_tokens_seen` counts it on the device (`non_padding`: the attention mask's ones, else the
    tokens other than the pad token; `all`: every token)."""

    def __init__(self, collate, main_input: str, pad_id: int | None, non_padding: bool) -> None:
        self.collate, self.main_input, self.pad_id, self.non_padding = collate, main_input, pad_id, non_padding

    def __call__(self, examples):
        batch = self.collate(examples)
        ids = batch.get(self.main_input) if isinstance(batch, MutableMapping) else None
        if not isinstance(ids, torch.Tensor) or ids.is_cuda:
            return batch  # not countable here: the Trainer counts it
        mask = batch.get("attention_mask")
        if not self.non_padding:
            batch[TOKENS_KEY] = ids.numel()
        elif isinstance(mask, torch.Tensor):
            batch[TOKENS_KEY] = int(mask.sum())
        elif self.pad_id is not None:
            batch[TOKENS_KEY] = int((ids != self.pad_id).sum())
        else:
            batch[TOKENS_KEY] = ids.numel()
        return batch


@dataclass
class Pending:
    """What the micro-batches since the last read left on the device (or counted on the host)."""

    valid: list = field(default_factory=list)  # tokens with a label, per micro-batch (device, int64)
    correct: list = field(default_factory=list)  # of them, the top-1 prediction is the label
    entropy: list = field(default_factory=list)  # entropy summed over them
    tokens: list = field(default_factory=list)  # trl's count of the micro-batch's tokens (host int or device)
    seen: int = 0  # this rank's input tokens not yet settled across ranks (several processes only)
    nonfinite: torch.Tensor | None = None  # micro-batch losses that were NaN/inf since the last logged loss

    def __len__(self) -> int:
        return len(self.valid)


class NoHostSyncs:
    """Mixin for trl's SFTTrainer (before it in the bases): the training step reads nothing back from the device;
    the logged values are read at logs and checkpoints (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending = Pending()
        self._batch_tokens: dict[int, int] = {}  # id(batch) -> its host count, from fetch to tracking

    # ------------------------------------------------------------------------------- input tokens seen
    def get_train_dataloader(self):
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return super().get_train_dataloader()
        plain = self.data_collator
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        self.data_collator = CountingCollator(plain, getattr(self.model, "main_input_name", "input_ids"), pad_id,
                                              non_padding=mode == "non_padding")
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = plain  # evaluation batches are collated as they were

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        for batch in batches:
            if isinstance(batch, MutableMapping) and TOKENS_KEY in batch:
                self._batch_tokens[id(batch)] = batch.pop(TOKENS_KEY)  # the model never sees it
        return batches, num_items

    def _track_num_input_tokens(self, inputs):
        count = self._batch_tokens.pop(id(inputs), None)
        if count is None:  # collated elsewhere: the Trainer counts it on the device
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += count
        if self.accelerator.num_processes > 1:
            self._pending.seen += count  # the other ranks' counts come at the next read

    # ------------------------------------------------------------------------------------- the loss
    def _trl_handles(self, return_outputs: bool) -> bool:
        """The compute_loss branches this mixin leaves to trl as they are."""
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (not self.model.training or return_outputs or self.aux_loss_enabled
                or self.compute_loss_func is not None
                or (self.label_smoother is not None and self.args.loss_type == "nll")
                or bool(getattr(parallelism, "sp_enabled", False)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._trl_handles(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "attention_mask" not in inputs and "position_ids" not in inputs:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        inputs["use_cache"] = False
        # trl's SFTTrainer.compute_loss, its tensor operations unchanged
        mask = attention_kernels.ready_mask(inputs, self.model.config._attn_implementation)
        outputs = model(**inputs, fused_lm_head=True, **({} if mask is None else {"attention_mask": mask}))
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        if self.args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # what trl reads back here every micro-batch, kept on the device
        pending = self._pending
        pending.valid.append(outputs.label_mask.sum())
        pending.entropy.append(outputs.entropy.detach().sum())
        pending.correct.append(outputs.is_top1.sum())
        pending.tokens.append(inputs["attention_mask"].sum() if "attention_mask" in inputs
                              else inputs["position_ids"].size(1))
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        window = getattr(self, "_tr_loss", None)
        if window is None:
            return loss
        # the Trainer's logging_nan_inf_filter, on the device: a NaN/inf loss adds the mean of the window's others
        finite = torch.isfinite(loss)
        pending = self._pending
        if pending.nonfinite is None:
            pending.nonfinite = torch.zeros((), dtype=torch.int64, device=loss.device)
        pending.nonfinite += ~finite
        if len(pending) >= FLUSH_EVERY:
            self._read_pending()
        return torch.where(finite, loss, window / (1 + self.state.global_step - self._globalstep_last_logged))

    # -------------------------------------------------------------------------------------- reading
    def _read_pending(self) -> None:
        """Read what the micro-batches left: trl's metrics into its lists, the tokens seen into the state. A
        collective under several processes: every rank calls it at the same point."""
        pending, device = self._pending, self.args.device
        if self.accelerator.num_processes > 1:
            seen = torch.tensor(pending.seen, dtype=torch.int64, device=device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum()) - pending.seen
            pending.seen = 0
        if not pending.valid:
            return
        n, world = len(pending), self.accelerator.num_processes
        counts = torch.stack([torch.stack(pending.valid), torch.stack(pending.correct),
                              torch.stack([torch.as_tensor(t, device=device) for t in pending.tokens])])
        counts = self.accelerator.gather(counts).view(world, 3, n).sum(0)
        entropy = self.accelerator.gather(torch.stack(pending.entropy)).view(world, n).sum(0)
        valid, correct, tokens = counts
        some = valid > 0
        read = torch.stack([torch.where(some, entropy / valid, 0.0).double(),  # float32 -> float64: exact
                            torch.where(some, correct / valid, 0.0).double(), tokens.double()]).tolist()
        entropies, accuracies, tokens = read[0], read[1], [int(t) for t in read[2]]
        metrics = self._metrics["train"]
        metrics["entropy"].extend(entropies)
        metrics["mean_token_accuracy"].extend(accuracies)
        for count in tokens:
            self._total_train_tokens += count // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        pending.valid, pending.correct, pending.entropy, pending.tokens = [], [], [], []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._read_pending()
        nonfinite = self._pending.nonfinite
        if "loss" in logs and nonfinite is not None:
            every = self.accelerator.gather(nonfinite.reshape(1)) if self.accelerator.num_processes > 1 else nonfinite
            count = int(every.sum())
            nonfinite.zero_()
            if count:
                logs["nonfinite_losses"] = count
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        self._read_pending()  # trl logs the tokens trained on so far with the evaluation
        return super().evaluate(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self._read_pending()  # the state saved with the checkpoint counts every token trained on
        super()._save_checkpoint(model, trial)
