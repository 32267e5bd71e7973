"""Tokenizer: a checkpoint's tokenizer.json (via the `tokenizers` library) and its chat template.

The chat template is the Jinja template a checkpoint ships in
tokenizer_config.json (or chat_template.jinja), rendered in a sandbox the way
Hugging Face renders it, then encoded without adding special tokens again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reference.errors import OracleError


@dataclass(frozen=True)
class Tokenizer:
    backend: object  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def _read_chat_template(model_dir: Path, tok_config: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


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
        raise OracleError(f"{path}: not a valid tokenizer.json ({e})") from None
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Tokenizer(
        backend=backend,
        chat_template=_read_chat_template(model_dir, tok_config),
        bos_token=_token_text(tok_config.get("bos_token")),
        eos_token=_token_text(tok_config.get("eos_token")),
    )


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The checkpoint's chat template applied to messages [{"role", "content"}, ...]."""
    if not tok.chat_template:
        raise OracleError("this checkpoint has no chat template; drop --chat and pass the raw prompt")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    # As Hugging Face does: no HTML escaping, non-ASCII kept.
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(tok.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
        )
    except TemplateError as e:
        raise OracleError(f"the checkpoint's chat template failed: {e}") from None


def encode_chat(tok: Tokenizer, user_text: str) -> list[int]:
    """One user turn in the chat template, ready for the assistant's answer."""
    text = render_chat(tok, [{"role": "user", "content": user_text}])
    return tok.encode(text, add_special_tokens=False)
