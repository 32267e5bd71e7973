"""The `asl` command: completions, --help, and one-line errors (exit 2) for bad input."""

import json
import subprocess
import sys

import pytest

from reference.cli import main
from tests.conftest import CHECKPOINTS


def run_asl(*args):
    """Run the CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "reference", *args], capture_output=True, text=True, timeout=300)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asl: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_the_commands():
    out = run_asl("--help")
    assert out.returncode == 0
    for command in ("generate", "fetch", "import-gguf", "demo"):
        assert command in out.stdout


def test_generate_on_a_tiny_checkpoint(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("[5 prompt tokens, ")  # "hello": 5 bytes, 5 tokens
    assert out.endswith("\n")


def test_prompt_ids_and_text_give_the_same_completion(tmp_path, capsys):
    ids_file = tmp_path / "ids.json"
    # "hi" in the tiny byte-level tokenizer: byte b has id 3 + b
    ids_file.write_text(json.dumps([3 + ord("h"), 3 + ord("i")]))
    main(["generate", "--model", "tiny-qwen2", "--prompt-ids", str(ids_file), "--max-new-tokens", "6"])
    from_ids = capsys.readouterr().out
    main(["generate", "--model", "tiny-qwen2", "--prompt", "hi", "--max-new-tokens", "6"])
    assert capsys.readouterr().out == from_ids


def test_fetch_tiny_alias_prints_its_directory():
    out = run_asl("fetch", "tiny-llama")
    assert out.returncode == 0
    assert out.stdout.strip().splitlines()[-1] == str(CHECKPOINTS / "tiny-llama")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--prompt", ""], ["prompt is empty"]),
        (["--prompt-ids", "/nonexistent/ids.json"], ["not found"]),
        (["--prompt", "x" * 5000], ["max_position_embeddings (4096)"]),
        (["--prompt", "hi", "--max-new-tokens", "-1"], ["max_new_tokens must be >= 0"]),
    ],
)
def test_bad_generate_input_is_one_clear_line(args, fragments):
    assert_clean_error(run_asl("generate", "--model", "tiny-llama", *args), *fragments)


def test_bad_prompt_ids_files(tmp_path):
    bad = tmp_path / "bad.json"
    for content, fragment in [("[1, 2,", "not valid JSON"), ('{"ids": [1]}', "JSON list of integer"),
                              ("[]", "prompt is empty"), ("[1, 99999]", "[0, 259)")]:
        bad.write_text(content)
        assert_clean_error(run_asl("generate", "--model", "tiny-llama", "--prompt-ids", str(bad)), fragment)


def test_missing_model_directory():
    assert_clean_error(run_asl("generate", "--model", "/no/such/dir", "--prompt", "hi"), "/no/such/dir")


def test_sliding_window_smaller_than_the_prompt_is_refused(tmp_path):
    import shutil

    d = tmp_path / "mistral"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg |= {"model_type": "mistral", "sliding_window": 16}
    cfg.pop("rope_scaling")
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_asl("generate", "--model", str(d), "--prompt", "a" * 20, "--max-new-tokens", "1"),
                       "sliding-window attention of 16 tokens")
    ok = run_asl("generate", "--model", str(d), "--prompt", "a" * 10, "--max-new-tokens", "2")
    assert ok.returncode == 0, ok.stderr
