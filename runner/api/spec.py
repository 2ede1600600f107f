"""The FineTuneJob spec: the one typed source of truth for the runner, the controller, the CRD and the docs.

Field names are camelCase as in Kubernetes. What to train and where the result goes are here; the fields only
a cluster acts on (Secrets, volumes, resources, scheduling) are runner/api/cluster.py. The models only: reading
and checking a job file is runner/api/parse.py.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.api.cluster import ClusterFields, Section
from runner.api.places import Places


# ----------------------------------------------------------------------------------------------- model
class ModelSpec(Section):
    source: str = Field(
        description="Base model: `hf://org/name[@revision]` (Hugging Face Hub), `s3://bucket/prefix`, "
        "`gs://bucket/prefix` (Google Cloud Storage), or a local directory holding config.json, weights and "
        "tokenizer."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repo's own Python code (only for repos you trust)."
    )
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel. `auto` picks the fastest available that keeps packed examples apart: "
        "flash_attention_2 if installed, else PyTorch's varlen flash kernel on GPU, else sdpa.",
    )


# --------------------------------------------------------------------------------------------- dataset
DatasetFormat = Literal["auto", "text", "prompt-completion", "instruction", "chat"]
# dataset.chatTemplate's built-in names (their Jinja: runner/data/dataset.py, CHAT_TEMPLATES; the rendering: README).
CHAT_TEMPLATE_NAMES = ("chatml", "llama-2", "alpaca")


class DatasetColumns(Section):
    """Maps the user's column names onto the roles a format needs."""

    text: str | None = Field(None, description="Column holding whole training texts (format `text`).")
    prompt: str | None = Field(None, description="Column holding prompts (format `prompt-completion`).")
    completion: str | None = Field(
        None, description="Column holding completions (format `prompt-completion`)."
    )
    instruction: str | None = Field(None, description="Instruction column (format `instruction`).")
    input: str | None = Field(None, description="Optional input/context column (format `instruction`).")
    output: str | None = Field(None, description="Answer column (format `instruction`).")
    messages: str | None = Field(
        None, description="Column of chat messages [{role, content}] (format `chat`)."
    )


class DatasetTemplate(Section):
    """Templates with `{column}` placeholders (any column of the data), or Jinja (`{{ expr }}`)."""

    text: str | None = Field(None, description="Whole-text template; loss on every token.")
    prompt: str | None = Field(None, description="Prompt template; no loss on these tokens.")
    completion: str | None = Field(None, description="Completion template; the loss is computed here.")


class DatasetSpec(Section):
    source: str = Field(
        description="Training data: a .jsonl/.json/.csv/.parquet file or folder as a local path, "
        "`s3://bucket/key` or `gs://bucket/key`, or a Hub dataset `hf://org/name[@revision]`."
    )
    subset: str | None = Field(None, description="Hub dataset configuration name, if it has several.")
    split: str = Field("train", description="Split to train on, Hub syntax allowed: `train[:10%]`.")
    eval_source: str | None = Field(None, description="Separate evaluation data (same schemes).")
    eval_split: str | None = Field(None, description="Evaluation split of `source`, e.g. `validation`.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of the training data for evaluation."
    )
    format: DatasetFormat = Field(
        "auto",
        description="How rows become training text. `auto` infers it from templates and column names.",
    )
    columns: DatasetColumns = Field(default_factory=DatasetColumns)
    template: DatasetTemplate = Field(default_factory=DatasetTemplate)
    max_length: int = Field(
        2048, ge=16, le=1_048_576, description="Tokens per example; longer ones are truncated."
    )
    packing: bool = Field(
        True,
        description="Pack several examples into each row of `maxLength` tokens (no attention between "
        "them). false: one example per row, padded to the longest in its batch.",
    )
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token to every example.")
    chat_template: str | None = Field(
        None,
        description="Format `chat` only: how conversations become text, instead of (or when the base tokenizer "
        "has no) tokenizer chat template. A built-in name - `chatml` (`<|im_start|>{role}\\n{content}<|im_end|>\\n` "
        "per message), `llama-2` (`<s>[INST] {user} [/INST] {assistant} </s>`, a system message in `<<SYS>>`), "
        "`alpaca` (`### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}</s>`) - or a Jinja chat template "
        "over `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, rendered in a sandbox. The "
        "published tokenizer carries it (`apply_chat_template` works on the output). README: Chat templates.",
    )


# -------------------------------------------------------------------------------------- quantization
class QuantizationSpec(Section):
    bits: Literal[4, 8, 16] = Field(
        4,
        description="Bits per weight of the frozen base's linear layers. 4: QLoRA, quantized to NF4/FP4 by "
        "bitsandbytes (~0.52 bytes per parameter). 8: LLM.int8 by bitsandbytes (~1 byte per parameter; one GPU or "
        "data parallel, not FSDP). 16: plain LoRA on the base kept in the compute dtype, no quantization (2 bytes "
        "per parameter; FSDP shards it as it is). Tokens/s and memory of each: README, Speed.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base (bits 4 only).")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (~0.4 bit/param; bits 4 only)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of the matmuls, and of the base's weights with bits 16. `auto`: bfloat16 where the GPU "
        "supports it, else float16.",
    )
    storage_dtype: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype the packed 4-bit weights are stored in (bits 4 only). `auto`: uint8, or the compute "
        "dtype under FSDP (which shards only floating-point tensors and casts every shard to the compute dtype).",
    )


# ---------------------------------------------------------------------------------------------- lora
class LoraSpec(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 lets the adapter reuse its input: faster)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt, or `all-linear` for every linear layer but the output head.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# ------------------------------------------------------------------------------------------ training
Optimizer = Literal[
    "adamw_torch_fused",
    "adamw_torch",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "adafactor",
    "sgd",
]
Scheduler = Literal[
    "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
]


class EarlyStoppingSpec(Section):
    """Stop when the eval loss stops improving (needs an eval set)."""

    patience: int = Field(
        3, ge=1, le=1000,
        description="Stop after this many evaluations in a row that do not lower the best eval loss by more than "
        "minDelta.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="How much lower than the best so far an eval loss must be to count as improving."
    )


class TrainingSpec(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if maxSteps set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(
        4, ge=1, description="Rows per device per step (packed rows of maxLength when packing)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optimizer: Optimizer = Field("adamw_torch_fused", description="Optimizer for the LoRA parameters.")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(0.3, ge=0, description="Gradient clipping norm (0 disables).")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass: less memory, ~30% slower. Unset: on only "
        "when one micro-batch's activations would not fit in free GPU memory.",
    )
    fused_kernels: bool | None = Field(
        None,
        description="Two speed-ups, both off when false (the reference path). Liger's fused RMSNorm/RoPE/SwiGLU: "
        "on a GPU with liger-kernel (true requires it; ~25% faster, ~20% less activation memory on an H100), under "
        "FSDP only if true. Fused LoRA, one matmul per projection: where it applies (bits 4/16, dropout 0, no FSDP).",
    )
    compile: bool = Field(
        False,
        description="Compile each decoder layer with torch.compile: one graph shared by every layer (Liger's layer "
        "kernels off unless fusedKernels is true: the compiler fuses the same operations). The first steps pay the "
        "compilation (about 30 s for a Llama-3-8B on an H100), logged. Applies without checkpointing and with plain "
        "checkpointing, not with checkpointing offloaded to CPU memory (the plan's line says compile=False) and not "
        "under FSDP. Off by default: on the 8B packed row, bound by the GPU's matrix multiplies, it measured 0.97x "
        "eager at the same memory (bench/README.md).",
    )
    memory_budget: float | None = Field(
        None, gt=0,
        description="GiB of GPU memory the job may use at its peak (a shared or smaller GPU): the plan picks the "
        "fastest mode that fits (no checkpointing, checkpointing, checkpointing offloaded to CPU memory, smaller "
        "micro-batches). Unset: what the GPU has free. Not applied under FSDP or on CPU (the plan's line says so).",
    )
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together (unpacked data only)."
    )
    strategy: Literal["auto", "data", "fsdp"] = Field(
        "auto",
        description="With resources.gpus > 1: `data` (every GPU holds the whole base model and trains on its "
        "own batches) or `fsdp` (the base's weights are sharded across the GPUs, for models that do not fit "
        "one; bits 4 or 16). `auto`: data parallel when the base model and a micro-batch fit one GPU, else FSDP "
        "(always data parallel with bits 8).",
    )
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")
    logging_steps: int = Field(10, ge=1, description="Report loss and progress every N steps.")
    save_steps: int = Field(100, ge=1, description="Save a durable checkpoint every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (default: saveSteps) when an eval set exists."
    )
    report_to: list[Literal["mlflow", "wandb", "tensorboard"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive the run's parameters and per-step metrics (TensorBoard "
        "event files are always written into the published report/tensorboard/). `mlflow`: the server at "
        "MLFLOW_TRACKING_URI (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, MLFLOW_EXPERIMENT_NAME). "
        "`wandb`: WANDB_API_KEY, WANDB_PROJECT (WANDB_MODE=offline writes the run under WANDB_DIR). `tensorboard`: "
        "also write the event files live to TENSORBOARD_LOGGING_DIR. Set these as environment variables (in a "
        "cluster: `env` entries with valueFrom.secretKeyRef); an unreachable tracker fails the job in Validating. "
        "Runs are named after the job, tagged with its name, namespace and attempt; a resumed attempt continues "
        "the same run.",
    )

    early_stopping: EarlyStoppingSpec | None = Field(
        None,
        description="Stop training when the eval loss (evaluated every evalSteps) has not improved for `patience` "
        "evaluations; needs an eval set (dataset.evalSource, evalSplit or evalFraction). Unset: train to the end.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many_trackers(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


# --------------------------------------------------------------------------------- merge and output
class MergeSpec(Section):
    enabled: bool = Field(True, description="Merge the adapter into a 16-bit copy of the base model.")
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="Dtype of the merged model.")
    base: Literal["original", "dequantized"] = Field(
        "original",
        description="Weights the adapter is merged into. `original`: the base's own 16-bit weights, keeping "
        "its full precision (usually what users want: the merged model is the base plus the learned change). "
        "`dequantized`: the base rounded to 4 (or 8) bits and back with the job's quantization settings, the "
        "weights the adapter was trained against; the merged model then reproduces exactly what was trained "
        "(lower logit error against the trained quantized model), at the cost of the rounding of the base "
        "(with quantization.bits 16 nothing was rounded: use original). A base "
        "saved already in 4-bit has only its dequantized weights: both values merge into those.",
    )


class OutputSpec(Section):
    destination: str = Field(
        description="Where the result goes: `hf://org/name` (a Hub model repo), `s3://bucket/prefix`, "
        "`gs://bucket/prefix`, or a local directory."
    )
    private: bool = Field(True, description="Create the Hub repo private.")
    push_adapter: bool = Field(True, description="Publish the LoRA adapter (under adapter/) too.")
    checkpoints: str | None = Field(
        None,
        description="Durable checkpoint location (local path on a volume, `s3://` or `gs://`). Default: beside "
        "the destination (`<destination>.checkpoints`). Required when the destination is the Hub.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many newest checkpoints to keep.")
    publish: Literal["last", "best"] = Field(
        "last",
        description="Which weights are merged and published. `last`: those of the last training step. `best`: "
        "those of the evaluation with the lowest eval loss (every evalSteps and at the end; needs an eval set), "
        "kept across resumed attempts. The step published and why: report/metrics.json `published`, the model "
        "card, status.published.",
    )


class FineTuneJobSpec(ClusterFields):
    """Everything a FineTuneJob's `spec` may hold."""

    model: ModelSpec = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="The training data and how its rows become training text.")
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec,
        description="How the frozen base model is held: quantized to 4 bits (QLoRA, the default) or 8 bits, or "
        "kept in 16 bits (plain LoRA).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The LoRA adapter that is trained.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Optimizer, schedule, batching and checkpointing."
    )
    merge: MergeSpec = Field(
        default_factory=MergeSpec, description="Merging the adapter into a 16-bit copy of the base model."
    )
    output: OutputSpec = Field(description="Where the result and the checkpoints go.")
    eval_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts answered by the base model before training and the merged model after.",
    )
    eval_max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated per eval prompt.")


class Job(BaseModel):
    """A validated job: its name (from metadata) and its spec."""

    model_config = ConfigDict(frozen=True)
    name: str
    spec: FineTuneJobSpec
    places = cached_property(lambda self: Places.of(self.spec))  # every place it names, parsed once (places.py)


def schema_doc() -> dict:
    """JSON schema of the spec by alias (what the CRD and the docs are generated from)."""
    return FineTuneJobSpec.model_json_schema(by_alias=True)
