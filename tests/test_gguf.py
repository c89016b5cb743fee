"""GGUF export: the file read back with gguf's own reader, then run by real llama.cpp (through
llama-cpp-python) next to Wren's model: the same token ids, logits within each type's tolerance,
and the same greedy replies, for a Llama-shaped, a Qwen2-shaped and a Qwen3-shaped (QK-norm) model.

The llama.cpp tests need llama-cpp-python, which `make setup` builds once from source into a
cached wheel; without it they are skipped and the file-level tests still run.
"""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from helpers import build_chat_model, wren

from wren.checkpoint import load_model, save_checkpoint
from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.sampling import SamplingParams
from wren.interop.gguf import export_gguf, interleave_rotary_rows, pre_tokenizer_type
from wren.model import CausalLM, preset_config
from wren.model.rope import RotaryEmbedding, apply_rotary
from wren.tokenizer import Tokenizer

try:
    import llama_cpp
except ImportError:  # built from source by `make setup`; see the Makefile's llama-cpp target
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed (`make setup` builds and installs it)"
)

# English, Chinese, digits, contractions, runs of spaces and newlines, the think markers, and the
# chat template's special tokens around it all.
MESSAGES = [
    {"role": "system", "content": "You add numbers. 你好，世界！"},
    {"role": "user", "content": "What is 3 plus 4?\n  It's  <think>maybe</think> 七 plus 8 = 15...  \n\nok "},
]

# Largest |llama.cpp - Wren| logit difference accepted per file type, and the least share of
# prompt positions whose top token must agree. Measured on the trained test models (logits span
# about ±11): f32 1.1e-5 / 1.4e-5 / 4.5e-6 (Llama / Qwen2 / Qwen3; summation order only), f16
# 5.8e-3 / 1.6e-2 / 1.3e-2, q8_0 0.10 (99% same top token; Qwen3 0.26, so not tested), q4_0 1.7
# (97%). Over all 100 addition prompts, greedy replies were identical for f32, f16 and q8_0, and
# for 95 of them with q4_0 (Qwen3: f32 and f16 all 100).
TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "q8_0": 0.25, "q4_0": 2.5}
TOP_TOKEN_AGREEMENT = {"f32": 1.0, "f16": 0.95, "q8_0": 0.95, "q4_0": 0.9}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained Llama-shaped chat model, a Qwen2-shaped one (q/k/v biases) and a Qwen3-shaped one
    (QK-norm)."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        "llama": build_chat_model(root / "llama"),
        "qwen2": build_chat_model(root / "qwen2", settings={"qkv_bias": True}),
        "qwen3": build_chat_model(root / "qwen3", settings={"qk_norm": True}),
    }


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """(arch, type) -> GGUF file. The Llama exports go through the CLI in a real process."""
    root = tmp_path_factory.mktemp("gguf-files")
    files = {}
    for file_type in ("f32", "f16", "q8_0"):
        out = root / f"llama-{file_type}.gguf"
        result = wren("export", "gguf", models["llama"], "--out", out, "--type", file_type)
        assert result.returncode == 0, result.stderr
        assert "llama GGUF" in result.stdout and str(out) in result.stdout
        files["llama", file_type] = out
    files["llama", "q4_0"] = export_gguf(models["llama"], root / "llama-q4_0.gguf", "q4_0").path
    for arch in ("qwen2", "qwen3"):
        for file_type in ("f32", "f16"):
            out = root / f"{arch}-{file_type}.gguf"
            files[arch, file_type] = export_gguf(models[arch], out, file_type).path
    return files


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensor(reader: GGUFReader, name: str):
    return next(t for t in reader.tensors if t.name == name)


# -- the file, read back --------------------------------------------------------------------------


def test_metadata_describes_the_model_and_tokenizer(models, exports):
    config = load_model(models["llama"]).config
    tokenizer = Tokenizer.load(models["llama"])
    reader = GGUFReader(exports["llama", "f32"])
    assert field(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": config.ffn_dim,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.vocab_size": tokenizer.vocab_size,
        "llama.rope.freq_base": config.rope_theta,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:5] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tokens[100] == tokenizer.id_to_token(100)
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:6] == [TokenType.CONTROL] * 3 + [TokenType.USER_DEFINED] * 2 + [TokenType.NORMAL]
    merges = json.loads((models["llama"] / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    ids = {
        key: field(reader, f"tokenizer.ggml.{key}")
        for key in ("bos_token_id", "eos_token_id", "padding_token_id")
    }
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 0}
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_llama_q_and_k_rows_are_interleaved_and_tied_output_is_left_out(models, exports):
    state = load_model(models["llama"]).state_dict()
    reader = GGUFReader(exports["llama", "f32"])
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses it
    q = state["model.layers.1.self_attn.q_proj.weight"].numpy()
    k = state["model.layers.1.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_q.weight").data, interleave_rotary_rows(q, 4))
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_k.weight").data, interleave_rotary_rows(k, 2))
    assert not np.array_equal(tensor(reader, "blk.1.attn_q.weight").data, q)


def test_qwen2_keeps_the_rotate_half_layout_and_its_biases(models, exports):
    state = load_model(models["qwen2"]).state_dict()
    reader = GGUFReader(exports["qwen2", "f32"])
    assert field(reader, "general.architecture") == "qwen2"
    for name, key in (("attn_q.weight", "q_proj.weight"), ("attn_k.bias", "k_proj.bias")):
        expected = state[f"model.layers.0.self_attn.{key}"].numpy()
        assert np.abs(expected).max() > 0  # trained away from zero: a real check of the bias
        np.testing.assert_array_equal(tensor(reader, f"blk.0.{name}").data, expected)


def test_qwen3_carries_the_qk_norms_in_the_rotate_half_layout(models, exports):
    state = load_model(models["qwen3"]).state_dict()
    reader = GGUFReader(exports["qwen3", "f32"])
    assert field(reader, "general.architecture") == "qwen3"
    assert field(reader, "qwen3.attention.key_length") == 16
    for name, key in (
        ("attn_q.weight", "q_proj.weight"),  # NEOX rope in llama.cpp: not permuted
        ("attn_k.weight", "k_proj.weight"),
        ("attn_q_norm.weight", "q_norm.weight"),
        ("attn_k_norm.weight", "k_norm.weight"),
    ):
        expected = state[f"model.layers.1.self_attn.{key}"].numpy()
        np.testing.assert_array_equal(tensor(reader, f"blk.1.{name}").data, expected)
    assert np.abs(state["model.layers.1.self_attn.q_norm.weight"].numpy() - 1).max() > 1e-2  # trained


def test_quantised_files_keep_norms_in_f32(exports):
    reader = GGUFReader(exports["llama", "q8_0"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    f16 = {t.name: t.tensor_type for t in GGUFReader(exports["llama", "f16"]).tensors}
    assert f16["blk.0.ffn_up.weight"] == GGMLQuantizationType.F16
    assert f16["blk.0.ffn_norm.weight"] == GGMLQuantizationType.F32
    q4 = {t.name: t.tensor_type for t in GGUFReader(exports["llama", "q4_0"]).tensors}
    assert q4["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q4_0
    assert q4["token_embd.weight"] == GGMLQuantizationType.Q8_0  # the output matrix too: kept finer


def test_interleaving_turns_rotate_half_into_adjacent_pair_rotation():
    """The permutation is right: rotating the permuted projection's pairs (2i, 2i+1), Meta-style,
    gives the rotate-half result with its rows in the permuted order."""
    torch.manual_seed(0)
    config = preset_config("micro", dim=64, n_heads=4, n_kv_heads=2)
    weight, x = torch.randn(64, 64), torch.randn(5, 64)
    cos, sin = RotaryEmbedding(config)(torch.arange(5)[None], torch.float32)
    half = apply_rotary((x @ weight.T).view(5, 4, 16).transpose(0, 1), cos[0], sin[0])

    permuted = torch.from_numpy(interleave_rotary_rows(weight.numpy(), 4))
    pairs = (x @ permuted.T).view(5, 4, 8, 2).transpose(0, 1)
    angle_cos, angle_sin = cos[0, 0, :, :8], sin[0, 0, :, :8]  # one angle per pair
    even, odd = pairs[..., 0], pairs[..., 1]
    meta = torch.stack((even * angle_cos - odd * angle_sin, even * angle_sin + odd * angle_cos), dim=-1)
    expected = interleave_rotary_rows(half.transpose(0, 1).reshape(5, 64).T.numpy(), 4).T
    np.testing.assert_allclose(meta.transpose(0, 1).reshape(5, 64).numpy(), expected, atol=1e-5)


def test_pre_tokenizer_type_follows_the_split_regex(models):
    wren_json = json.loads((models["llama"] / "tokenizer.json").read_text())
    assert pre_tokenizer_type(wren_json) == "gpt-2"
    qwen_regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    qwen = {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": qwen_regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
    }
    assert pre_tokenizer_type(qwen) == "qwen2"
    with pytest.raises(WrenError, match="pre-tokenizer"):
        pre_tokenizer_type({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})


def test_models_llama_cpp_cannot_run_exactly_are_refused(tmp_path, models):
    tokenizer = Tokenizer.load(models["llama"])
    cases = {
        "dynamic": dict(rope_scaling={"kind": "dynamic", "factor": 2.0}),
        "norm_topk_prob": dict(n_experts=4, qkv_bias=True),  # Wren's default renormalises top-k
        "biases": dict(qk_norm=True, qkv_bias=True, o_bias=True),  # llama.cpp's qwen3 reads none
        # qwen3moe always renormalises the top-k weights
        "renormalise": dict(qk_norm=True, n_experts=4, shared_expert_ffn_dim=0, norm_topk_prob=False),
    }
    for name, settings in cases.items():
        config = preset_config("micro", vocab_size=tokenizer.vocab_size, dim=64, n_layers=1, **settings)
        save_checkpoint(CausalLM(config), tmp_path / name, tokenizer)
        result = wren("export", "gguf", tmp_path / name, "--out", tmp_path / f"{name}.gguf")
        assert result.returncode == 2 and name.split("_")[0] in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / f"{name}.gguf").exists()


# -- run by llama.cpp -----------------------------------------------------------------------------


def open_llama(path, n_ctx: int = 256, **kwargs):
    # f32 K/V cache: llama.cpp's default f16 cache would add its own rounding to the comparison.
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=2,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
        **kwargs,
    )


def prompt_ids(model_dir) -> list[int]:
    return Tokenizer.load(model_dir).apply_chat_template(MESSAGES, add_generation_prompt=True)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_tokenises_like_wren(models, exports, arch):
    tokenizer = Tokenizer.load(models[arch])
    llm = open_llama(exports[arch, "f32"])
    chat = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for text in (chat, "plain text: 3 plus 4 is 7.\n\n  再见 ", "  leading\tand trailing  ", "a\nb"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
    # Without special-token parsing the markers are plain text, but <think> (user-defined) stays whole.
    assert llm.tokenize(b"<think>", add_bos=False, special=False) == [3]
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=False) != [2]
    assert llm.detokenize(tokenizer.encode(chat), special=True).decode() == chat


@needs_llama_cpp
@pytest.mark.parametrize(
    ("arch", "file_type"),
    [
        ("llama", "f32"),
        ("llama", "f16"),
        ("llama", "q8_0"),
        ("llama", "q4_0"),
        ("qwen2", "f32"),
        ("qwen2", "f16"),
        ("qwen3", "f32"),
        ("qwen3", "f16"),
    ],
)
def test_llama_cpp_logits_match_wren(models, exports, arch, file_type):
    ids = prompt_ids(models[arch])
    with torch.inference_mode():
        expected = load_model(models[arch])(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(exports[arch, file_type])
    llm.eval(ids)
    got = llm.scores[: len(ids)]
    difference = np.abs(got - expected).max()
    span = np.abs(expected).max()
    print(f"{arch} {file_type}: max |logit difference| {difference:.2e} (logits span ±{span:.1f})")
    assert difference < TOLERANCE[file_type]
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= TOP_TOKEN_AGREEMENT[file_type]


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stops:  # Wren's Result leaves the stop token out too
            break
        out.append(token)
        llm.eval([token])
    return out


@needs_llama_cpp
@pytest.mark.parametrize(
    ("arch", "file_type"),
    [("llama", "f32"), ("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f32"), ("qwen3", "f32")],
)
def test_llama_cpp_greedy_generation_matches_wren_engine(models, exports, arch, file_type):
    tokenizer = Tokenizer.load(models[arch])
    engine = Engine(load_model(models[arch]), tokenizer)
    prompts = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in ((3, 4), (9, 8), (0, 6))]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    llm = open_llama(exports[arch, file_type])
    for messages, result in zip(prompts, engine.generate(prompts, params), strict=True):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        tokens = llama_cpp_greedy(llm, ids, 24, set(tokenizer.stop_token_ids))
        assert tokens == result.token_ids, (tokenizer.decode(tokens), result.text)
    assert "plus" in result.text  # a trained model: replies in the learnt pattern, not noise


@needs_llama_cpp
def test_llama_cpp_chat_completion_uses_the_embedded_chat_template(models, exports):
    """llama-cpp-python's own chat path (template from the file, stop on <|im_end|>) replies as Wren does."""
    tokenizer = Tokenizer.load(models["llama"])
    messages = [{"role": "user", "content": "What is 2 plus 5?"}]
    wren_reply = Engine(load_model(models["llama"]), tokenizer).generate(
        [messages], SamplingParams(temperature=0, max_new_tokens=24)
    )[0]
    llm = open_llama(exports["llama", "f32"])
    reply = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=24)
    assert reply["choices"][0]["message"]["content"] == wren_reply.text
    assert reply["choices"][0]["finish_reason"] == "stop"


def random_checkpoint(directory, tokenizer: Tokenizer, **settings):
    """A random two-layer model with weights large enough (std 0.3) for attention to be sharp, so
    rotary positions and expert routing change the logits a lot; biases and QK-norm weights random too."""
    torch.manual_seed(0)
    config = preset_config(
        "micro", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, init_std=0.3, **settings
    )
    model = CausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.normal_(1, 0.3)
    return save_checkpoint(model, directory, tokenizer)


LONG = dict(max_seq_len=128, rope_theta=10000.0)
SHAPES = {
    "qwen2moe": dict(n_experts=4, n_experts_per_token=2, norm_topk_prob=False, qkv_bias=True),
    "qwen3moe": dict(qk_norm=True, n_experts=4, n_experts_per_token=2, shared_expert_ffn_dim=0),
    "qwen3moe-top1": dict(qk_norm=True, n_experts=4, n_experts_per_token=1, shared_expert_ffn_dim=0),
    "untied-output": dict(tie_embeddings=False),
    "linear": dict(LONG, rope_scaling=dict(kind="linear", factor=4.0)),
    "llama3": dict(LONG, rope_scaling=dict(kind="llama3", factor=4.0, original_max_position_embeddings=32)),
    "yarn-qwen2": dict(
        LONG,
        qkv_bias=True,
        rope_scaling=dict(kind="yarn", factor=4.0, original_max_position_embeddings=32, attention_factor=1.3),
    ),
    # Qwen3's heads may be wider than dim / n_heads (here 4 x 32 on dim 64).
    "yarn-qwen3-wide-heads": dict(
        LONG,
        qk_norm=True,
        head_dim=32,
        rope_scaling=dict(kind="yarn", factor=4.0, original_max_position_embeddings=32),
    ),
}


@needs_llama_cpp
@pytest.mark.parametrize("shape", SHAPES)
def test_llama_cpp_runs_moe_and_scaled_rope_models_like_wren(tmp_path, models, shape):
    """Qwen2-MoE, Qwen3-MoE, an untied output matrix, wide Qwen3 heads, and rotary scaling (linear,
    Llama 3, YaRN) over 100 positions, 3x past the trained 32 where it applies: f32 logits within
    1e-4. The same weights without the scaling give logits far apart, so the scaling is really
    carried over."""
    model_dir = random_checkpoint(tmp_path / "model", Tokenizer.load(models["llama"]), **SHAPES[shape])
    path = export_gguf(model_dir, tmp_path / "model.gguf", "f32").path
    reader = GGUFReader(path)
    if shape.startswith(("qwen2moe", "qwen3moe")):
        arch = shape.split("-")[0]
        assert field(reader, "general.architecture") == arch
        assert field(reader, f"{arch}.expert_count") == 4
        assert field(reader, f"{arch}.expert_used_count") == SHAPES[shape]["n_experts_per_token"]
    if shape in ("qwen2moe", "untied-output"):  # qwen2moe has no tied fallback: it always stores one
        assert "output.weight" in {t.name for t in reader.tensors}

    ids = torch.randint(5, 280, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    model = load_model(model_dir)
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        if model.config.rope_scaling is not None:
            model.config.rope_scaling = None
            model.model.rotary_emb = RotaryEmbedding(model.config)
            unscaled = model(torch.tensor([ids])).logits[0].numpy()
            assert np.abs(unscaled - expected).max() > 1.0
    llm = open_llama(path, n_ctx=model.config.max_seq_len)
    llm.eval(ids)
    assert np.abs(llm.scores[: len(ids)] - expected).max() < 1e-4
