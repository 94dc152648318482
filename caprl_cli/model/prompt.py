"""Render the captioning prompt through the model's own chat template, as CapRL captions.

CapRL captions with no system turn. Qwen2.5-VL's stock template (and so `LLM.chat`) silently inserts
"You are a helpful assistant." when no system message is given, which changes the captions. Rather than
hard-wiring one checkpoint's tokens, the template is rendered with and without a system message and an
injected default system turn is detected and dropped; templates that inject nothing are left as they
are, so CapRL-Qwen3VL and CapRL-InternVL render through their own processors unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Messages = list[dict[str, Any]]
# apply(messages, add_generation_prompt) -> rendered text
TemplateRenderer = Callable[[Messages, bool], str]

_SENTINEL = "\x00caprl-system-sentinel\x00"


def caption_messages(prompt: str, system_prompt: str | None) -> Messages:
    """One image then the instruction in a single user turn; a system turn only if asked for."""
    messages: Messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    return messages


def render_prompt(render: TemplateRenderer, prompt: str, system_prompt: str | None) -> str:
    """The exact text the engine is fed for one image."""
    if system_prompt is not None:
        return render(caption_messages(prompt, system_prompt), True)
    plain = render(caption_messages(prompt, None), True)
    user_turn = _user_turn_after_system(render, prompt)
    if user_turn is not None and plain.endswith(user_turn) and len(plain) > len(user_turn):
        return user_turn  # the template put a default system turn in front: drop it
    return plain


def _user_turn_after_system(render: TemplateRenderer, prompt: str) -> str | None:
    """What the template renders after an explicit system turn, or None if it cannot tell."""
    try:
        system_only = render([{"role": "system", "content": [{"type": "text", "text": _SENTINEL}]}], False)
        with_system = render(caption_messages(prompt, _SENTINEL), True)
    except Exception:  # templates that refuse a system turn cannot inject one either
        return None
    if _SENTINEL not in system_only or not with_system.startswith(system_only):
        return None
    return with_system[len(system_only):]


def processor_renderer(processor: Any) -> TemplateRenderer:
    """Render through a Hugging Face processor's (or tokenizer's) chat template."""

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render
