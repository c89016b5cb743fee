"""The transformer itself: shapes, causality, KV-cache equivalence, MoE routing and its loss."""

import pytest
import torch

from wren.model import PRESETS, CausalLM, KVCache, ModelConfig, preset_config
from wren.model.config import RopeScaling
from wren.model.moe import MoE
from wren.model.rope import RotaryEmbedding

EXPECTED_PARAMS = {"micro": 1.0e6, "small": 26e6, "base": 104e6, "moe": 145e6}


def tiny(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    values.update(overrides)
    return ModelConfig(**values)


def moe_config(**overrides) -> ModelConfig:
    return tiny(n_experts=4, n_experts_per_token=2, qkv_bias=True, **overrides)


def build(config: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(config).eval()
    # Random init keeps logits near uniform; larger weights make mistakes visible.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_design_table(name):
    with torch.device("meta"):
        model = CausalLM(preset_config(name))
    assert model.num_parameters() == pytest.approx(EXPECTED_PARAMS[name], rel=0.06)


def test_tied_embeddings_share_one_matrix():
    model = CausalLM(tiny())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = CausalLM(tiny(tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + 97 * 64


@pytest.mark.parametrize(
    "config", [tiny(), moe_config(), tiny(sliding_window=5)], ids=["dense", "moe", "window"]
)
def test_changing_a_later_token_never_changes_earlier_logits(config):
    model = build(config)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize(
    "config",
    [tiny(), moe_config(), tiny(sliding_window=5), tiny(qkv_bias=True, o_bias=True)],
    ids=["dense", "moe", "window", "biases"],
)
def test_incremental_decoding_with_the_cache_equals_the_full_pass(config):
    model = build(config)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(config, batch_size=2, max_len=32)
        pieces = []
        # A prompt prefilled in two chunks, then one token at a time.
        for start, end in [(0, 7), (7, 11), *[(t, t + 1) for t in range(11, 24)]]:
            positions = torch.arange(start, end).expand(2, -1)
            pieces.append(model(ids[:, start:end], positions=positions, cache=cache).logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_rows_at_different_positions_share_one_cache():
    config = tiny()
    model = build(config)
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        alone_a, alone_b = model(a).logits[0, -1], model(b).logits[0, -1]
        cache = KVCache(config, batch_size=2, max_len=16)
        # Prefill each row separately (row 1 is shorter), then decode both in one batch.
        model(a[:, :9], positions=torch.arange(9)[None], cache=cache)
        model(b[:, :5], positions=torch.arange(5)[None], cache=cache, cache_rows=torch.tensor([1]))
        step = model(torch.cat([a[:, 9:], b[:, 5:]]), positions=torch.tensor([[9], [5]]), cache=cache).logits[
            :, -1
        ]
    assert (step[0] - alone_a).abs().max() < 1e-5
    assert (step[1] - alone_b).abs().max() < 1e-5


def test_explicit_positions_equal_the_default_causal_path():
    model = build(tiny())
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        implicit = model(ids).logits
        explicit = model(ids, positions=torch.arange(16).expand(2, -1)).logits
    assert (implicit - explicit).abs().max() < 1e-5


def test_a_cache_needs_positions():
    config = tiny()
    with pytest.raises(ValueError, match="positions"):
        CausalLM(config)(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(config, 1, 8))


def test_logits_to_keep_limits_the_output_to_the_last_positions():
    model = build(tiny())
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        none = model(ids, logits_to_keep=0).logits
    assert (last - full[:, -1:]).abs().max() < 1e-5  # a different BLAS kernel for fewer rows
    assert none.shape == (2, 0, 97)
    with pytest.raises(ValueError, match=r"logits_to_keep must be in \[0, 10\]"):
        model(ids, logits_to_keep=11)


@pytest.mark.parametrize("scaling", [None, RopeScaling("yarn", 4.0)])
def test_compiled_code_reads_the_rotary_table_with_the_computed_angles(scaling):
    rotary = RotaryEmbedding(tiny(rope_scaling=scaling, max_seq_len=256))
    positions = torch.tensor([[0, 5, 63], [200, 7, 255]])
    computed = rotary(positions, torch.float32)
    rotary.build_table(256)
    assert rotary.cos_table.shape == (256, 16)
    read = torch.compile(rotary)(positions, torch.float32)  # only compiled code reads the table
    for a, b in zip(computed, read, strict=True):
        assert (a - b).abs().max() < 1e-5
    table = rotary.cos_table
    rotary.build_table(128)  # a table long enough is kept, so compiled code need not recompile
    assert rotary.cos_table is table


def test_dynamic_rotary_scaling_builds_no_table():
    rotary = RotaryEmbedding(tiny(rope_scaling=RopeScaling("dynamic", 2.0)))
    rotary.build_table(64)
    assert rotary.cos_table is None


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token MoE, the obvious way, to check the grouped implementation against."""
    probs = torch.softmax(moe.gate(x).float(), dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, chosen = probs[t].topk(moe.top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, chosen.tolist(), strict=True):
            h = torch.nn.functional.silu(x[t] @ moe.experts.gate_proj[e].T) * (
                x[t] @ moe.experts.up_proj[e].T
            )
            out[t] += w * (h @ moe.experts.down_proj[e].T)
        shared = moe.shared_expert(x[t])
        out[t] += torch.sigmoid(moe.shared_expert_gate(x[t])) * shared
    return out


def test_moe_routes_each_token_to_its_top_k_experts():
    model = build(moe_config())
    moe = model.model.layers[0].mlp
    x = torch.randn(30, 64)
    with torch.no_grad():
        probs, chosen, weights = moe.route(x)
        out, _ = moe(x)
    assert chosen.shape == (30, 2)
    top2 = probs.topk(2).indices
    assert torch.equal(chosen.sort().values, top2.sort().values)
    assert torch.allclose(weights.sum(-1), torch.ones(30))
    assert (out - _reference_moe(moe, x)).abs().max() < 1e-5
    assert int(moe.last_expert_load.sum()) == 60


def test_load_balancing_loss_is_finite_and_larger_for_a_collapsed_router():
    model = build(moe_config())
    moe = model.model.layers[0].mlp
    x = 1 + 0.1 * torch.randn(256, 64)  # every token shares one direction
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn_like(moe.gate.weight) * 1e-4)  # nearly uniform router
        _, balanced = moe(x)
        moe.gate.weight[0] = 1.0  # every token now sends nearly all its probability to expert 0
        _, collapsed = moe(x)
    assert torch.isfinite(balanced) and torch.isfinite(collapsed)
    assert balanced.item() == pytest.approx(1.0, abs=0.05)
    # Top-2 of 4 with expert 0 always first: half the assignments at probability ~1, so ~E/2.
    assert collapsed.item() == pytest.approx(2.0, abs=0.05)


def test_aux_loss_trains_the_router():
    model = build(moe_config())
    ids = torch.randint(0, 97, (2, 16))
    model.train()
    out = model(ids)
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_dense_models_report_zero_aux_loss():
    assert build(tiny())(torch.zeros(1, 4, dtype=torch.long)).aux_loss.item() == 0.0


def test_moe_layer_step_and_dense_layers_mix_block_types():
    config = moe_config(n_layers=4, moe_layer_step=2, dense_layers=[3])
    kinds = [type(layer.mlp).__name__ for layer in CausalLM(config).model.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU", "SwiGLU"]


def test_invalid_head_counts_are_rejected():
    with pytest.raises(ValueError, match="multiple"):
        tiny(n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize(
    "config", [tiny(), moe_config(), tiny(sliding_window=4)], ids=["dense", "moe", "window"]
)
def test_packed_documents_do_not_see_each_other(config):
    model = build(config)
    docs = [torch.randint(0, 97, (n,)) for n in (7, 5, 9)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        together = model(packed, positions=positions, document_ids=document_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    assert (together - alone).abs().max() < 1e-5
