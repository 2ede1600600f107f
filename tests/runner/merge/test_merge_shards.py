"""Merging shard by shard (runner.merge.shards through runner.merge.fold): the same weights as peft's
merge_and_unload on a 16-bit reload, for the three tiny architectures and a pre-quantized base; never more
than one base shard in memory; a loadable sharded output; the `dequantized` base option."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from runner.merge import fold as merge_phase
from runner.merge import shards as merge_shards
from runner.model import files as shard_files
from runner.api.errors import MERGE_FAILED, PermanentError
from runner.api.parse import parse_job
from tests.conftest import ARCHS, job_doc

PROMPT = "Q: What is 3 plus 4 ?\nA:"
QUANT_MARKS = ("absmax", "quant_map", "quant_state")


def _spec(model: Path, **merge):
    return parse_job(job_doc(model, "data.jsonl", "/tmp/unused", merge=merge)).spec


def _adapter(base: Path, out: Path, *, seed: int = 0, b_std: float = 0.02, **load) -> Path:
    """A peft LoRA on every linear layer with random non-zero B (as if trained), saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **load)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(out)
    return out


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def _merge(model: Path, adapter: Path, out: Path, prompts=(PROMPT,), **merge):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    probe = merge_phase.probe_inputs(tok, ["What is 5 plus 2 ?", "What is 7 plus 1 ?"])
    return merge_phase.merge(_spec(model, **merge), model, adapter, tok, probe, out, list(prompts))


def _assert_equal_within_16bit(ours: dict, ref: dict, dtype: torch.dtype) -> None:
    ulp = torch.finfo(dtype).eps  # one unit in the last place, relative
    for key, t in ours.items():
        assert t.dtype == dtype or not t.dtype.is_floating_point, key
        want = ref[key].to(dtype).float()
        # peft rounds W and the delta to 16 bits, then the sum; the shard merge only the sum, from fp32: a
        # couple of units apart, relative to the tensor's scale where W and the delta nearly cancel
        atol = ulp * float(want.abs().max())
        torch.testing.assert_close(t.float(), want, rtol=2 * ulp, atol=atol, msg=lambda m: f"{key}: {m}")


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ARCHS)
def test_shard_merge_equals_peft_merge_and_unload_on_a_16bit_reload(arch, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_models[arch]
    adapter = _adapter(base, tmp_path / "adapter")
    check = _merge(base, adapter, tmp_path / "out")
    assert check.method == "logits" and check.relative_error < merge_phase.TOLERANCE["float16"]
    assert check.layer_relative_error < 1e-3 and check.max_abs_weight > 0
    assert len(check.samples) == 1  # the merged model's answer to the eval prompt

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16), adapter)
    ref = ref.merge_and_unload()
    assert set(_tensors(tmp_path / "out")) == set(_tensors(base))  # the base's own keys, tied heads stay tied
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    _assert_equal_within_16bit(merged.state_dict(), ref.state_dict(), torch.float16)  # by the model's names
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    a, b = _logits(merged, ids), _logits(ref, ids)
    assert float((a - b).abs().mean() / b.abs().mean()) < 1e-3
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())


@pytest.fixture(scope="module")
def prequantized(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama saved already in 4-bit by transformers (bitsandbytes NF4, double quant, bf16 storage as
    under FSDP), in small shards so some quantization states lie in another shard than their weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("prequantized")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    model.save_pretrained(out, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(out)
    return out


def test_prequantized_base_is_dequantized_shard_by_shard_and_equals_peft(prequantized, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layout = shard_files.BaseFiles(prequantized)
    assert layout.sharded and len(layout.quantized) == 14  # 7 projections x 2 layers
    assert any(layout.weight_map[k] != layout.weight_map[w] for w, ks in layout.quantized.items() for k in ks)
    adapter = _adapter(prequantized, tmp_path / "adapter", device_map={"": "cpu"})
    check = _merge(prequantized, adapter, tmp_path / "out")
    assert check.method == "logits" and check.relative_error < merge_phase.TOLERANCE["float16"]

    ours = _tensors(tmp_path / "out")
    assert not [k for k in ours if any(m in k for m in QUANT_MARKS)]
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert json.loads((tmp_path / "out" / shard_files.INDEX).read_text())["weight_map"].keys() == ours.keys()
    # Today's path: transformers' dequantize() to 16 bits, then peft's merge_and_unload.
    four_bit = AutoModelForCausalLM.from_pretrained(prequantized, device_map={"": "cpu"})
    plain = AutoModelForCausalLM.from_config(four_bit.config, dtype=torch.float16)
    plain.load_state_dict(four_bit.dequantize().to(torch.float16).state_dict(), strict=False)
    ref = PeftModel.from_pretrained(plain, adapter).merge_and_unload()
    _assert_equal_within_16bit(ours, ref.state_dict(), torch.float16)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"


@pytest.fixture(scope="module")
def sharded(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama in fp32, saved in small shards (several tensors each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(out, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(out)
    return out


class _TrackedOpen:
    """safe_open whose tensors are counted while alive: the most bytes of checkpoint tensors held at once."""
    live = peak = 0

    def __init__(self, path, framework="pt", device="cpu"):
        self.f = safe_open(path, framework, device=device)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        n = t.numel() * t.element_size()
        cls = type(self)
        cls.live += n
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(t, lambda: setattr(cls, "live", cls.live - n))
        return t


def test_merge_holds_at_most_one_base_shard_plus_the_adapter(sharded, tmp_path, monkeypatch):
    import safetensors.torch

    adapter = _adapter(sharded, tmp_path / "adapter")
    for module in (shard_files, merge_shards):  # the base's shards, and the adapter
        monkeypatch.setattr(module, "safe_open", _TrackedOpen)
    for whole_file_loader in ("load_file", "load"):  # the shard merge must read tensor by tensor
        monkeypatch.setattr(safetensors.torch, whole_file_loader, lambda *a, **k: pytest.fail("whole file"))
    monkeypatch.setattr(merge_phase, "full_check_fits", lambda size, dev: False)  # as for a 70B
    _TrackedOpen.live = _TrackedOpen.peak = 0
    check = _merge(sharded, adapter, tmp_path / "out")
    assert check.method == "layers" and check.samples == []
    assert 0 < check.relative_error < 1e-3 and check.max_abs_error < 1e-3

    shards = sorted(sharded.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    assert len(shards) >= 4 and sum(p.stat().st_size for p in shards) > largest + adapter_bytes
    assert _TrackedOpen.peak > adapter_bytes // 2  # it counted what was read
    assert _TrackedOpen.peak <= largest + adapter_bytes, (_TrackedOpen.peak, largest, adapter_bytes)


def test_sharded_output_has_the_base_sharding_a_correct_index_and_loads(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _adapter(sharded, tmp_path / "adapter")
    _merge(sharded, adapter, tmp_path / "out", prompts=())
    out = tmp_path / "out"
    base_index = json.loads((sharded / shard_files.INDEX).read_text())
    index = json.loads((out / shard_files.INDEX).read_text())
    assert index["weight_map"] == base_index["weight_map"]  # same keys in the same files
    total = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert set(f.keys()) == {k for k, s in index["weight_map"].items() if s == shard}
            total += sum(f.get_tensor(k).numel() * 2 for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert not list(out.glob(".*.tmp"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float16


def test_dequantized_base_reproduces_the_trained_4bit_model_better_than_the_original(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runner.model.load import bnb_config
    from runner.train.plan import Machine, compute_dtype

    base = tiny_models["llama"]
    adapter = _adapter(base, tmp_path / "adapter")
    assert _spec(base).merge.base == "original"
    for option in ("original", "dequantized"):
        _merge(base, adapter, tmp_path / option, base=option, dtype="bfloat16")
    # The model as trained: the base in 4 bits with the job's quantization settings, plus the adapter.
    spec = _spec(base)
    compute = compute_dtype(spec, Machine.here())
    four_bit = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=bnb_config(spec.quantization, compute, torch.uint8), dtype=compute,
        device_map={"": "cpu"})
    trained = PeftModel.from_pretrained(four_bit, adapter)
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16]])
    want = _logits(trained, ids)
    err = {o: float((_logits(AutoModelForCausalLM.from_pretrained(tmp_path / o, dtype=torch.float32), ids)
                     - want).abs().mean() / want.abs().mean()) for o in ("original", "dequantized")}
    assert err["dequantized"] < err["original"] / 3, err
    assert err["dequantized"] < 1e-2, err


def test_an_overflowing_fp16_merge_fails_naming_bfloat16(tiny_models, tmp_path):
    base = tiny_models["gpt_neox"]
    adapter = _adapter(base, tmp_path / "adapter", b_std=1e6)  # |scale * B @ A| far beyond 65504
    with pytest.raises(PermanentError, match="overflows float16.*bfloat16") as e:
        _merge(base, adapter, tmp_path / "out")
    assert e.value.reason == MERGE_FAILED
    assert not list((tmp_path / "out").glob("*safetensors*"))  # it stopped; no shard, no temp file
