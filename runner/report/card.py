"""The model card published beside the weights (README.md), and the adapter's own (adapter/README.md): what
was trained on what, how to prompt and load it (code), the eval prompts' answers before and after, the
metrics, the training details and the limitations."""
from __future__ import annotations


import yaml

from runner.api import names
from runner.api.spec import CHAT_TEMPLATE_NAMES, Job
from runner.api.uris import Location
from runner.data.chat import CHAT_TEMPLATES
from runner.report import metrics_file

# How the adapter was trained, by quantization.bits: "QLoRA" only for a 4-bit base.
METHODS = {4: "QLoRA (LoRA on a 4-bit NF4/FP4 base)", 8: "LoRA on an 8-bit (LLM.int8) base",
           16: "LoRA on a 16-bit base"}
_INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"  # runner/data/dataset.py's


def _source(loc: Location, kind: str) -> str:
    """A Hub id as a link; a bucket URI or a local path as is (report/job.yaml, published too, names it anyway)."""
    if loc.hub_id:
        prefix = "datasets/" if kind == "dataset" else ""
        return f"[`{loc.hub_id}`](https://huggingface.co/{prefix}{loc.hub_id})"
    if not loc.local:
        return f"`{loc}`"
    return f"a local {'dataset' if kind == 'dataset' else 'model'} (`{loc}`)"


def _where(job: Job) -> tuple[str, str]:
    """(what from_pretrained is given, a comment on it)."""
    dest = job.places.destination
    if dest.hub_id:
        return dest.hub_id, ""
    if copy := dest.copy_command("./model"):
        return "./model", f"  # after: {copy}"
    return str(dest), ""


def _prompt_section(job: Job, metrics: dict) -> list[str]:
    d, fmt = job.spec.dataset, metrics.get("format") or job.spec.dataset.format
    eos = " The end of every training example was the tokenizer's EOS token, so the model stops by itself." \
        if d.add_eos else ""
    out = ["## How to prompt it", ""]
    if fmt == "chat" and d.chat_template:
        which = f"the built-in `{d.chat_template}` chat template" if d.chat_template in CHAT_TEMPLATE_NAMES else \
            "this job's own chat template (`dataset.chatTemplate`)"
        out += [f"Trained on conversations rendered with {which} (loss on the assistant turns only); the published "
                "tokenizer carries it, so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` "
                "renders prompts exactly as in training. The template:", "", "```jinja",
                CHAT_TEMPLATES.get(d.chat_template, d.chat_template), "```"]
    elif fmt == "chat":
        out += ["Trained on conversations rendered with the tokenizer's chat template (loss on the assistant turns "
                "only). Prompt it the same way: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`."]
    elif fmt == "text":
        out += ["Trained on plain text (loss on every token)" + (f", rendered with `{d.template.text}`" if d.template.text
                                                                 else "") + ": it continues text." + eos]
    elif d.template.prompt and d.template.completion:
        out += ["Trained on prompt/completion pairs rendered from the data's columns with these templates (loss on "
                "the completion only):", "", "```text", f"prompt:     {d.template.prompt!r}",
                f"completion: {d.template.completion!r}", "```", "",
                "Give it the prompt, filled in the same way; it writes the completion." + eos]
    elif fmt == "instruction":
        out += ["Trained on instructions in this built-in format (loss on the response only); the `### Input:` "
                "block is present only when the row has an input:", "", "```text",
                _INSTRUCTION_PROMPT.format(instruction="{instruction}",
                                           input_block="### Input:\n{input}\n\n") + "{response}", "```", "", eos.strip()]
    else:
        out += ["Trained on prompt/completion pairs, the prompt column as is followed directly by the completion "
                "(loss on the completion only). Give it a prompt like the training prompts." + eos]
    return out + [""]


def _usage(job: Job, merged: bool, prompt: str, *, adapter: bool, chat: bool) -> list[str]:
    where, note = _where(job)
    if adapter and merged:  # the adapter's folder beside the merged model (which holds the tokenizer)
        where_arg = f"{where!r}, subfolder='adapter'" if job.places.destination.hub_id else \
            repr(where.rstrip("/") + "/adapter")
    else:
        where_arg = repr(where)
    base_id = job.places.model.hub_id
    base = repr(base_id or job.spec.model.source)
    base_note = "" if base_id else "  # the local base model it was trained from"
    if merged and not adapter:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"tokenizer = AutoTokenizer.from_pretrained({where_arg}){note}",
                f"model = AutoModelForCausalLM.from_pretrained({where_arg}, device_map='auto')"]
    else:
        load = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"base = AutoModelForCausalLM.from_pretrained({base}, device_map='auto'){base_note}",
                f"model = PeftModel.from_pretrained(base, {where_arg}){note}",
                f"tokenizer = AutoTokenizer.from_pretrained({where!r})"]
    gen = ["", f"prompt = {prompt!r}", "inputs = tokenizer(prompt, return_tensors='pt').to(model.device)",
           f"output = model.generate(**inputs, max_new_tokens={job.spec.eval_max_new_tokens})",
           "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))"]
    if chat and not job.spec.eval_prompts:
        gen[1] = "prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hello!'}], " \
                 "tokenize=False, add_generation_prompt=True)"
    return ["## How to use it", "", "```python"] + load + gen + ["```", ""]


def _example_prompt(job: Job, metrics: dict) -> str:
    if job.spec.eval_prompts:
        return job.spec.eval_prompts[0]
    d = job.spec.dataset
    if d.template.prompt:
        return d.template.prompt
    if (metrics.get("format") or d.format) == "instruction":
        return _INSTRUCTION_PROMPT.format(instruction="Say hello.", input_block="")
    return "Hello"


def _cell(text) -> str:
    if text is None:
        return "—"
    return str(text).replace("|", "\\|").replace("\n", "<br>").strip() or "(nothing)"


def _samples_section(samples: list[dict] | None, merged: bool) -> list[str]:
    if not samples:
        return []
    after = "fine-tuned (merged)" if merged else "fine-tuned"
    out = ["## Before and after", "", "The eval prompts of the job (`evalPrompts`), answered greedily by the base "
           f"model before training and by the {after} model after:", "",
           f"| Prompt | Base model | {after.capitalize()} |", "|---|---|---|"]
    out += [f"| {_cell(s.get('prompt'))} | {_cell(s.get('before'))} | {_cell(s.get('after'))} |" for s in samples]
    return out + [""]


def _results_section(metrics: dict) -> list[str]:
    rows = [("final train loss", metrics.get("final_train_loss")),
            ("mean train loss", metrics.get("train_loss")), ("eval loss", metrics.get("eval_loss")),
            ("eval loss at the last step", metrics.get("last_eval_loss")),
            ("optimizer steps", metrics.get("global_step")), ("tokens seen", metrics.get("num_input_tokens_seen")),
            ("training examples", metrics.get("examples")),
            ("examples cut at maxLength", metrics.get(metrics_file.TRUNCATED_EXAMPLES)),
            ("training time (s)", metrics.get("train_runtime"))]
    out = ["## Results", "", "| Metric | Value |", "|---|---|"]
    for name, value in rows:
        if value is not None:
            out.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    published = metrics.get("published")
    if isinstance(published, dict) and published.get("step") is not None:
        out.append(f"| published step | {published['step']} ({published.get('choice')}) |")
    check = metrics.get(metrics_file.MERGE_CHECK)
    if isinstance(check, dict) and check.get("relativeLogitError") is not None:
        out.append(f"| merge check: relative logit error ({check.get('method')}) | "
                   f"{check['relativeLogitError']:.3g} (tolerance {check.get('tolerance')}) |")
    if isinstance(published, dict) and published.get("reason"):
        out += ["", f"Published weights: those of step {published['step']}. Why: {published['reason']}."]
    out += ["", "The full metrics are in `report/metrics.json`, the loss curve in `report/loss.png`"
            + (", TensorBoard event files in `report/tensorboard/` (`tensorboard --logdir report`)"
               if metrics.get("tensorboard") else "") + "."]
    out += [f"Tracked in {name}: {run.get('url') or run.get('runId')}"
            for name, run in sorted((metrics.get("tracking") or {}).items()) if isinstance(run, dict)]
    return out + [""]


def _limitations(job: Job, metrics: dict, merged: bool) -> list[str]:
    s, d = job.spec, job.spec.dataset
    out = ["## Limitations", "",
           f"- It learned from {metrics.get('examples', 'the')} examples of one dataset; outside what they show, "
           "it behaves like the base model, with the base model's limitations, biases and license (see its card)."]
    if not (d.eval_source or d.eval_split or d.eval_fraction):
        out.append("- No held-out data was evaluated (no `evalSource`, `evalSplit` or `evalFraction`): the train "
                   "loss alone does not show how well it generalises.")
    if s.eval_prompts:
        out.append(f"- The before/after answers are {len(s.eval_prompts)} prompt(s), not a benchmark.")
    if truncated := metrics.get(metrics_file.TRUNCATED_EXAMPLES):
        out.append(f"- {truncated} training examples were longer than maxLength {d.max_length} "
                   "and were cut: the model saw only their beginning.")
    bits = getattr(s.quantization, "bits", 4)
    if merged and bits < 16:
        out.append(f"- The adapter was trained on a {bits}-bit base and merged into a {s.merge.dtype} copy; "
                   f"its outputs differ slightly from the {bits}-bit base plus adapter (see the merge check).")
    return out + [""]


def model_card(job: Job, metrics: dict, *, merged: bool, samples: list[dict] | None = None,
               adapter: bool = False) -> str:
    """README.md of the output (`adapter`: of its adapter/ folder, beside a merged model)."""
    s = job.spec
    bits = getattr(s.quantization, "bits", 4)
    is_adapter = adapter or not merged
    places = job.places
    front = {"base_model": places.model.hub_id,  # the Hub's metadata takes a Hub id only
             "library_name": "peft" if is_adapter else "transformers",
             "tags": ["qlora", "lora", names.GROUP] if bits == 4 else ["lora", names.GROUP],
             "pipeline_tag": "text-generation"}
    if not front["base_model"]:
        del front["base_model"]
    if places.data.hub_id:
        front["datasets"] = [places.data.hub_id]
    what = "LoRA adapter" if is_adapter else f"merged {s.merge.dtype} model"
    fmt = metrics.get("format") or s.dataset.format
    intro = (f"A {what} fine-tuned with {METHODS.get(bits, 'LoRA')} from {_source(places.model, 'model')} on "
             f"{_source(places.data, 'dataset')} (split `{s.dataset.split}`, format `{fmt}`"
             + (f", {metrics['examples']} examples" if metrics.get("examples") else "") + ").")
    if adapter:
        intro += " The merged model is one folder up; this is the adapter alone, to apply to the base model."
    quant = s.quantization.model_dump(by_alias=True)
    hyper = {
        "quantization": quant if bits == 4 else {k: quant[k] for k in ("bits", "computeDtype") if k in quant},
        "lora": s.lora.model_dump(by_alias=True),
        "training": s.training.model_dump(by_alias=True, exclude_none=True),
        "dataset": {k: v for k, v in s.dataset.model_dump(by_alias=True, exclude_none=True).items()
                    if k in ("format", "split", "maxLength", "packing", "addEos")},
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {job.name}", "", intro, ""]
    lines += _usage(job, merged, _example_prompt(job, metrics), adapter=adapter, chat=fmt == "chat")
    lines += _prompt_section(job, metrics)
    lines += _samples_section(samples, merged and not adapter)
    lines += _results_section(metrics)
    frozen = (f"QLoRA: the base model's linear layers frozen in 4 bits ({s.quantization.quant_type}"
              + (", double quantization" if s.quantization.double_quant else "") + ")") if bits == 4 else \
        f"{METHODS.get(bits, 'LoRA')}: the base model frozen in {bits} bits"
    lines += ["## Training", "",
              frozen + f", a LoRA adapter of rank "
              f"{s.lora.r} (alpha {s.lora.alpha}) trained on {', '.join(s.lora.target_modules)}. "
              f"Run as FineTuneJob `{job.name}` ({names.GROUP}); "
              "the whole spec, every default filled in, is in `report/job.yaml`.", "", "```yaml",
              yaml.safe_dump(hyper, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    lines += _limitations(job, metrics, merged)
    return "\n".join(lines)
