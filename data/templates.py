"""Prompt templates: render a task into the text the model continues.

"r1" is the R1-Zero template: the user asks, the assistant reasons inside <think></think> and then
answers inside <answer></answer>. The rendered prompt ends right after "<think>", where the model
starts generating, so a completion is "reasoning</think> <answer>...</answer>".

A Hugging Face tokenizer's own chat template (jinja, as in its tokenizer_config.json) is rendered by
`render_chat` the way transformers' `apply_chat_template` renders it; `chat_template_for` writes
our templates as single-turn chat templates for exported tokenizers.

Test: `pytest tests/data/test_data_tasks.py tests/model/test_model_hf_hub.py`.
"""

from __future__ import annotations

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"

TEMPLATES = {
    "r1": "User: {prompt}\nAssistant: " + THINK,
    "plain": "Question: {prompt}\nAnswer:",
}


def render_prompt(prompt: str, template: str = "r1") -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r} (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[template].format(prompt=prompt)


def render_completion(reasoning: str, answer: str, template: str = "r1") -> str:
    """The completion that follows render_prompt(): reasoning (may be empty) then the answer."""
    if template == "r1":
        return f"{reasoning}{THINK_END} {ANSWER}{answer}{ANSWER_END}"
    return f" {answer}"


def render_chat(chat_template: str, messages: list[dict], *, add_generation_prompt: bool = True, **special_tokens) -> str:
    """A jinja chat template rendered as transformers does (sandboxed, trim_blocks, lstrip_blocks,
    `raise_exception`, `strftime_now`, `tojson`); `special_tokens` are bos_token=..., eos_token=..."""
    import json
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


def chat_template_for(template: str, *, bos_token: str | None = None) -> str:
    """`template` as a single-turn jinja chat template: the last user message in place of {prompt},
    after the BOS token, so that apply_chat_template gives exactly our prompt ids."""
    render_prompt("", template)  # unknown names fail here
    before, after = TEMPLATES[template].split("{prompt}")
    esc = lambda s: s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return (("{{ bos_token }}" if bos_token else "") + "{{ '" + esc(before) + "' }}{{ messages[-1]['content'] }}{{ '" + esc(after) + "' }}")
