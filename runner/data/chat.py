"""Chat templates: how a conversation (`messages`, a list of {role, content}) becomes training text.

`dataset.chatTemplate` names a built-in template below or holds a Jinja chat template; without it the
tokenizer's own chat template is used. Either way the text is rendered in Jinja's immutable sandbox with the
options transformers uses for chat templates (trim_blocks, lstrip_blocks), so the published tokenizer, which
carries the template, renders exactly what training saw (`tokenizer.apply_chat_template`).
"""
from __future__ import annotations

from typing import Callable

from runner.api.errors import INVALID_SPEC, PermanentError
from runner.api.spec import CHAT_TEMPLATE_NAMES, DatasetSpec

# The built-in templates (README "Chat templates" writes out what each renders). A message's role is system,
# user or assistant; the loss is on each assistant turn's text as rendered here, its end marker included.
CHAT_TEMPLATES = {
    # ChatML: every message as <|im_start|>{role}\n{content}<|im_end|>\n; the prompt ends <|im_start|>assistant\n.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 2 chat: <s>[INST] {user} [/INST] {assistant} </s>, per exchange; a system message goes inside the first
    # [INST] as <<SYS>>\n{system}\n<</SYS>>\n\n.
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' }}"
        "{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
        "{{ message['content'] | trim }}{{ ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # Alpaca-style instruction (the built-in `instruction` format's prompt): ### Instruction:\n{user}\n\n
    # ### Response:\n{assistant}</s>; turns are separated by a blank line, a system message comes first as is.
    "alpaca": (
        "{% for message in messages %}"
        "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n\n### Response:\n' if messages else '### Response:\n' }}{% endif %}"
    ),
}
assert tuple(CHAT_TEMPLATES) == CHAT_TEMPLATE_NAMES

ChatFn = Callable[..., str]  # (messages, add_generation_prompt=...) -> text


class ChatTemplateError(PermanentError):
    def __init__(self, message: str):
        super().__init__(message, reason=INVALID_SPEC)


def template_source(spec: DatasetSpec) -> str | None:
    """The Jinja of dataset.chatTemplate (a built-in's, or the spec's own), or None when it is not set."""
    value = spec.chat_template
    if value is None:
        return None
    return CHAT_TEMPLATES.get(value, value)


def _environment():
    from jinja2.ext import loopcontrols

    from runner.data.render import environment

    env = environment(immutable=True, trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def raise_exception(message):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def syntax_problem(spec: DatasetSpec) -> str | None:
    """A Jinja syntax error in dataset.chatTemplate, as a message naming the field (None: none)."""
    source = template_source(spec)
    if source is None:
        return None
    from jinja2 import TemplateSyntaxError

    try:
        _environment().parse(source)
    except TemplateSyntaxError as e:
        return (f"dataset.chatTemplate: Jinja syntax error on line {e.lineno}: {str(e.message)[:200]}; fix the "
                "template, or use a built-in name (" + ", ".join(CHAT_TEMPLATE_NAMES) + ")")
    from runner.data.render import static_problems

    return next(iter(static_problems(source, "dataset.chatTemplate", immutable=True)), None)


def chat_function(spec: DatasetSpec, tokenizer, *, install: bool = False) -> ChatFn | None:
    """How conversations are rendered for this job: dataset.chatTemplate, else the tokenizer's own chat template,
    else None. `install` sets dataset.chatTemplate as the tokenizer's chat template, so that the saved tokenizer
    renders prompts as training did."""
    source = template_source(spec)
    if source is None:
        if not getattr(tokenizer, "chat_template", None):
            return None
        return lambda msgs, add_generation_prompt: tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    problem = syntax_problem(spec)
    if problem:
        raise ChatTemplateError(problem)
    from runner.data.render import render as bounded_render

    compiled = _environment().from_string(source)
    special = {"bos_token": getattr(tokenizer, "bos_token", None) or "",
               "eos_token": getattr(tokenizer, "eos_token", None) or ""}
    if install:
        tokenizer.chat_template = source

    def render(messages, add_generation_prompt: bool = False) -> str:
        try:
            return bounded_render(compiled, messages=messages, add_generation_prompt=add_generation_prompt, **special)
        except Exception as e:  # noqa: BLE001 - the template is the user's code: any failure is theirs
            raise ChatTemplateError(f"dataset.chatTemplate: the template failed on a conversation ({e.__class__.__name__}: "
                            f"{str(e)[:300]}); fix the template, or the messages column") from e

    return render
