"""Real chat-template families through the sandbox, against transformers' own rendering (issue 23).

The tiny checkpoints ship a one-line ChatML template. Real checkpoints' templates use much more: Qwen3's has a
tools preamble (``tojson``), tool calls and grouped tool responses, a ``namespace()`` updated in a reversed scan
of the messages, reasoning split out of ``<think>...</think>`` with string methods, and ``enable_thinking``;
Phi-3.5-mini-instruct's has its own tags, raw newlines inside string literals and ``eos_token`` at the end.
``tests/templates/`` holds templates written for these tests with those constructs (each file says where the
constructs come from). Each is rendered, for many conversations and flags, by the project's bounded sandbox
(``reference.io.chat_template.render``, with the context ``render_chat`` builds plus ``tools`` and
``enable_thinking``) and by transformers' ``apply_chat_template`` on the tiny checkpoint's tokenizer; the texts
(and the token ids) must be identical.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from reference.io import chat_template as tokmod  # noqa: E402
from reference.io.tokenizer import encode_chat, load_tokenizer  # noqa: E402
from tests.conftest import CHECKPOINTS  # noqa: E402

pytestmark = pytest.mark.crosscheck

TEMPLATES = Path(__file__).resolve().parent / "templates"
QWEN3 = (TEMPLATES / "qwen3_style.jinja").read_text(encoding="utf-8")
PHI35 = (TEMPLATES / "phi35_style.jinja").read_text(encoding="utf-8")
FAMILIES = {"qwen3": (QWEN3, "tiny-qwen3"), "phi35": (PHI35, "tiny-phi3")}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather at a place <now> & \"later\" (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Web search: 日本語 too",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
]

CONVERSATIONS = {
    "one-user-turn": [{"role": "user", "content": "Hello"}],
    "system-and-user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "multi-turn-inline-think": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nSmall sum.\n</think>\n\n4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "Six."},
        {"role": "user", "content": "Grüße — 日本語 🙂 thanks"},
    ],
    "reasoning-content-after-last-query": [
        {"role": "user", "content": "Plan a trip."},
        {"role": "assistant", "content": "\n\nFirst, Bern.", "reasoning_content": "\nThink about Swiss cities.\n"},
    ],
    "reasoning-before-last-query-dropped": [
        {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "content": "Seven.", "reasoning_content": "Any will do."},
        {"role": "user", "content": "Another?"},
    ],
    "tool-calls-and-responses": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Zürich and Bern?"},
        {"role": "assistant", "content": "<think>\nTwo cities: two calls.\n</think>\n\n", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Bern\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"sunny <clear> & dry\"}"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Zürich is sunny, Bern rainy.", "reasoning_content": "Both answers in."},
        {"role": "user", "content": "Search for umbrellas."},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": {"q": "umbrella"}}]},
        {"role": "tool", "content": "3 results"},
    ],
    "tool-response-as-user-turn": [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"function": {"name": "search", "arguments": {"q": "x"}}}]},
        {"role": "user", "content": "<tool_response>\nfound x\n</tool_response>"},
        {"role": "assistant", "content": "<think>\nIt found x.\n</think>\n\nFound it."},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ],
}

FLAGS = list(itertools.product([True, False], [None, True, False], [False, True]))  # generation prompt, thinking, tools
FLAG_IDS = [f"gen={g}-think={t}-tools={u}" for g, t, u in FLAGS]


@pytest.fixture(scope="module")
def tokenizers():
    """(ours, theirs) per family: the project's Tokenizer and transformers' AutoTokenizer of its tiny checkpoint."""
    return {family: (load_tokenizer(CHECKPOINTS / tiny), transformers.AutoTokenizer.from_pretrained(CHECKPOINTS / tiny))
            for family, (_, tiny) in FAMILIES.items()}


def template_kwargs(enable_thinking, tools) -> dict:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if tools:
        kwargs["tools"] = TOOLS
    return kwargs


def ours(tok, template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    """The sandbox's rendering, with the context reference.io.tokenizer.render_chat builds plus ``kwargs``."""
    context = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=tok.bos_token or "", eos_token=tok.eos_token or "", **kwargs)
    return tokmod.render(template, context, len(messages), "test template")


def theirs(hf, template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    return hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                  tokenize=False, **kwargs)


def their_ids(hf, template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                 tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("add_generation_prompt, enable_thinking, tools", FLAGS, ids=FLAG_IDS)
def test_family_templates_render_as_transformers_renders_them(tokenizers, family, add_generation_prompt,
                                                               enable_thinking, tools):
    template, _ = FAMILIES[family]
    tok, hf = tokenizers[family]
    kwargs = template_kwargs(enable_thinking, tools)
    for name, messages in CONVERSATIONS.items():
        expected = theirs(hf, template, messages, add_generation_prompt, **kwargs)
        text = ours(tok, template, messages, add_generation_prompt, **kwargs)
        assert text == expected, name
        assert tok.encode(text, add_special_tokens=False) == their_ids(hf, template, messages, add_generation_prompt,
                                                                       **kwargs), name


def test_qwen3_template_takes_every_branch(tokenizers):
    """The comparison above is only worth something if the template does what Qwen3's does: spot checks."""
    tok, _ = tokenizers["qwen3"]
    text = ours(tok, QWEN3, CONVERSATIONS["tool-calls-and-responses"], True, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nUse tools when needed.\n\n# Tools\n")
    assert '"description": "Weather at a place <now> & \\"later\\" (°C)"' in text  # tojson: no HTML escaping, UTF-8
    assert text.count("<|im_start|>system") == 1  # the system prompt folded into the tools preamble
    # before the last real user query: inline reasoning dropped, both calls (dict and string arguments) kept
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
            '<|im_end|>\n') in text
    assert "Two cities" not in text and "Both answers in" not in text
    # two tool responses in one user turn; the last call (no "function" wrapper) after the last query
    assert ("<|im_start|>user\n<tool_response>\n{\"temp\": 21, \"sky\": \"sunny <clear> & dry\"}\n</tool_response>"
            "\n<tool_response>\nrain\n</tool_response><|im_end|>\n") in text
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"q": "umbrella"}}'
                         '\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n3 results\n</tool_response>'
                         '<|im_end|>\n<|im_start|>assistant\n')
    # reasoning after the last query is kept, from reasoning_content or split out of <think> (multi_step_tool)
    after = ours(tok, QWEN3, CONVERSATIONS["reasoning-content-after-last-query"], False)
    assert after.endswith(
        "<|im_start|>assistant\n<think>\nThink about Swiss cities.\n</think>\n\nFirst, Bern.<|im_end|>\n")
    multi = ours(tok, QWEN3, CONVERSATIONS["tool-response-as-user-turn"], False)
    assert multi.endswith("<|im_start|>assistant\n<think>\nIt found x.\n</think>\n\nFound it.<|im_end|>\n")
    assert ours(tok, QWEN3, CONVERSATIONS["one-user-turn"], True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_phi35_template_takes_every_branch(tokenizers):
    tok, _ = tokenizers["phi35"]
    messages = CONVERSATIONS["multi-turn-inline-think"]
    assert ours(tok, PHI35, messages, True) == (
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\n2 + 2?<|end|>\n<|assistant|>\n<think>\nSmall sum.\n"
        "</think>\n\n4<|end|>\n<|user|>\nAnd 3 + 3?<|end|>\n<|assistant|>\nSix.<|end|>\n"
        "<|user|>\nGrüße — 日本語 🙂 thanks<|end|>\n<|assistant|>\n")
    assert ours(tok, PHI35, CONVERSATIONS["empty-system"], False) == "<|user|>\nHi<|end|>\n" + tok.eos_token


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_template_from_a_checkpoint_encodes_as_transformers(tokenizers, family, tmp_path):
    """End to end: the template as a checkpoint's chat_template.jinja, through load_tokenizer and encode_chat."""
    template, tiny = FAMILIES[family]
    model = tmp_path / tiny
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHECKPOINTS / tiny / name, model / name)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text(template, encoding="utf-8")
    tok, hf = load_tokenizer(model), transformers.AutoTokenizer.from_pretrained(model)
    assert tok.chat_template == hf.chat_template == template
    for text in ("Hello", "Grüße — 日本語 🙂", "<think>\nnot reasoning, a user's text\n</think>"):
        messages = [{"role": "user", "content": text}]
        assert encode_chat(tok, text) == their_ids(hf, template, messages, True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_templates_fit_the_per_message_step_allowance(tokenizers, family, monkeypatch):
    """A long tool-using conversation renders within STEPS_PER_MESSAGE steps a message alone (MAX_STEPS set to 0),
    quickly, and still as transformers renders it."""
    template, _ = FAMILIES[family]
    tok, hf = tokenizers[family]
    messages = [CONVERSATIONS["tool-calls-and-responses"][0]]
    for _ in range(40):
        messages += CONVERSATIONS["tool-calls-and-responses"][1:]
    monkeypatch.setattr(tokmod, "MAX_STEPS", 0)
    start = time.perf_counter()
    text = ours(tok, template, messages, True, tools=TOOLS, enable_thinking=True)
    assert time.perf_counter() - start < 5.0
    assert text == theirs(hf, template, messages, True, tools=TOOLS, enable_thinking=True)
