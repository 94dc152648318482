"""The rendered prompt is CapRL's own: no injected system turn, the model's own template otherwise."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from caprl_cli.model.prompt import caption_messages, processor_renderer, render_prompt
from caprl_cli.settings import DEFAULT_PROMPT

CAPRL_QWEN25_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "Please describe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
)

# The shape of Qwen3-VL's template: it injects no default system turn.
QWEN3_STYLE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def jinja_renderer(template: str):
    compiled = jinja2.Environment().from_string(template)

    def render(messages, add_generation_prompt):
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)

    return render


@pytest.fixture(scope="module")
def tiny_processor(tiny_model: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


def test_default_prompt_is_caprls_exact_text(tiny_processor) -> None:
    """Pinned: the stock template would add 'You are a helpful assistant.'; CapRL has no system turn."""
    assert render_prompt(processor_renderer(tiny_processor), DEFAULT_PROMPT, None) == CAPRL_QWEN25_PROMPT


def test_stock_template_does_inject_a_system_turn(tiny_processor) -> None:
    """What LLM.chat would feed: the reason caprl renders the prompt itself."""
    stock = processor_renderer(tiny_processor)(caption_messages(DEFAULT_PROMPT, None), True)
    assert stock != CAPRL_QWEN25_PROMPT
    assert stock.endswith(CAPRL_QWEN25_PROMPT)
    assert stock.startswith("<|im_start|>system\n")


def test_explicit_system_prompt_is_kept(tiny_processor) -> None:
    rendered = render_prompt(processor_renderer(tiny_processor), "Describe.", "Be exact.")
    assert rendered.startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")


def test_custom_prompt_replaces_the_instruction(tiny_processor) -> None:
    rendered = render_prompt(processor_renderer(tiny_processor), "List the objects.", None)
    assert rendered == CAPRL_QWEN25_PROMPT.replace("Please describe this image in detail.", "List the objects.")


def test_template_without_default_system_is_untouched() -> None:
    render = jinja_renderer(QWEN3_STYLE_TEMPLATE)
    assert render_prompt(render, DEFAULT_PROMPT, None) == CAPRL_QWEN25_PROMPT


def test_template_refusing_system_turns_still_renders() -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "[{{ m['role'] }}]{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    environment = jinja2.Environment()

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)

    def render(messages, add_generation_prompt):
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)

    assert render_prompt(render, "Describe.", None) == "[user]<image>Describe.[assistant]"
