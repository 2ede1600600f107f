"""The training step without host synchronisations (runner/train/host_syncs.py), on a tiny real Llama in 4 bits
trained by make_trainer's trl SFTTrainer: inside every optimizer step (its micro-batches' forward, loss, backward,
token counting, clipping, optimizer) nothing is read back from a tensor, and between steps only at logs; what is
logged (loss, gradient norm, entropy, token accuracy, token counts) and the trained adapter equal trl's own
compute_loss path with the Trainer's NaN/inf filter, bit for bit, packed and padded, a NaN loss included, on one
process and on two (torchrun, gloo); the tokens seen after a resume from a checkpoint equal an uninterrupted run's."""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter

import pytest
import torch

from runner.train import host_syncs

READS = ("item", "__bool__", "tolist", "__float__", "__int__")
LOGGED = ("loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens",
          "num_input_tokens_seen", "train_loss", "nonfinite_losses")


class _TrlAsItIs:
    """In place of NoHostSyncs: the trainer computes and logs as trl and the Trainer do."""


_DATA: dict = {}


def _data(model, n: int = 24, seed: int = 0):
    """Greedy continuations of random prompts by the model itself, of different lengths: the model predicts most
    completion tokens at first (token accuracy and entropy are far from trivial, and change as it trains)."""
    key = (model.config.name_or_path, n, seed)
    if key not in _DATA:
        _DATA[key] = _generate(model, n, seed)
    return _DATA[key]


def _generate(model, n: int, seed: int):
    import datasets

    from runner.data.dataset import TokenizedData

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "completion_mask": []}
    with torch.no_grad():
        for _ in range(n):
            prompt = torch.randint(10, model.config.vocab_size, (1, int(torch.randint(4, 12, (1,), generator=g))),
                                   generator=g)
            length = int(torch.randint(24, 64, (1,), generator=g))
            out = model.generate(prompt, max_new_tokens=length - prompt.shape[1], min_new_tokens=length - prompt.shape[1],
                                 do_sample=False, pad_token_id=0)
            ids = out[0].tolist()
            rows["input_ids"].append(ids)
            rows["completion_mask"].append([0] * prompt.shape[1] + [1] * (len(ids) - prompt.shape[1]))
    lengths = [len(r) for r in rows["input_ids"]]
    return TokenizedData(datasets.Dataset.from_dict(rows), None, "prompt-completion", lengths, 0, True)


def _trainer(tiny_llama, out, *, packing: bool, as_trl: bool = False, hook=None, callbacks=(), attention="sdpa",
             **overrides):
    from runner.model import load as model_load
    from runner.train.plan import Machine, make_plan
    from runner.train.trainer import make_trainer
    from tests.runner.train.test_plan import _spec

    spec = _spec(tiny_llama, dataset={"maxLength": 64},
                 training={"batchSize": 2, "gradientAccumulationSteps": 2, "gradientCheckpointing": None})
    plan = dataclasses.replace(make_plan(spec, tiny_llama, Machine(processes=1)), packing=packing)
    torch.manual_seed(0)
    base = model_load.load_base(tiny_llama, spec.model, spec.quantization, compute=torch.float32, attention=attention)
    model = model_load.add_lora(base, spec.lora)
    data = _data(model)
    for name, p in model.named_parameters():  # LoRA B starts at zero: every adapter tensor moves from the start
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if hook is not None:
        model.get_base_model().model.norm.register_forward_hook(hook)
    tok = model_load.load_tokenizer(tiny_llama, spec.model)
    kw = dict(max_steps=6, logging_steps=3, save_strategy="no", dataloader_num_workers=0)
    kw.update(overrides)
    if as_trl:
        kw["logging_nan_inf_filter"] = True  # what the runner set before
    real = host_syncs.NoHostSyncs
    host_syncs.NoHostSyncs = _TrlAsItIs if as_trl else real
    try:
        trainer = make_trainer(spec, model, tok, data, out, plan, callbacks=callbacks, **kw)
    finally:
        host_syncs.NoHostSyncs = real
    assert isinstance(trainer, real) != as_trl and type(trainer).__name__ == "QLoRATrainer"
    return trainer


def _logged(trainer) -> list[dict]:
    return [{k: v for k, v in entry.items() if k in LOGGED or k == "step"} for entry in trainer.state.log_history]


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------- host reads
class _Reads:
    """Counts the reads of a tensor's value on the host (item, bool, tolist, float, int), by phase of training:
    ("step", k) from step k's on_step_begin to its on_step_end (its micro-batches and optimizer step), ("after", k)
    from there to the next step's begin (logging, saving, the next batches' fetch). Reads made by the data loader
    while it collates a batch (host memory; on a GPU, in its worker processes) and by transformers' attention-mask
    preparation inside the model's forward are counted apart."""

    def __init__(self) -> None:
        self.phase: tuple = ("setup", 0)
        self.counts: Counter = Counter()
        self.forward_mask: Counter = Counter()

    def callback(self):
        from transformers import TrainerCallback

        reads = self

        class Phases(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                reads.phase = ("step", state.global_step + 1)

            def on_step_end(self, args, state, control, **kw):
                reads.phase = ("after", state.global_step)

        return Phases()

    def wrap(self, monkeypatch) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, **kwargs):
                self._count()
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, read)

    def _count(self) -> None:
        frame = sys._getframe(2)
        files = []
        while frame is not None:
            files.append(frame.f_code.co_filename.replace("\\", "/"))
            frame = frame.f_back
        if any("/torch/utils/data/" in f for f in files):
            return  # the data loader, collating on the host
        if any(f.endswith("tests/runner/model/test_attention.py") for f in files):
            return  # the CPU stand-in of the varlen kernel (a CUDA kernel reads nothing back)
        if files[0].endswith("transformers/masking_utils.py"):
            self.forward_mask[self.phase] += 1
            return
        self.counts[self.phase] += 1


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_no_host_reads_inside_a_step_and_between_steps_only_at_logs(tiny_llama, tmp_path, monkeypatch, packing):
    """6 optimizer steps of 2 micro-batches, logged at steps 1, 3 and 6: 0 reads inside every step; after a step
    0 reads unless it logs, 4 when it logs (the Trainer's loss and gradient norm, the pending metrics in one read,
    the count of non-finite losses), 1 more at the end (the Trainer's train_loss). trl's own compute_loss and the
    Trainer's filter and token count read 8 times a micro-batch. The model's forward reads up to twice more, in
    transformers' attention-mask preparation (masking_utils), counted apart."""
    reads = _Reads()
    trainer = _trainer(tiny_llama, tmp_path / "run", packing=packing, callbacks=[reads.callback()])
    reads.wrap(monkeypatch)
    trainer.train()
    monkeypatch.undo()
    inside = {k: reads.counts[("step", k)] for k in range(1, 7)}
    after = {k: reads.counts[("after", k)] for k in range(1, 7)}
    assert trainer.state.global_step == 6
    assert inside == {k: 0 for k in range(1, 7)}
    assert after == {1: 4, 2: 0, 3: 4, 4: 0, 5: 0, 6: 5}
    assert {phase for phase, _ in reads.forward_mask} <= {"step"}  # at most 2 a micro-batch, inside the steps
    assert max(reads.forward_mask.values()) <= 4


def test_packed_batches_on_the_varlen_path_skip_the_mask_preparation_and_its_reads(tiny_llama, tmp_path, monkeypatch):
    """As above, on the varlen attention path (its CUDA kernel replaced on CPU by tests/runner/model/test_attention.py's
    reference): transformers' mask preparation, and with it every read inside the steps, is gone."""
    from runner.model import attention
    from tests.runner.model.test_attention import cpu_varlen_attn
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", cpu_varlen_attn)
    monkeypatch.setattr(attention, "_PARAMS", {"window_size", "enable_gqa", "scale"})
    reads = _Reads()
    trainer = _trainer(tiny_llama, tmp_path / "run", packing=True, callbacks=[reads.callback()],
                       attention=attention.NAME)
    assert trainer.model.config._attn_implementation == attention.NAME
    reads.wrap(monkeypatch)
    trainer.train()
    assert trainer.state.global_step == 6
    assert {k: reads.counts[("step", k)] for k in range(1, 7)} == {k: 0 for k in range(1, 7)}
    assert sum(reads.forward_mask.values()) == 0
    assert all(e.get("loss") is None or e["loss"] == e["loss"] for e in trainer.state.log_history)  # finite


# ----------------------------------------------------------------------------------------- same numbers
def _nan_at_fourth_forward():
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 4 else output

    return hook


@pytest.mark.parametrize("packing,nan,flush_every", [(True, False, None), (False, False, None), (True, True, None),
                                                     (True, False, 3)],
                         ids=["packed", "padded", "packed-nan-loss", "packed-read-every-3-micro-batches"])
def test_logged_values_and_adapter_equal_trls_own_path(tiny_llama, tmp_path, monkeypatch, packing, nan, flush_every):
    if flush_every is not None:  # the pending values also read between logs, as a long logging interval does
        monkeypatch.setattr(host_syncs, "FLUSH_EVERY", flush_every)
    runs = {}
    for as_trl in (True, False):
        trainer = _trainer(tiny_llama, tmp_path / str(as_trl), packing=packing, as_trl=as_trl,
                           hook=_nan_at_fourth_forward() if nan else None)
        finite = []
        compute_loss = trainer.compute_loss

        def spy(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            finite.append(bool(torch.isfinite(loss)))
            return loss

        trainer.compute_loss = spy
        trainer.train()
        runs[as_trl] = (_logged(trainer), _adapter(trainer), trainer.state.num_input_tokens_seen)
    (trl_logs, trl_adapter, trl_seen), (logs, adapter, seen) = runs[True], runs[False]
    if nan:  # the 4th micro-batch (step 2) is NaN, and all after it: the weights are NaN from step 2 on
        reported = [e.get("nonfinite_losses") for e in logs]
        assert finite[:3] == [True] * 3 and not finite[3]
        assert reported == [None, finite[2:6].count(False), finite[6:].count(False), None]  # with their loss
        logs = [{k: v for k, v in e.items() if k != "nonfinite_losses"} for e in logs]
        assert all(torch.isnan(p).any() for p in adapter.values())
    else:
        assert all(e.get("nonfinite_losses") is None for e in logs)
        assert {k for e in logs for k in e} == set(LOGGED) - {"nonfinite_losses"} | {"step"}
        accuracies = [e["mean_token_accuracy"] for e in logs if "mean_token_accuracy" in e]
        assert len(set(accuracies)) == 3 and all(0 < a < 1 for a in accuracies)
    assert json.dumps(logs) == json.dumps(trl_logs)  # every value, bit for bit (NaN included)
    assert [e["step"] for e in logs] == [1, 3, 6, 6]
    assert seen == trl_seen == logs[-1]["num_input_tokens_seen"] > 0
    assert adapter.keys() == trl_adapter.keys()
    for name in adapter:
        assert torch.equal(adapter[name], trl_adapter[name]) or (nan and torch.equal(adapter[name].isnan(),
                                                                                     trl_adapter[name].isnan()))


# ---------------------------------------------------------------------------------------------- resume
def test_tokens_seen_after_a_resume_equal_an_uninterrupted_runs(tiny_llama, tmp_path):
    """Checkpoint at step 2 (not a logging step), resumed to step 6."""
    whole = _trainer(tiny_llama, tmp_path / "whole", packing=True, save_strategy="steps", save_steps=2,
                     save_total_limit=None)
    whole.train()
    state2 = json.loads((tmp_path / "whole" / "checkpoint-2" / "trainer_state.json").read_text())
    first = _trainer(tiny_llama, tmp_path / "first", packing=True, save_strategy="steps", save_steps=2, max_steps=2)
    first.train()
    assert 0 < state2["num_input_tokens_seen"] == first.state.num_input_tokens_seen < whole.state.num_input_tokens_seen
    resumed = _trainer(tiny_llama, tmp_path / "first", packing=True, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert resumed.state.num_input_tokens_seen == whole.state.num_input_tokens_seen

    def seen_after_2(trainer):
        return [(e["step"], e["num_input_tokens_seen"]) for e in _logged(trainer) if e["step"] > 2]

    assert seen_after_2(resumed) == seen_after_2(whole) and len(seen_after_2(whole)) == 3  # steps 3, 6, the end


# ------------------------------------------------------------------------------------- two processes
def test_two_data_parallel_processes_log_and_train_as_trls_own_path(tiny_llama, tmp_path):
    """torchrun, 2 processes (gloo on CPU), packed and padded: the metrics gathered across the ranks at each log
    and the tokens seen (settled across the ranks before a checkpoint at a step that does not log) equal trl's
    per-micro-batch gathers, bit for bit, and so does the adapter."""
    import os
    import subprocess

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for path in ("trl", "ours"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
             "tests.runner.train.test_host_syncs", path, str(tiny_llama), str(tmp_path / path)],
            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for packing in ("packed", "padded"):
        trl = json.loads((tmp_path / "trl" / f"{packing}.json").read_text())
        ours = json.loads((tmp_path / "ours" / f"{packing}.json").read_text())
        assert ours["world"] == 2 and ours["logs"][-1]["num_input_tokens_seen"] > 0
        assert ours == trl


def _two_processes(path: str, tiny_llama: str, out: str) -> None:
    """One rank of the test above: trains 6 steps (checkpoint at step 2) and rank 0 writes what it logged."""
    import hashlib
    import os
    from pathlib import Path

    for packing in (True, False):
        run = Path(out) / ("packed" if packing else "padded")
        trainer = _trainer(Path(tiny_llama), run, packing=packing, as_trl=path == "trl", save_strategy="steps",
                           save_steps=2, save_total_limit=None)
        trainer.train()
        if int(os.environ.get("RANK", "0")) == 0:
            adapter = _adapter(trainer)
            state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
            run.with_suffix(".json").write_text(json.dumps({
                "world": trainer.accelerator.num_processes, "logs": _logged(trainer),
                "seen": trainer.state.num_input_tokens_seen, "seenAtCheckpoint2": state["num_input_tokens_seen"],
                "adapter": hashlib.sha256(b"".join(adapter[k].float().numpy().tobytes() for k in sorted(adapter)))
                .hexdigest(),
            }))


if __name__ == "__main__":
    _two_processes(*sys.argv[1:])
