"""`wren convert minimind`: MiniMind .pth state dicts (both key layouts, dense and MoE) become Wren
checkpoints whose logits equal MiniMind's own forward pass, written out independently below."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import wren

from wren.checkpoint import load_model, read_model_config
from wren.cli import main
from wren.interop.minimind import convert_minimind
from wren.tokenizer import Tokenizer, train_tokenizer

DIM, LAYERS, FFN = 64, 2, 192  # FFN: MiniMind's rule, 64 * ceil(int(64 * 8 / 3) / 64)


# -- MiniMind's forward pass, from its source (model_minimind.py and the older model.py) --------------


def rms_norm(x, weight, eps=1e-5):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotary_angles(seq, head_dim, theta):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return torch.outer(torch.arange(seq).float(), freqs)  # (seq, head_dim / 2)


def rope_halves(x, theta):
    """MiniMind2: cos/sin tables concatenated twice, rotate_half."""
    angles = rotary_angles(x.shape[1], x.shape[-1], theta)
    cos, sin = (
        torch.cat([angles.cos()] * 2, -1)[None, :, None],
        torch.cat([angles.sin()] * 2, -1)[None, :, None],
    )
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def rope_pairs(x, theta):
    """Older model.py: adjacent pairs as complex numbers times e^(i * angle)."""
    angles = rotary_angles(x.shape[1], x.shape[-1], theta)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(3)


def swiglu(x, prefix, w):
    gate, up, down = (w[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def moe(x, prefix, w, top_k, renormalise=None):
    """renormalise None: the older rule (only when top_k > 1); the current layout renormalises
    whenever norm_topk_prob is set, top-1 included."""
    flat = x.reshape(-1, x.shape[-1])
    scores = F.softmax(flat @ w[f"{prefix}.gate.weight"].T, dim=-1)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if top_k > 1 if renormalise is None else renormalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    out = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for slot in range(top_k):
            expert = f"{prefix}.experts.{int(ids[token, slot])}"
            out[token] += weights[token, slot] * swiglu(flat[token], expert, w)
    for shared in shared_experts(w, prefix):
        out = out + swiglu(flat, shared, w)  # MiniMind adds each shared expert, ungated
    return out.reshape(x.shape)


def shared_experts(w, prefix):
    return sorted({k.rsplit(".", 2)[0] for k in w if k.startswith(f"{prefix}.shared_experts.")})


def minimind_logits(
    w, ids, n_heads, n_kv_heads, theta=1e6, top_k=2, rope=rope_halves, eps=1e-5, renormalise=None
):
    """w: MiniMind2-named weights (the older layout's tensors are the same, under other names).
    With q_norm / k_norm weights (the current layout), each head's q and k are normalised first."""
    x = w["model.embed_tokens.weight"][ids]
    batch, seq = ids.shape
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
        q, k, v = (h @ w[f"{p}.self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k = q.view(batch, seq, n_heads, -1), k.view(batch, seq, n_kv_heads, -1)
        if f"{p}.self_attn.q_norm.weight" in w:
            q = rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], eps)
        q = rope(q, theta)
        k = rope(k, theta).repeat_interleave(n_heads // n_kv_heads, dim=2)
        v = v.view(batch, seq, n_kv_heads, -1).repeat_interleave(n_heads // n_kv_heads, dim=2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + attn.transpose(1, 2).reshape(batch, seq, -1) @ w[f"{p}.self_attn.o_proj.weight"].T
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
        if f"{p}.mlp.gate.weight" in w:
            x = x + moe(h, f"{p}.mlp", w, top_k, renormalise)
        else:
            x = x + swiglu(h, f"{p}.mlp", w)
    return rms_norm(x, w["model.norm.weight"], eps) @ w["model.embed_tokens.weight"].T


# -- state dicts with MiniMind's names and shapes -------------------------------------------------------


def minimind2_state(vocab, n_heads=8, n_kv_heads=2, n_experts=0, n_shared=0, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.15):
        return torch.randn(*shape, generator=generator) * scale

    head_dim = DIM // n_heads
    w = {
        "model.embed_tokens.weight": rand(vocab, DIM, scale=0.5),
        "model.norm.weight": 1 + rand(DIM, scale=0.1),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.self_attn.q_proj.weight"] = rand(n_heads * head_dim, DIM)
        for name in ("k", "v"):
            w[f"{p}.self_attn.{name}_proj.weight"] = rand(n_kv_heads * head_dim, DIM)
        w[f"{p}.self_attn.o_proj.weight"] = rand(DIM, n_heads * head_dim)
        w[f"{p}.input_layernorm.weight"] = 1 + rand(DIM, scale=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + rand(DIM, scale=0.1)
        experts = [f"{p}.mlp"] if not n_experts else []
        experts += [f"{p}.mlp.experts.{e}" for e in range(n_experts)]
        experts += [f"{p}.mlp.shared_experts.{s}" for s in range(n_shared)]
        for expert in experts:
            w[f"{expert}.gate_proj.weight"] = rand(FFN, DIM)
            w[f"{expert}.up_proj.weight"] = rand(FFN, DIM)
            w[f"{expert}.down_proj.weight"] = rand(DIM, FFN)
        if n_experts:
            w[f"{p}.mlp.gate.weight"] = rand(n_experts, DIM, scale=0.5)
    w["lm_head.weight"] = w["model.embed_tokens.weight"]  # tied: torch.save keeps one storage
    return w


LEGACY_NAMES = [
    ("model.embed_tokens.", "tok_embeddings."),
    ("model.norm.", "norm."),
    ("lm_head.", "output."),
    ("model.layers.", "layers."),
    ("self_attn.q_proj", "attention.wq"),
    ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"),
    ("self_attn.o_proj", "attention.wo"),
    ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.", "feed_forward."),
    ("shared_experts.0.", "shared_experts."),  # the older MoE has one shared expert, unindexed
    ("gate_proj", "w1"),
    ("down_proj", "w2"),
    ("up_proj", "w3"),
]


def legacy_state(w):
    out = {}
    for key, tensor in w.items():
        for new, old in LEGACY_NAMES:
            key = key.replace(new, old)
        out[key] = tensor
    out["layers.0.attention.mask"] = torch.full((1, 1, 8, 8), float("-inf")).triu(1)  # v1 saved this buffer
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.jsonl"
    text = "MiniMind is a small language model. Wren imports its checkpoints and runs them. " * 4
    corpus.write_text("".join(json.dumps({"text": f"{text} {n}"}) + "\n" for n in range(50)))
    return train_tokenizer([corpus], vocab_size=300).save(directory / "tokenizer")


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> int:
    return Tokenizer.load(tokenizer_dir).vocab_size


IDS = torch.tensor([[5, 17, 42, 3, 99, 7, 61, 12, 8, 30], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def convert(state, tmp_path, *args):
    source = tmp_path / "minimind.pth"
    torch.save(state, source)
    result = wren("convert", "minimind", source, "--out", tmp_path / "out", *args)
    assert result.returncode == 0, result.stderr
    return tmp_path / "out", result


def wren_logits(directory):
    with torch.no_grad():
        return load_model(directory)(IDS).logits


def test_dense_minimind2_matches_minimind_and_transformers(tmp_path, tokenizer_dir, vocab):
    w = minimind2_state(vocab)
    out, result = convert(w, tmp_path, "--tokenizer", tokenizer_dir)
    assert "minimind2 checkpoint" in result.stdout and "note:" not in result.stdout

    config = read_model_config(out)
    assert (config.n_heads, config.n_kv_heads, config.ffn_dim, config.tie_embeddings) == (8, 2, FFN, True)
    assert (config.rope_theta, config.norm_eps, config.max_seq_len) == (1e6, 1e-5, 32768)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tokenizer = Tokenizer.load(out)
    assert config.eos_token_id == tokenizer.stop_token_ids

    reference = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2)
    torch.testing.assert_close(wren_logits(out), reference, atol=1e-4, rtol=1e-4)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, reference, atol=1e-4, rtol=1e-4)


def with_qk_norm(w, seed=1):
    """The current MiniMind layout: the same weights plus per-head q/k RMSNorm weights."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = DIM // 8
    for i in range(LAYERS):
        for name in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{name}.weight"] = (
                1 + torch.randn(head_dim, generator=generator) * 0.2
            )
    return w


def test_qk_norm_layout_becomes_qwen3(tmp_path, vocab):
    w = with_qk_norm(minimind2_state(vocab))
    out, result = convert(w, tmp_path)
    assert "qk-norm checkpoint" in result.stdout
    config = read_model_config(out)
    assert config.qk_norm and config.norm_eps == 1e-6
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    reference = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2, eps=1e-6)
    without_norms = minimind_logits(minimind2_state(vocab), IDS, n_heads=8, n_kv_heads=2, eps=1e-6)
    assert (reference - without_norms).abs().max() > 1e-2  # the q/k norms matter
    torch.testing.assert_close(wren_logits(out), reference, atol=1e-4, rtol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, reference, atol=1e-4, rtol=1e-4)


def test_qk_norm_moe_becomes_qwen3_moe(tmp_path, vocab):
    """The current MiniMind MoE: QK-norm, routed experts only, top-1, renormalised (weight 1)."""
    w = with_qk_norm(minimind2_state(vocab, n_experts=4, seed=5))
    out, result = convert(w, tmp_path)
    assert "qk-norm checkpoint" in result.stdout
    config = read_model_config(out)
    assert config.qk_norm and (config.n_experts, config.n_experts_per_token) == (4, 1)
    assert config.norm_topk_prob and config.shared_expert_ffn_dim == 0 and not config.qkv_bias
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3MoeForCausalLM"]

    reference = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2, top_k=1, eps=1e-6, renormalise=True)
    unweighted = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2, top_k=1, eps=1e-6, renormalise=False)
    assert (reference - unweighted).abs().max() > 1e-2  # the routing weight matters
    torch.testing.assert_close(wren_logits(out), reference, atol=1e-4, rtol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, reference, atol=1e-4, rtol=1e-4)

    # Top-2 (MiniMind's num_experts_per_tok=2), in this process.
    torch.save(w, tmp_path / "top2.pth")
    convert_minimind(tmp_path / "top2.pth", tmp_path / "top2", overrides={"n_experts_per_token": 2})
    reference = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2, top_k=2, eps=1e-6, renormalise=True)
    torch.testing.assert_close(wren_logits(tmp_path / "top2"), reference, atol=1e-4, rtol=1e-4)


def test_moe_folds_minimind_shared_experts(tmp_path, vocab):
    w = minimind2_state(vocab, n_experts=4, n_shared=2, seed=1)
    out, result = convert(w, tmp_path)
    assert "note:" in result.stdout and "no tokenizer" in result.stdout

    config = read_model_config(out)
    assert (config.n_experts, config.n_experts_per_token, config.shared_expert_ffn_dim) == (4, 2, 2 * FFN)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    model = load_model(out)
    with torch.no_grad():
        # The folded, gated shared expert is the sum of MiniMind's two ungated ones, on any input.
        x = torch.randn(7, DIM, generator=torch.Generator().manual_seed(3))
        layer = model.model.layers[1].mlp
        folded = torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
        summed = sum(swiglu(x, s, w) for s in shared_experts(w, "model.layers.1.mlp"))
        torch.testing.assert_close(folded, summed, atol=1e-5, rtol=1e-5)
        assert not folded.allclose(swiglu(x, "model.layers.1.mlp.shared_experts.0", w), atol=1e-3)

    reference = minimind_logits(w, IDS, n_heads=8, n_kv_heads=2)
    torch.testing.assert_close(wren_logits(out), reference, atol=1e-4, rtol=1e-4)


def test_older_layout_with_pair_rotary_and_overrides(tmp_path, vocab, capsys):
    """The older model.py names, its adjacent-pair rotary, one unindexed shared expert, top-1 routing
    (no renormalisation in MiniMind), and v1-style settings given with --set."""
    w = minimind2_state(vocab, n_heads=4, n_kv_heads=2, n_experts=3, n_shared=1, seed=2)
    settings = ["--set", "n_heads=4", "--set", "rope_theta=10000", "--set", "n_experts_per_token=1"]
    torch.save(legacy_state(w), tmp_path / "legacy.pth")
    out = tmp_path / "out"  # the command in this process: the others show it in a real one
    assert main(["convert", "minimind", str(tmp_path / "legacy.pth"), "--out", str(out), *settings]) == 0
    assert "legacy checkpoint" in capsys.readouterr().out

    config = read_model_config(out)
    assert (config.n_heads, config.n_kv_heads, config.rope_theta, config.max_seq_len) == (4, 2, 1e4, 8192)
    reference = minimind_logits(w, IDS, n_heads=4, n_kv_heads=2, theta=1e4, top_k=1, rope=rope_pairs)
    torch.testing.assert_close(wren_logits(out), reference, atol=1e-4, rtol=1e-4)
    # Reading the pairs as halves (no reordering) would be a different model: the test can tell.
    wrong = minimind_logits(w, IDS, n_heads=4, n_kv_heads=2, theta=1e4, top_k=1, rope=rope_halves)
    assert not torch.allclose(wrong, reference, atol=1e-2)


def test_bad_checkpoints_are_named(tmp_path, vocab, capsys):
    torch.save({"transformer.wte.weight": torch.zeros(4, 4)}, tmp_path / "foreign.pth")
    result = wren("convert", "minimind", tmp_path / "foreign.pth", "--out", tmp_path / "never")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'foreign.pth'}: not a MiniMind state dict" in result.stderr
    assert "transformer.wte.weight" in result.stderr

    # The other refusals through the same command, in this process (a new one costs seconds).
    w = minimind2_state(vocab)
    cases = {
        "extra.pth": ({**w, "model.layers.0.mlp.bias": torch.zeros(3)}, [], "model.layers.0.mlp.bias"),
        "qknorm-shared.pth": (
            with_qk_norm(minimind2_state(vocab, n_experts=4, n_shared=1)),
            [],
            "Qwen3-MoE, which has no shared expert",
        ),
        "heads.pth": (w, ["--set", "n_heads=5"], "n_heads=5"),
        "unknown.pth": (w, ["--set", "n_wings=2"], "n_wings"),
        "junk.pth": (None, [], "cannot read a PyTorch checkpoint"),
    }
    for name, (state, extra, expected) in cases.items():
        if state is None:
            (tmp_path / name).write_bytes(b"not a checkpoint")
        else:
            torch.save(state, tmp_path / name)
        assert (
            main(["convert", "minimind", str(tmp_path / name), "--out", str(tmp_path / "never"), *extra]) == 2
        )
        error = capsys.readouterr().err
        assert str(tmp_path / name) in error and expected in error, error
    assert not (tmp_path / "never").exists()


def test_folding_is_exact_in_half_precision(tmp_path, vocab):
    """sigmoid(0) = 1/2 and the doubled down_proj are powers of two: no rounding, even in float16."""
    w = {k: v.half() for k, v in minimind2_state(vocab, n_experts=2, n_shared=3, seed=4).items()}
    w["lm_head.weight"] = w["model.embed_tokens.weight"]
    torch.save(w, tmp_path / "half.pth")
    result = convert_minimind(tmp_path / "half.pth", tmp_path / "out")
    assert result.config.is_moe and not result.has_tokenizer
    model = load_model(tmp_path / "out")
    layer = model.model.layers[0].mlp
    assert layer.shared_expert_gate.weight.dtype == torch.float16
    down = torch.cat([w[f"model.layers.0.mlp.shared_experts.{s}.down_proj.weight"] for s in range(3)], dim=1)
    assert torch.equal(layer.shared_expert.down_proj.weight, down * 2)
    assert math.isclose(torch.sigmoid(layer.shared_expert_gate.weight.float().sum()).item(), 0.5)
