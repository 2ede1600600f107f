"""Model phase: the base (4-bit, 8-bit or 16-bit, as quantization.bits says), its LoRA adapters, and the checks
that need only the config."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runner.model import attention as attention_kernels
from runner.model import notices
from runner.api.errors import PermanentError, INVALID_SPEC
from runner.api.spec import LoraSpec, ModelSpec, QuantizationSpec

# Output heads never get LoRA under "all-linear" (peft excludes them too).
HEADS = {"lm_head", "embed_out", "output", "score", "classifier"}


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bnb_config(q: QuantizationSpec, compute: torch.dtype, storage: torch.dtype):
    """bitsandbytes' settings for quantization.bits 4 or 8; None for 16 (no quantization)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 16:
        return None
    if q.bits == 8:  # LLM.int8: outlier features (|x| > 6) computed in 16 bits, the rest in int8
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def meta_model(model_dir: Path, m: ModelSpec):
    """The architecture on the meta device, from its config alone (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)


def is_quantized_linear(name: str, module: torch.nn.Module) -> bool:
    """The layers that are quantized (bits 4 or 8) and get LoRA: every nn.Linear but the output heads."""
    return isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in HEADS


def linear_module_names(model_dir: Path, m: ModelSpec) -> set[str]:
    """Leaf names of every nn.Linear in the architecture, found on the meta device (no weights read)."""
    return {
        name.rsplit(".", 1)[-1]
        for name, mod in meta_model(model_dir, m).named_modules()
        if is_quantized_linear(name, mod)
    }


def check_target_modules(lora: LoraSpec, available: set[str]) -> None:
    if lora.target_modules == ["all-linear"]:
        if not available:
            raise PermanentError(
                "lora.targetModules: the model has no linear layers to adapt; name its modules explicitly",
                reason=INVALID_SPEC,
            )
        return
    missing = [t for t in lora.target_modules if t not in available]
    if missing:
        raise PermanentError(
            f"lora.targetModules: {', '.join(missing)} not in this model; its linear layers are "
            f"{', '.join(sorted(available))} (or use all-linear)",
            reason=INVALID_SPEC,
        )


def load_tokenizer(model_dir: Path, m: ModelSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:  # pad with EOS (labels mask padding anyway)
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_base(model_dir: Path, m: ModelSpec, q: QuantizationSpec, *, compute: torch.dtype, attention: str,
              storage: torch.dtype = torch.uint8, load_on: torch.device | None = None):
    """The base for training, as the plan says: quantized to q.bits (4: NF4/FP4, 8: LLM.int8; 16: not at all,
    its weights in the compute dtype), compute and storage dtypes, attention kernel, and where its weights are
    put (`load_on`: this process's device, or the CPU for FSDP to shard). A base saved already in 4-bit keeps
    its own quantization settings."""
    from transformers import AutoModelForCausalLM

    if attention == attention_kernels.NAME:
        attention_kernels.register()  # make "varlen" loadable by transformers in this process
    notices.quiet()  # e.g. LLM.int8's "inputs will be cast" on every matmul (runner/model/notices.py)
    load_on = load_on or device()
    quantization = bnb_config(q, compute, storage)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        **({"quantization_config": quantization} if quantization is not None else {}),
        dtype=compute,
        device_map={"": load_on},
        trust_remote_code=m.trust_remote_code,
        attn_implementation=attention,
    )
    model.config.use_cache = False
    if load_on.type == "cpu" and q.bits == 4:
        _keep_training_layout(model)
    return model



def _keep_training_layout(model) -> None:
    """bitsandbytes repacks 4-bit weights into a CPU inference layout on the first eval-mode forward (our
    before-training samples and packing probe) and never converts back; training through that layout breaks
    autograd (in-place bias add, no input gradient). Keep the training layout on CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model, lora: LoraSpec):
    """Freeze the base (quantized or not) and add trainable adapters. Non-quantized weights keep the compute dtype (no
    fp32 upcast of the frozen base, unlike prepare_model_for_kbit_training). Gradient checkpointing is
    switched on by the trainer when chosen."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding effects), decoded without the prompt."""
    if not prompts:
        return []
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    answers = []
    dev = next(model.parameters()).device
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(dev)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    model.config.use_cache = use_cache
    model.train(was_training)
    return answers


@torch.no_grad()
def packing_is_isolated(model) -> bool:
    """Does this model keep packed examples apart when given position ids that restart per example?

    transformers builds a block-diagonal mask from restarting position ids for most architectures, but not
    all (OPT, for one, ignores them for the mask). A two-example probe on the real model tells, so packing is
    only used where no example can attend to another."""
    dev = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    a = torch.arange(5, 13, device=dev) % vocab
    b = torch.arange(20, 30, device=dev) % vocab
    flat = torch.cat([a, b])[None]
    restart = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(dev)[None]
    alone = model(input_ids=b[None]).logits[0].float()
    packed = model(input_ids=flat, position_ids=restart).logits[0, len(a):].float()
    leaked = model(input_ids=flat).logits[0, len(a):].float()  # no restart: attends across, by construction
    err = (packed - alone).abs().max()
    leak = (leaked - alone).abs().max()
    return bool(err * 10 <= leak) or bool(leak < 1e-6)
