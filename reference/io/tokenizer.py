"""Tokenizer: a checkpoint's tokenizer.json (via the `tokenizers` library) and its chat template.

The chat template is the Jinja template a checkpoint ships in
tokenizer_config.json (or chat_template.jinja), rendered the way Hugging Face
renders it (jinja2's ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
the loopcontrols extension, ``raise_exception`` and a non-escaping ``tojson``),
then encoded without adding special tokens again.
It is rendered by `reference.io.chat_template`, a sandbox with limits on work and size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reference.errors import OracleError
from reference.io.chat_template import CHAT_FIX, _one_line, _short, render


@dataclass(frozen=True)
class Tokenizer:
    backend: object  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    template_source: str | None = None  # the file chat_template came from, for messages
    template_error: str | None = None  # why the chat template cannot be used, found when loading

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the Rust library takes only str that is valid Unicode
            raise OracleError(_not_text(text)) from None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _not_text(text) -> str:
    """Why the tokenizer refused ``text``: not a str, or a str that is not valid Unicode."""
    if not isinstance(text, str):
        return f"the prompt must be text, got {type(text).__name__}"
    i, ch = next(((i, c) for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), (None, None))
    if ch is None:
        return "the tokenizer refused the prompt; pass plain UTF-8 text"
    if "\udc80" <= ch <= "\udcff":  # how Python keeps the bytes of command-line text that is not UTF-8
        return (f"the prompt is not valid UTF-8 (byte 0x{ord(ch) - 0xdc00:02x} at character {i}); "
                "re-encode it as UTF-8, e.g. with iconv -t UTF-8")
    return f"the prompt holds a lone surrogate U+{ord(ch):04X} at character {i}; pass valid Unicode text"


# ----------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OracleError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions or delete it") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OracleError(
            f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it as UTF-8"
        ) from None


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = _read_text(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise OracleError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file or delete it"
        ) from None
    except RecursionError:
        raise OracleError(f"{path}: JSON nested too deeply to read; fix the file or delete it") from None
    if not isinstance(config, dict):
        raise OracleError(f"{path}: must hold a JSON object, not a {type(config).__name__}; fix the file or delete it")
    return config


def _token_text(value, key: str, path: Path) -> tuple[str | None, str | None]:
    """(token text, error) of tokenizer_config.json's bos_token / eos_token."""
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value, None
    return None, f"{path}: {key} must be a string, null or {{\"content\": string}}, not {_short(value)}"


def _read_chat_template(model_dir: Path, tok_config: dict, config_path: Path) -> tuple[str | None, str, str | None]:
    """(template, the file it is in, error): the error says why the template is unusable."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return _read_text(jinja), str(jinja), None
        except OracleError as e:
            return None, str(jinja), str(e)
    source = str(config_path)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates [{"name": ..., "template": ...}]: use "default"
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            return None, source, (f"{source}: chat_template is a list but not of {{\"name\": string, \"template\": "
                                  f"string}} entries; {CHAT_FIX}")
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            return None, source, (f"{source}: chat_template names {', '.join(map(repr, named)) or 'no'} templates, "
                                  f"none of them 'default'; {CHAT_FIX}")
        return named["default"], source, None
    if template is not None and not isinstance(template, str):
        return None, source, f"{source}: chat_template must be a string, not {_short(template)}; {CHAT_FIX}"
    return template, source, None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load tokenizer.json and the chat template / special tokens of tokenizer_config.json."""
    from tokenizers import Tokenizer as Backend

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise OracleError(f"{model_dir}: no tokenizer.json; pass --prompt-ids with token ids instead")
    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception
        raise OracleError(f"{path}: not a valid tokenizer.json ({_one_line(e)})") from None
    config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_tokenizer_config(config_path)
    template, source, error = _read_chat_template(model_dir, tok_config, config_path)
    bos, bos_error = _token_text(tok_config.get("bos_token"), "bos_token", config_path)
    eos, eos_error = _token_text(tok_config.get("eos_token"), "eos_token", config_path)
    token_error = bos_error or eos_error
    if error is None and token_error is not None:
        error = f"{token_error}; the chat template needs it: fix it there, or run without --chat"
    return Tokenizer(backend=backend, chat_template=template, bos_token=bos, eos_token=eos,
                     template_source=source, template_error=error)


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The checkpoint's chat template applied to messages [{"role", "content"}, ...]."""
    where = tok.template_source or "the checkpoint's tokenizer_config.json"
    if tok.template_error:
        raise OracleError(tok.template_error)
    if not tok.chat_template:
        raise OracleError("this checkpoint has no chat template; drop --chat and pass the raw prompt")
    context = dict(messages=messages, add_generation_prompt=add_generation_prompt,
                   bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    n_messages = len(messages) if isinstance(messages, (list, tuple)) else 1
    return render(tok.chat_template, context, n_messages, where)


def encode_chat(tok: Tokenizer, user_text: str) -> list[int]:
    """One user turn in the chat template, ready for the assistant's answer."""
    text = render_chat(tok, [{"role": "user", "content": user_text}])
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        where = tok.template_source or "the checkpoint's tokenizer_config.json"
        raise OracleError(f"{where}: chat_template rendered text that encodes to no tokens; {CHAT_FIX}")
    return ids
