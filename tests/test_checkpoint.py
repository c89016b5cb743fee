"""Checkpoints are Hugging Face directories: round trips, transformers interop both ways, safety."""

import json

import pytest
import torch

from wren.checkpoint import load_model, read_model_config, save_checkpoint
from wren.checkpoint.info import describe_checkpoint, format_info
from wren.errors import WrenError
from wren.model import CausalLM, ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")

VOCAB = 101


def config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=32,
        eos_token_id=[2, 0],
        pad_token_id=0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init keeps logits near uniform; larger weights make any mismatch visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def wren_model(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return perturbed(CausalLM(config(**overrides)))


VARIANTS = {
    "llama": {},
    "untied": dict(tie_embeddings=False),
    "qwen2": dict(qkv_bias=True),
    "llama-biases": dict(qkv_bias=True, o_bias=True),
    "qwen3": dict(qk_norm=True),
    "qwen3-biases": dict(qk_norm=True, qkv_bias=True, o_bias=True),
    "mistral-window": dict(sliding_window=6),
    "moe": dict(n_experts=4, n_experts_per_token=2, qkv_bias=True),
    "moe-sparse-step": dict(
        n_experts=4, n_experts_per_token=1, qkv_bias=True, moe_layer_step=2, norm_topk_prob=False
    ),
    "qwen3-moe": dict(qk_norm=True, n_experts=4, n_experts_per_token=2, shared_expert_ffn_dim=0),
    "qwen3-moe-dense-layer": dict(
        qk_norm=True, n_experts=4, n_experts_per_token=1, shared_expert_ffn_dim=0, dense_layers=[0]
    ),
    "yarn": dict(rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16), max_seq_len=64),
    "llama3-rope": dict(rope_scaling=RopeScaling("llama3", 8.0, original_max_position_embeddings=16)),
    "linear-rope": dict(rope_scaling=RopeScaling("linear", 2.0)),
    "dynamic-rope": dict(rope_scaling=RopeScaling("dynamic", 2.0), max_seq_len=16),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_loads_a_wren_checkpoint_with_equal_logits(variant, tmp_path):
    model = wren_model(**VARIANTS[variant])
    save_checkpoint(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not any("Wren" in name for name in hf.config.architectures)
    # 40 tokens: past the trained length of the scaled-rope variants and past the window.
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().mean() > 0.1
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["llama", "moe", "yarn", "qwen3", "qwen3-moe-dense-layer"])
def test_round_trip_is_exact(variant, tmp_path):
    model = wren_model(**VARIANTS[variant])
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_checkpoint_files_use_stock_names_and_dtype(tmp_path):
    save_checkpoint(wren_model(n_experts=4, qkv_bias=True), tmp_path / "ckpt", dtype=torch.bfloat16)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    hf_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert hf_config["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once, as transformers does
    assert load_model(tmp_path / "ckpt").lm_head.weight.dtype == torch.bfloat16


def _hf_tiny(model_type: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0)
        cls = transformers.LlamaForCausalLM
    elif model_type == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=8)
        cls = transformers.MistralForCausalLM
    elif model_type == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    elif model_type == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    elif model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, **experts, head_dim=16, norm_topk_prob=True, tie_word_embeddings=True
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        cfg = transformers.Qwen2MoeConfig(
            **common, **experts, shared_expert_intermediate_size=48, norm_topk_prob=False
        )
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    return perturbed(cls(cfg))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"])
def test_a_model_saved_by_transformers_loads_into_wren_with_equal_logits(model_type, tmp_path):
    hf = _hf_tiny(model_type)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_qwen3_moe_checkpoint_files(tmp_path):
    """QK-norm MoE is written as Qwen3-MoE with the keys transformers 4, 5 and vLLM read; with a
    shared expert (which Qwen3-MoE lacks) it is refused, naming why."""
    save_checkpoint(wren_model(**VARIANTS["qwen3-moe"]), tmp_path / "ckpt")
    hf_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert hf_config["num_experts"] == 4 and hf_config["num_experts_per_tok"] == 2
    assert hf_config["norm_topk_prob"] is True
    assert "shared_expert_intermediate_size" not in hf_config
    assert read_model_config(tmp_path / "ckpt").shared_expert_ffn_dim == 0
    # transformers 5 writes the expert count as num_local_experts; Wren reads either.
    hf_config["num_local_experts"] = hf_config.pop("num_experts")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config))
    assert read_model_config(tmp_path / "ckpt").n_experts == 4
    with pytest.raises(WrenError, match="Qwen3-MoE, which has no shared expert"):
        save_checkpoint(wren_model(qk_norm=True, n_experts=4), tmp_path / "shared")


def test_sharded_safetensors_load(tmp_path):
    hf = _hf_tiny("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (load_model(tmp_path / "hf")(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_pickle_weights_need_an_explicit_flag(tmp_path):
    model = wren_model()
    save_checkpoint(model, tmp_path / "ckpt")
    state = load_model(tmp_path / "ckpt").state_dict()
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    state.pop("lm_head.weight")
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(WrenError, match=r"pytorch_model\.bin.*--allow-pickle"):
        load_model(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", allow_pickle=True)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_failed_write_leaves_the_previous_checkpoint_untouched(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(wren_model(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(staging):
        (staging / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(wren_model(n_layers=3), target, write_extra=crash)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind


def test_overwriting_a_checkpoint_replaces_it_whole(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(wren_model(), target, write_extra=lambda d: (d / "stale.txt").write_text("old"))
    save_checkpoint(wren_model(n_layers=3), target)
    assert not (target / "stale.txt").exists()
    assert read_model_config(target).n_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(WrenError, match="not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WrenError, match=r"config\.json: no such file"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(WrenError, match="invalid JSON"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(WrenError, match="model_type 'gpt2'"):
        load_model(tmp_path / "empty")
    save_checkpoint(wren_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(WrenError, match=r"model\.safetensors: cannot read"):
        load_model(tmp_path / "ckpt")
    save_checkpoint(wren_model(), tmp_path / "ckpt")
    hf_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    hf_config["num_hidden_layers"] = 5
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(WrenError, match=r"do not match config\.json"):
        load_model(tmp_path / "ckpt")


def test_model_info_reads_headers(tmp_path):
    save_checkpoint(wren_model(n_experts=4, qkv_bias=True), tmp_path / "ckpt")
    info = describe_checkpoint(tmp_path / "ckpt")
    model = wren_model(n_experts=4, qkv_bias=True)
    assert info["parameters"] == model.num_parameters()
    assert info["architecture"] == "Qwen2MoeForCausalLM"
    assert info["experts"]["routed"] == 4
    assert "mlp.experts.0.gate_proj.weight" in format_info(info)
