"""Hostile chat templates, tokenizer configs, prompts and GGUF files (issue 14).

Whatever a checkpoint's chat template or a GGUF file holds, the result is the
right answer or one OracleError (one ``asl: error:`` line, exit status 2)
naming the file, the key and the fix: never a traceback, a hang, a crash, a
silently wrong answer, or a half-written output directory. Each case here is
one of a class (loops, sizes, recursion, types, counts, ids, encodings); the
hypothesis tests draw more of the same.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
from gguf.gguf_writer import GGUFValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import load_file

from reference.cli import main
from reference.errors import OracleError
from reference.io import chat_template as tokmod
from reference.io.gguf import import_gguf
from reference.io.tokenizer import encode_chat, load_tokenizer, render_chat
from tests.conftest import CHECKPOINTS, fuzz_examples
from tests.test_gguf_import import Spec, random_hf_weights, tiny_vocab, write_gguf

T = gguf.GGUFValueType
SECONDS = 8.0  # any one refusal, in-process; the limits of reference.io.chat_template stop work far sooner


def run_asl(*args, timeout=60):
    """The CLI in a subprocess, as a user runs it; a hang fails the test after ``timeout`` seconds."""
    return subprocess.run([sys.executable, "-m", "reference", *args], capture_output=True, timeout=timeout)


def assert_clean_cli_error(result, *fragments):
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asl: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_one_line(message: str, *fragments):
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------
# chat templates
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CHECKPOINTS / "tiny-llama")


def refused(tok, template, content="hi", **kw) -> str:
    """The OracleError message for rendering ``template``, checked to come quickly and as one line."""
    t = replace(tok, chat_template=template, **kw)
    trace_before = sys.gettrace()
    start = time.perf_counter()
    with pytest.raises(OracleError) as info:
        render_chat(t, [{"role": "user", "content": content}])
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"{elapsed:.1f} s for {template[:80]!r}"
    message = str(info.value)
    assert_one_line(message, "tokenizer_config.json", "chat_template")
    assert sys.gettrace() is trace_before and tokmod._budget() is None  # nothing left installed
    return message


HOSTILE_TEMPLATES = [
    # work: loops, nested loops, recursion
    ("range-1e9", "{% for i in range(10**9) %}x{% endfor %}", "range() of 1000000000 items"),
    ("range-huge", "{{ range(10**30)|length }}", "range() of"),
    ("nested-range", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "steps"),
    ("nested-list", "{% set r = range(10000)|list %}{% for i in r %}{% for j in r %}x{% endfor %}{% endfor %}", ""),
    ("recursive-macro", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
    ("binary-macro", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "steps"),
    ("recursive-loop", "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "recursed too deeply"),
    ("caller-loop", "{% macro m() %}{% for i in range(10000) %}{{ caller() }}{% endfor %}{% endmacro %}"
                    "{% call m() %}{% call m() %}x{% endcall %}{% endcall %}", ""),
    ("cycler", "{% set c = cycler(*range(10000)) %}{% for i in range(10000) %}{% for j in range(100) %}"
               "{{ c.next() }}{% endfor %}{% endfor %}", ""),
    # sizes: huge numbers, strings, lists, output
    ("pow-1e5", "{{ 10**100000 }}", "10 ** 100000"),
    ("pow-tower", "{{ 10**(10**10) }}", "bits"),
    ("pow-left-assoc", "{{ ((10**10)**10)**100 }}", "bits"),
    ("int-squaring", "{% set ns = namespace(x=3) %}{% for i in range(30) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
     "bits"),
    ("str-times-1e9", "{{ 'a' * 10**9 }}", "1000000000 characters"),
    ("list-times-1e9", "{{ [1] * 10**9 }}", "characters/items"),
    ("concat-doubling", "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
    ("plus-doubling", "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", ""),
    ("list-doubling", "{% set ns = namespace(l=[0]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}", ""),
    ("nested-literal-dag", "{% set ns = namespace(a=[1]) %}{% for i in range(64) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
                           "{{ ns.a }}", ""),
    ("tuple-hash-dag", "{% set ns = namespace(a=(1,)) %}{% for i in range(64) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}"
                       "{{ {ns.a: 1} }}", ""),
    ("compare-dag", "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(64) %}"
                    "{% set ns.a, ns.b = [ns.a, ns.b], [ns.b, ns.a] %}{% endfor %}{{ ns.a == ns.b }}", ""),
    ("print-list-of-big", "{{ [messages[0].content * 100000] * 100 }}", ""),
    ("output-flood", "{% for i in range(10000) %}{{ messages[0].content * 500 }}{% endfor %}", ""),
    ("set-block-flood", "{% set x %}{% for i in range(10000) %}{{ messages[0].content * 500 }}{% endfor %}{% endset %}", ""),
    ("filter-block-flood", "{% filter upper %}{% for i in range(10000) %}{{ 'ab' * 500 }}{% endfor %}{% endfilter %}", ""),
    ("compare-loop", "{% set s = 'x' * 500000 %}{% for i in range(10000) %}{% if s == s ~ '' %}{% endif %}{% endfor %}",
     "in all"),
    ("split-loop", "{% for i in range(10000) %}{% set x = (messages[0].content * 2000).split() %}{% endfor %}", ""),
    # one C call that would build something huge
    ("center", "{{ 'a'|center(10**9) }}", "width"),
    ("center-literal", "{{ 'a'|center(1000000000) }}", "width"),
    ("ljust", "{{ 'a'.ljust(10**9) }}", "width"),
    ("zfill", "{{ 'a'.zfill(10**9) }}", "width"),
    ("expandtabs", "{{ ('\t' * 100000).expandtabs(10000) }}", ""),
    ("indent", "{{ ('\n' * 100000)|indent(10000) }}", "indented"),
    ("wordwrap", "{{ ('a ' * 100000)|wordwrap(1, wrapstring='x' * 10000) }}", "wrapped"),
    ("str-replace", "{{ ('x' * 10000).replace('x', 'y' * 10000) }}", ""),
    ("replace-filter", "{{ ('x' * 10000)|replace('', 'y' * 10000) }}", "replaced"),
    ("join-method", "{{ ('x' * 100000).join(['a'] * 10000) }}", ""),
    ("join-filter", "{{ (['x' * 100000] * 10)|join('y' * 1000000) }}", "joined"),
    ("translate", "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", ""),
    ("str-format-width", "{{ '{:>1000000000}'.format(1) }}", "format width"),
    ("str-format-nested", "{{ '{:{w}}'.format(1, w=10**9) }}", "format width"),
    ("format-map", "{{ '{a:>1000000000}'.format_map({'a': 1}) }}", "format width"),
    ("percent-width", "{{ '%1000000000d' % 1 }}", "%-format width"),
    ("percent-star", "{{ '%*d' % (10**9, 1) }}", "%-format width"),
    ("format-filter", "{{ '%1000000000s'|format('x') }}", "%-format width"),
    ("to-bytes", "{{ (1).to_bytes(10**9, 'big') }}", "byte length"),
    ("batch", "{{ [1]|batch(10**9, 'x')|list }}", "count"),
    ("slice", "{{ [1]|slice(10**9, 'x')|list }}", "count"),
    ("tojson-indent", "{{ messages|tojson(indent=10**6) }}", "indent"),
    ("sum-lists", "{{ ([[1]] * 100000)|sum(start=[]) }}", "numbers only"),
    ("sum-tuples", "{{ ([(1,)] * 100000)|sum(start=()) }}", "numbers only"),
    ("dict-get-default", "{{ {}.get('a', 'b' * 10**8) }}", ""),
    ("int-filter-big", "{{ ('f' * 5000)|int(base=16) }}", "bits"),
    ("deep-literal", "{% set ns = namespace(a=1) %}{% for i in range(200) %}{% set ns.a = [ns.a] %}{% endfor %}", "deep"),
    # other files, unavailable things, sandbox
    ("include", "{% include 'other.jinja' %}", "include"),
    ("import", "{% import 'x' as y %}{{ y }}", "import"),
    ("from-import", "{% from 'x' import y %}", "import"),
    ("extends", "{% extends 'base' %}", "extends"),
    ("lipsum", "{{ lipsum(10**6) }}", "lipsum"),
    ("pprint", "{{ messages|pprint }}", "pprint"),
    ("dunder", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    ("mutation", "{% set l = [1] %}{{ l.append(2) }}", "sandbox"),
    ("globals", "{{ self._TemplateReference__context.environment }}", ""),
    # ordinary failures of a template
    ("syntax", "{% for %}", "syntax error at line 1"),
    ("syntax-multiline", "ok\n{% if x %}\n{% endfor %}", "syntax error at line 3"),
    ("undefined", "{{ foo.bar.baz }}", "undefined"),
    ("raise-exception", "{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
    ("division", "{{ 1 / 0 }}", "ZeroDivisionError"),
    ("float-overflow", "{{ 2.0 ** 100000 }}", "OverflowError"),
    ("type-error", "{{ 'a' + 1 }}", "TypeError"),
    ("deep-parse", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", ""),
    ("deep-blocks", "{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30, ""),
    ("too-long", "x" * (tokmod.MAX_TEMPLATE_CHARS + 1), "characters long"),
    # a template that renders nothing is not "an empty prompt"
    ("renders-nothing", "{% if false %}x{% endif %}", "rendered nothing"),
    ("renders-nothing-loop", "{% for m in messages %}{% endfor %}", "rendered nothing"),
]


@pytest.mark.parametrize("template, fragment", [c[1:] for c in HOSTILE_TEMPLATES], ids=[c[0] for c in HOSTILE_TEMPLATES])
def test_hostile_template_is_refused_quickly_in_one_line(tok, template, fragment):
    message = refused(tok, template)
    assert fragment in message
    assert "run without --chat" in message  # the fix
    assert "prompt is empty" not in message


def test_limits_scale_with_the_prompt(tok):
    """A long prompt may be copied a few times; the same template on a short prompt is refused by size."""
    template = "{{ messages[0].content * 3 }}"
    long_text = "x" * 2_000_000
    assert len(render_chat(replace(tok, chat_template=template), [{"role": "user", "content": long_text}])) == 6_000_000
    assert "characters" in refused(tok, "{{ messages[0].content * 3000000 }}")


def test_a_refusal_leaves_no_tracer_and_keeps_one_already_there(tok):
    calls = []

    def outer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(outer)
    try:
        refused(tok, "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
        assert sys.gettrace() is outer
        assert render_chat(tok, [{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")
        assert sys.gettrace() is outer
    finally:
        sys.settrace(None)
    assert tokmod._budget() is None


def test_renders_in_threads_at_once(tok):
    """Budgets are per thread: concurrent renders do not share or trip each other's limits."""
    expected = {i: f"<|im_start|>user\n{i}<|im_end|>\n<|im_start|>assistant\n" for i in range(8)}
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                results[i] = render_chat(tok, [{"role": "user", "content": str(i)}])
            with pytest.raises(OracleError):
                render_chat(replace(tok, chat_template="{{ 'a' * 10**9 }}"), [{"role": "user", "content": "x"}])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == expected


# --- legitimate templates render exactly as before (plain jinja2, Hugging Face's settings) ---

QWEN_LIKE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

MISTRAL_LIKE = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content']|trim + eos_token}}
    {%- endif %}
{%- endfor %}
"""

# Many constructs at once: macros, namespace, filters, tests, tuples, dicts, formatting, loop controls.
KITCHEN_SINK = """\
{%- macro render(m) -%}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{%- endmacro -%}
{%- set ns = namespace(count=0, roles=[], chars=0) -%}
{{- bos_token }}
{%- for m in messages -%}
    {%- set ns.count = ns.count + 1 -%}
    {%- set ns.roles = ns.roles + [m.role] -%}
    {%- set ns.chars = ns.chars + m.content|length -%}
    {%- if m.role not in ['system', 'user', 'assistant'] -%}{{ raise_exception('bad role ' ~ m.role) }}{%- endif -%}
    {{- render(m) }}
    {%- if loop.index is divisibleby 50 %}{% continue %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}
{{- "{}:{}".format(ns.count, ns.roles|unique|list|length) | center(20) | trim }}
{{- (messages|map(attribute='role')|select('equalto', 'user')|list|length ~ ' ' ~ ns.chars ~ ' ' ~ (messages[-1].content.split()|first|default(''))|upper) }}
{%- for k, v in {'a': 1, 'b': [1, 2]}|dictsort %}{{ k }}={{ v|tojson }}{% endfor %}
{{- range(3)|list|sum }}{{ (messages|length * 2) ** 2 }}{{ 'x' * 3 }}{{ 7 // 2 }}{{ '%.2f' % 3.14159 }}{{ '%-5s|' % 'ab' }}
{{- '-' ~ messages[0].content[:5] ~ (1, 2)|join('.') ~ ('a' in 'abc') ~ (3 > 2 > 1) ~ [1, 2][-1] ~ 'Ab'.lower() }}
{%- for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}
{{- messages|selectattr('role', 'eq', 'user')|map(attribute='content')|map('length')|sum }}
"""


def conversation(n: int, length: int = 20) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i}: " + "w" * length})
        messages.append({"role": "assistant", "content": f"  answer {i}  "})
    messages.append({"role": "user", "content": "Grüße — 日本語 🙂 last"})
    return messages


def plain_render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """How the template rendered before the limits: jinja2's sandbox, Hugging Face's options."""
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


LEGIT = {"qwen-like": QWEN_LIKE, "mistral-like": MISTRAL_LIKE, "kitchen-sink": KITCHEN_SINK}


@pytest.mark.parametrize("name", sorted(LEGIT))
@pytest.mark.parametrize("turns", [0, 3, 200])
def test_legitimate_templates_render_exactly_as_plain_jinja(tok, name, turns):
    template = LEGIT[name]
    messages = conversation(turns)
    if name == "mistral-like":
        messages = messages[:-1]  # ends with the assistant: roles alternate after the system message
    t = replace(tok, chat_template=template, bos_token="<s>", eos_token="</s>")
    start = time.perf_counter()
    text = render_chat(t, messages)
    assert time.perf_counter() - start < 2.0
    assert text == plain_render(template, messages, "<s>", "</s>")


def test_tool_calls_render_as_plain_jinja(tok):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}]
    t = replace(tok, chat_template=QWEN_LIKE)
    assert render_chat(t, messages) == plain_render(QWEN_LIKE, messages, "", "")


def test_template_errors_of_legit_templates_still_surface(tok):
    t = replace(tok, chat_template=MISTRAL_LIKE)
    with pytest.raises(OracleError, match="roles must alternate"):
        render_chat(t, [{"role": "assistant", "content": "first"}])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_checkpoint_templates_unchanged(name):
    directory = CHECKPOINTS / name
    t = load_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for messages in (conversation(0), conversation(5)):
        assert render_chat(t, messages) == plain_render(config["chat_template"], messages, t.bos_token or "",
                                                        t.eos_token or "")


@pytest.mark.smollm2
def test_smollm2_template_unchanged_and_fast(smollm2_dir):
    t = load_tokenizer(smollm2_dir)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    long_text = "The quick brown fox. " * 20_000
    for messages in (conversation(0), conversation(50), [{"role": "user", "content": long_text}]):
        start = time.perf_counter()
        text = render_chat(t, messages)
        assert time.perf_counter() - start < 1.0
        assert text == plain_render(config["chat_template"], messages, t.bos_token, t.eos_token)


# --- tokenizer_config.json itself ---


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A copy of the tiny-llama checkpoint whose tokenizer files a test may spoil."""
    directory = tmp_path / "model"
    shutil.copytree(CHECKPOINTS / "tiny-llama", directory)
    return directory


def write_config(directory: Path, config) -> None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


BASE_CONFIG = json.loads((CHECKPOINTS / "tiny-llama" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "not valid JSON"),
    (b'{"chat_template": "\xff\xfe"}', "not valid UTF-8 (byte 0xff at offset 19)"),
    (b"[1, 2, 3]", "must hold a JSON object, not a list"),
    (b"42", "must hold a JSON object, not a int"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
    (b"", "not valid JSON"),
], ids=["invalid-json", "invalid-utf8", "list", "number", "deep", "empty"])
def test_unreadable_tokenizer_config_is_refused_on_load(model_copy, content, fragment):
    (model_copy / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(OracleError) as info:
        load_tokenizer(model_copy)
    assert_one_line(str(info.value), "tokenizer_config.json", fragment)


@pytest.mark.parametrize("changes, fragment", [
    ({"chat_template": ["{{ x }}"]}, "is a list but not of"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, "none of them 'default'"),
    ({"chat_template": [{"name": "default"}]}, "is a list but not of"),
    ({"chat_template": 42}, "must be a string, not int 42"),
    ({"chat_template": {"default": "x"}}, "must be a string, not dict"),
    ({"chat_template": True}, "must be a string, not bool"),
    ({"bos_token": 5}, "bos_token must be a string"),
    ({"eos_token": ["</s>"]}, "eos_token must be a string"),
], ids=["list-of-str", "no-default", "entry-without-template", "number", "dict", "bool", "bos-number", "eos-list"])
def test_malformed_chat_template_is_refused_when_used(model_copy, changes, fragment):
    write_config(model_copy, {**BASE_CONFIG, **changes})
    t = load_tokenizer(model_copy)  # loading still works: only --chat needs the template
    assert t.encode("hi") == [3 + ord("h"), 3 + ord("i")]
    with pytest.raises(OracleError) as info:
        encode_chat(t, "hi")
    assert_one_line(str(info.value), "tokenizer_config.json", fragment, "--chat")


def test_named_default_template_is_used(model_copy):
    write_config(model_copy, {**BASE_CONFIG, "chat_template": [{"name": "tool_use", "template": "T"},
                                                               {"name": "default", "template": "D{{ messages[0].content }}"}]})
    assert render_chat(load_tokenizer(model_copy), [{"role": "user", "content": "x"}]) == "Dx"


def test_chat_template_jinja_not_utf8(model_copy):
    (model_copy / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    with pytest.raises(OracleError) as info:
        encode_chat(load_tokenizer(model_copy), "hi")
    assert_one_line(str(info.value), "chat_template.jinja", "not valid UTF-8")


# --- prompts that are not valid text ---


@pytest.mark.parametrize("text, fragment", [
    ("ab\udcffc", "byte 0xff at character 2"),
    ("\ud800", "lone surrogate U+D800"),
    (None, "must be text"),
    (b"bytes", "must be text"),
])
def test_prompt_that_is_not_valid_text(tok, text, fragment):
    with pytest.raises(OracleError) as info:
        tok.encode(text)
    assert_one_line(str(info.value), fragment)
    if isinstance(text, str):
        with pytest.raises(OracleError, match="UTF-8|surrogate"):
            encode_chat(tok, text)


# --- the command line: exit 2, one line, no traceback, no hang ---


@pytest.mark.parametrize("template, fragment", [
    ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(10**9) %}x{% endfor %}", "range()"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed"),
], ids=["nested-loops", "range-1e9", "recursive-macro"])
def test_cli_hostile_template_in_a_subprocess(model_copy, template, fragment):
    write_config(model_copy, {**BASE_CONFIG, "chat_template": template})
    result = run_asl("generate", "--model", str(model_copy), "--prompt", "hi", "--chat", "--max-new-tokens", "2")
    assert_clean_cli_error(result, "tokenizer_config.json", "chat_template", fragment)


@pytest.mark.parametrize("config, fragment", [
    (b"{broken", "not valid JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (json.dumps({**BASE_CONFIG, "chat_template": "{{ 'a' * 10**9 }}"}).encode(), "characters"),
    (json.dumps({**BASE_CONFIG, "chat_template": "{% include 'x' %}"}).encode(), "include"),
    (json.dumps({**BASE_CONFIG, "chat_template": "{{ 10**100000 }}"}).encode(), "bits"),
    (json.dumps({**BASE_CONFIG, "chat_template": ""}).encode(), "no chat template"),
    (json.dumps({**BASE_CONFIG, "chat_template": "{% if false %}{% endif %}"}).encode(), "rendered nothing"),
    (json.dumps({**BASE_CONFIG, "chat_template": 7}).encode(), "must be a string"),
], ids=["json", "utf8", "str-times", "include", "pow", "empty-template", "renders-nothing", "number"])
def test_cli_hostile_tokenizer_config(model_copy, capsys, config, fragment):
    (model_copy / "tokenizer_config.json").write_bytes(config)
    rc = main(["generate", "--model", str(model_copy), "--prompt", "hi", "--chat", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asl: error: ") and fragment in lines[0], err
    assert "prompt is empty" not in err


def test_cli_prompt_not_utf8_in_a_subprocess():
    result = run_asl("generate", "--model", "tiny-llama", "--prompt", b"ab\xffc", "--chat", "--max-new-tokens", "2")
    assert_clean_cli_error(result, "UTF-8")


# --- random templates from a grammar of loops, multiplication and nested macros ---

NUMBERS = st.sampled_from(["0", "1", "2", "3", "7", "50", "1000", "100000", "10**6", "10**9", "10**100", "-1"])
LEAVES = st.one_of(NUMBERS, st.sampled_from(["'a'", "'xyz'", "''", "messages[0].content", "[1, 2]", "(1,)", "{'k': 'v'}",
                                             "ns.s", "loop", "none", "true"]))


def _binary(op):
    return lambda pair: f"({pair[0]} {op} {pair[1]})"


EXPRESSIONS = st.recursive(LEAVES, lambda e: st.one_of(
    st.tuples(e, e).map(_binary("*")),
    st.tuples(e, e).map(_binary("**")),
    st.tuples(e, e).map(_binary("~")),
    st.tuples(e, e).map(_binary("+")),
    st.tuples(e, e).map(_binary("%")),
    st.tuples(e, e).map(_binary("==")),
    st.tuples(e, NUMBERS).map(lambda p: f"({p[0]}|string|center({p[1]}))"),
    st.tuples(e, e).map(lambda p: f"([{p[0]}] * {p[1]})"),
    st.tuples(e, NUMBERS).map(lambda p: f"({p[0]}|string).ljust({p[1]})"),
    st.tuples(e, e).map(lambda p: f"({p[0]}|string).replace('', {p[1]}|string)"),
    e.map(lambda x: f"(range({x})|list|length)"),
    e.map(lambda x: f"({x}|join(','))"),
    e.map(lambda x: f"({x}|tojson)"),
), max_leaves=6)


def _statements(children):
    names = st.integers(0, 10**6)
    return st.one_of(
        st.tuples(EXPRESSIONS, st.lists(children, min_size=1, max_size=3)).map(
            lambda p: "{% for i in range(" + p[0] + ") %}" + "".join(p[1]) + "{% endfor %}"),
        st.tuples(names, st.lists(children, max_size=2), st.integers(0, 40), st.integers(1, 3)).map(
            lambda p: (f"{{% macro m{p[0]}(n) %}}{''.join(p[1])}{{% if n > 0 %}}"
                       + f"{{{{ m{p[0]}(n - 1) }}}}" * p[3] + f"{{% endif %}}{{% endmacro %}}{{{{ m{p[0]}({p[2]}) }}}}")),
        st.tuples(names, st.lists(children, min_size=1, max_size=2)).map(
            lambda p: f"{{% macro outer{p[0]}() %}}{{% macro inner() %}}{''.join(p[1])}{{% endmacro %}}"
                      f"{{{{ inner() }}}}{{{{ inner() }}}}{{% endmacro %}}{{{{ outer{p[0]}() }}}}"),
        st.tuples(EXPRESSIONS, children).map(lambda p: "{% if " + p[0] + " %}" + p[1] + "{% endif %}"),
        st.tuples(NUMBERS, st.sampled_from(["~", "+", "*"])).map(
            lambda p: "{% for i in range(" + p[0] + ") %}{% set ns.s = ns.s " + p[1] + " ns.s %}{% endfor %}"),
        st.tuples(EXPRESSIONS).map(lambda p: "{% set ns.s = " + p[0] + " %}"),
    )


STATEMENTS = st.recursive(st.one_of(EXPRESSIONS.map(lambda e: "{{ " + e + " }}"), st.just("text")),
                          _statements, max_leaves=8)
TEMPLATES = st.lists(STATEMENTS, min_size=1, max_size=4).map(lambda parts: "{% set ns = namespace(s='ab') %}" + "".join(parts))


@settings(max_examples=fuzz_examples(60), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(template=TEMPLATES, content=st.sampled_from(["hi", "x" * 10_000]))
def test_random_templates_give_text_or_one_oracle_error_quickly(tok, template, content):
    t = replace(tok, chat_template=template)
    start = time.perf_counter()
    try:
        text = render_chat(t, [{"role": "user", "content": content}])
    except OracleError as e:
        assert_one_line(str(e), "chat_template")
    else:
        assert isinstance(text, str) and text
        assert len(text) <= tokmod.TEXT_BASE + tokmod.TEXT_FACTOR * (len(content) + 100)
    assert time.perf_counter() - start < SECONDS, template
    assert tokmod._budget() is None


# ---------------------------------------------------------------------------
# GGUF import
# ---------------------------------------------------------------------------


class _Writer(gguf.GGUFWriter):
    """GGUFWriter whose key/values are replaced or dropped just before they are written."""

    overrides: dict = {}
    drop: frozenset = frozenset()

    def write_header_to_file(self, *args, **kwargs):  # the header counts the key/values: change them first
        kv = self.kv_data[0]
        for key in self.drop:
            kv.pop(key, None)
        for key, (value, vtype, *sub) in self.overrides.items():
            kv[key] = GGUFValue(value=value, type=vtype, sub_type=sub[0] if sub else None)
        super().write_header_to_file(*args, **kwargs)


@contextmanager
def _hostile_writer(overrides, drop):
    writer = type("Writer", (_Writer,), {"overrides": overrides, "drop": frozenset(drop)})
    with mock.patch.object(gguf, "GGUFWriter", writer):
        yield


def hostile_gguf(tmp_path: Path, overrides: dict | None = None, drop=(), spec: Spec = Spec(), **kw) -> Path:
    """A tiny llama GGUF (tests/test_gguf_import.py's writer) with some metadata replaced or removed."""
    path = tmp_path / "hostile.gguf"
    with _hostile_writer(overrides or {}, drop):
        write_gguf(path, spec, random_hf_weights(spec), **kw)
    return path


def no_partial_output(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def import_refused(tmp_path: Path, path: Path, *fragments) -> str:
    start = time.perf_counter()
    with pytest.raises(OracleError) as info:
        import_gguf(path, tmp_path / "out", progress=False)
    assert time.perf_counter() - start < SECONDS
    assert no_partial_output(tmp_path)
    message = str(info.value)
    assert_one_line(message, str(path), *fragments)
    return message


V = len(tiny_vocab())
A = "llama."
TOKENS = tiny_vocab()
BAD_UTF8_TOKENS = TOKENS[:-1] + [b"\xff\xfe"]

HOSTILE_METADATA = [
    # counts: zero, negative, missing, wrong type, per-layer lists, disagreeing with the tensors
    ("head-count-0", {A + "attention.head_count": (0, T.UINT32)}, (), "attention.head_count = 0"),
    ("head-count-negative", {A + "attention.head_count": (-4, T.INT32)}, (), "out of range"),
    ("head-count-float", {A + "attention.head_count": (4.0, T.FLOAT32)}, (), "not an integer"),
    ("head-count-string", {A + "attention.head_count": ("4", T.STRING)}, (), "not an integer"),
    ("head-count-bool", {A + "attention.head_count": (True, T.BOOL)}, (), "not an integer"),
    ("head-count-missing", {}, (A + "attention.head_count",), "'llama.attention.head_count' is missing"),
    ("head-count-huge", {A + "attention.head_count": (2**40, T.UINT64)}, (), "out of range"),
    ("head-count-layers-differ", {A + "attention.head_count": ([4, 2], T.ARRAY, T.UINT32)}, (), "differs between layers"),
    ("head-count-wrong", {A + "attention.head_count": (2, T.UINT32)}, (), "head_dim 32"),
    ("head-count-wrong-with-dims", {A + "attention.head_count": (2, T.UINT32), A + "attention.key_length": (16, T.UINT32),
                                    A + "attention.value_length": (16, T.UINT32)}, (), "shape"),
    ("kv-heads-0", {A + "attention.head_count_kv": (0, T.UINT32)}, (), "head_count_kv = 0"),
    ("kv-heads-not-divisor", {A + "attention.head_count_kv": (3, T.UINT32)}, (), "not a multiple"),
    ("block-count-1e9", {A + "block_count": (10**9, T.UINT32)}, (), "block_count = 1000000000"),
    ("block-count-0", {A + "block_count": (0, T.UINT32)}, (), "block_count = 0"),
    ("block-count-fewer", {A + "block_count": (1, T.UINT32)}, (), "blk.0 to blk.1"),
    ("block-count-missing", {}, (A + "block_count",), "block_count"),
    ("embedding-length-0", {A + "embedding_length": (0, T.UINT32)}, (), "embedding_length = 0"),
    ("embedding-length-wrong", {A + "embedding_length": (32, T.UINT32), A + "attention.key_length": (16, T.UINT32),
                                A + "attention.value_length": (16, T.UINT32)}, (), "shape"),
    ("embedding-not-multiple", {A + "embedding_length": (63, T.UINT32)}, (), "not a multiple of head_count"),
    ("ffn-0", {A + "feed_forward_length": (0, T.UINT32)}, (), "feed_forward_length = 0"),
    ("ffn-layers-differ", {A + "feed_forward_length": ([96, 97], T.ARRAY, T.UINT32)}, (), "differs between layers"),
    ("ffn-list-of-str", {A + "feed_forward_length": (["96"], T.ARRAY, T.STRING)}, (), "not a list of integers"),
    ("key-length-odd", {A + "attention.key_length": (15, T.UINT32), A + "attention.value_length": (15, T.UINT32),
                        A + "rope.dimension_count": (15, T.UINT32)}, (), "odd"),
    ("key-length-0", {A + "attention.key_length": (0, T.UINT32)}, (), "key_length = 0"),
    ("context-0", {A + "context_length": (0, T.UINT32)}, (), "context_length = 0"),
    ("vocab-size-wrong", {A + "vocab_size": (V + 1, T.UINT32)}, (), "vocab_size"),
    # floats
    ("eps-0", {A + "attention.layer_norm_rms_epsilon": (0.0, T.FLOAT32)}, (), "positive finite"),
    ("eps-nan", {A + "attention.layer_norm_rms_epsilon": (float("nan"), T.FLOAT32)}, (), "positive finite"),
    ("eps-string", {A + "attention.layer_norm_rms_epsilon": ("1e-5", T.STRING)}, (), "positive finite"),
    ("theta-negative", {A + "rope.freq_base": (-1.0, T.FLOAT32)}, (), "rope.freq_base"),
    ("theta-float64-huge", {A + "rope.freq_base": (1e300, T.FLOAT64)}, (), "float32"),
    ("rope-factor-inf", {A + "rope.scaling.type": ("linear", T.STRING), A + "rope.scaling.factor": (float("inf"), T.FLOAT32)},
     (), "rope.scaling.factor"),
    ("rope-type-int", {A + "rope.scaling.type": (1, T.UINT32)}, (), "rope.scaling.type"),
    ("architecture-int", {"general.architecture": (7, T.UINT32)}, (), "architecture"),
    # token ids past the vocabulary
    ("bos-past-vocab", {"tokenizer.ggml.bos_token_id": (V, T.UINT32)}, (), f"bos_token_id = {V}"),
    ("eos-past-vocab", {"tokenizer.ggml.eos_token_id": (10**6, T.UINT32)}, (), "eos_token_id = 1000000"),
    ("eos-negative", {"tokenizer.ggml.eos_token_id": (-1, T.INT32)}, (), "eos_token_id = -1"),
    ("pad-past-vocab", {"tokenizer.ggml.padding_token_id": (V + 5, T.UINT32)}, (), "padding_token_id"),
    ("unk-past-vocab", {"tokenizer.ggml.unknown_token_id": (2**32 - 1, T.UINT32)}, (), "unknown_token_id"),
    ("bos-float", {"tokenizer.ggml.bos_token_id": (1.0, T.FLOAT32)}, (), "not an integer"),
    ("add-bos-without-bos", {"tokenizer.ggml.add_bos_token": (True, T.BOOL)}, ("tokenizer.ggml.bos_token_id",),
     "add_bos_token is true"),
    ("add-bos-string", {"tokenizer.ggml.add_bos_token": ("false", T.STRING)}, (), "not a boolean"),
    # the vocabulary
    ("tokens-not-utf8", {"tokenizer.ggml.tokens": (BAD_UTF8_TOKENS, T.ARRAY, T.STRING)}, (),
     "tokenizer.ggml.tokens holds text that is not valid UTF-8"),
    ("chat-template-not-utf8", {"tokenizer.chat_template": (b"{{ \xff }}", T.STRING)}, (), "tokenizer.chat_template"),
    ("pre-not-utf8", {"tokenizer.ggml.pre": (b"smol\xc3", T.STRING)}, (), "tokenizer.ggml.pre"),
    ("tokens-are-ints", {"tokenizer.ggml.tokens": (list(range(V)), T.ARRAY, T.INT32)}, (), "not a list of strings"),
    ("tokens-too-few", {"tokenizer.ggml.tokens": (TOKENS[:-1], T.ARRAY, T.STRING)}, (), "token_embd has"),
    ("tokens-duplicated", {"tokenizer.ggml.tokens": (TOKENS[:-1] + [TOKENS[5]], T.ARRAY, T.STRING)}, (), "appears twice"),
    ("tokens-missing", {}, ("tokenizer.ggml.tokens",), "tokenizer.ggml.tokens"),
    ("token-types-short", {"tokenizer.ggml.token_type": ([1, 1], T.ARRAY, T.INT32)}, (), "token_type"),
    ("merges-unknown-token", {"tokenizer.ggml.merges": (["Ġ t", "q \u2603"], T.ARRAY, T.STRING)}, (), "not a valid BPE"),
    ("merges-not-pairs", {"tokenizer.ggml.merges": (["a b c"], T.ARRAY, T.STRING)}, (), "two space-separated"),
    ("merges-ints", {"tokenizer.ggml.merges": ([1, 2], T.ARRAY, T.INT32)}, (), "not a list of strings"),
    ("chat-template-int", {"tokenizer.chat_template": (5, T.UINT32)}, (), "tokenizer.chat_template"),
    ("pre-int", {"tokenizer.ggml.pre": (5, T.UINT32)}, (), "tokenizer.ggml.pre"),
]


@pytest.mark.parametrize("overrides, drop, fragment", [c[1:] for c in HOSTILE_METADATA], ids=[c[0] for c in HOSTILE_METADATA])
def test_hostile_gguf_metadata_is_refused_before_any_output(tmp_path, overrides, drop, fragment):
    path = hostile_gguf(tmp_path, overrides, drop)
    import_refused(tmp_path, path, fragment)


def test_hostile_builder_without_changes_round_trips(tmp_path):
    spec = Spec()
    path = hostile_gguf(tmp_path, spec=spec)
    out = import_gguf(path, tmp_path / "out", progress=False)
    got, expected = load_file(out / "model.safetensors"), random_hf_weights(spec)
    assert set(got) == set(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_embedding_that_is_not_a_matrix(tmp_path):
    spec = Spec()
    hf = random_hf_weights(spec)
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"].reshape(-1)
    path = tmp_path / "flat.gguf"
    write_gguf(path, spec, hf)
    import_refused(tmp_path, path, "token_embd.weight", "matrix")


@pytest.mark.parametrize("error, fragment", [
    (ValueError("cannot reshape"), "conversion failed (ValueError: cannot reshape)"),
    (MemoryError(), "out of memory"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (OracleError("a clean error"), "a clean error"),
])
def test_failure_while_converting_removes_the_staging_directory(tmp_path, monkeypatch, error, fragment):
    path = hostile_gguf(tmp_path)
    real, calls = gguf.quants.dequantize, []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise error
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", failing)
    with pytest.raises(OracleError) as info:
        import_gguf(path, tmp_path / "out", progress=False)
    assert_one_line(str(info.value), fragment)
    assert no_partial_output(tmp_path)


def test_interrupt_while_converting_removes_the_staging_directory(tmp_path, monkeypatch):
    path = hostile_gguf(tmp_path)

    def interrupted(data, qtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.quants, "dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(path, tmp_path / "out", progress=False)
    assert no_partial_output(tmp_path)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_left_by_a_killed_import_is_removed_next_time(tmp_path):
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname()) or "host"
    stale = tmp_path / f".out.partial-{host}-{_dead_pid()}-0123abcd"
    alive = tmp_path / f".out.partial-{host}-{os.getppid()}-0123abcd"  # another live process: left alone
    other = tmp_path / f".other.partial-{host}-{_dead_pid()}-0123abcd"  # another output: left alone
    for d in (stale, alive, other):
        d.mkdir()
        (d / "config.json").write_text("{}")
    import_gguf(hostile_gguf(tmp_path), tmp_path / "out", progress=False)
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_damaged_files_are_refused_or_imported_never_a_traceback(tmp_path):
    """Truncations and flipped bytes anywhere in a valid file: an OracleError or a complete import."""
    good = hostile_gguf(tmp_path).read_bytes()
    rng = np.random.default_rng(14)
    variants = [good[:n] for n in (0, 3, 4, 8, 16, 24, 100, 1000, len(good) // 2, len(good) - 1)]
    header_end = min(len(good), 12_000)  # metadata lives at the front; flip bytes there more often
    for _ in range(30):
        data = bytearray(good)
        for i in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
            data[i] = int(rng.integers(0, 256))
        variants.append(bytes(data))
    outcomes = set()
    for i, data in enumerate(variants):
        path = tmp_path / f"damaged{i}.gguf"
        path.write_bytes(data)
        out = tmp_path / f"out{i}"
        try:
            import_gguf(path, out, progress=False)
            outcomes.add("imported")
            assert (out / "model.safetensors").is_file()
        except OracleError as e:
            outcomes.add("refused")
            assert_one_line(str(e))
            assert not out.exists() and not list(tmp_path.glob(f".out{i}.partial-*"))
    assert "refused" in outcomes


def test_cli_block_count_1e9_in_a_subprocess(tmp_path):
    path = hostile_gguf(tmp_path, {A + "block_count": (10**9, T.UINT32)})
    result = run_asl("import-gguf", str(path), "--out", str(tmp_path / "out"))
    assert_clean_cli_error(result, "block_count = 1000000000", str(path))
    assert no_partial_output(tmp_path)


def test_cli_head_count_zero(tmp_path, capsys):
    path = hostile_gguf(tmp_path, {A + "attention.head_count": (0, T.UINT32)})
    assert main(["import-gguf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attention.head_count = 0" in err and "convert_hf_to_gguf" in err
    assert no_partial_output(tmp_path)
