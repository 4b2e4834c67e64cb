"""Prompt templates: render a task into the text the model continues.

"r1" is the R1-Zero template: the user asks, the assistant reasons inside <think></think> and then
answers inside <answer></answer>. The rendered prompt ends right after "<think>", where the model
starts generating, so a completion is "reasoning</think> <answer>...</answer>".

Test: `pytest tests/data/test_data_tasks.py`.
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
