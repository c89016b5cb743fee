"""Pretraining the `moe` preset through the CLI: the load-balancing loss and the per-expert load
are logged, the coefficient is applied, and transformers reads the trained checkpoint as
Qwen2MoeForCausalLM with Wren's logits."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL_SETTINGS, metric_rows, rows_by_step, set_flags, wren

from wren.checkpoint import load_model
from wren.data.demo import demo_texts
from wren.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

N_EXPERTS = 4
TINY_MOE = {
    **TINY_MODEL_SETTINGS,
    "ffn_dim": 128,
    "expert_ffn_dim": 32,
    "shared_expert_ffn_dim": 32,
    "n_experts": N_EXPERTS,
    "n_experts_per_token": 2,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("moe")
    texts = demo_texts(max_bytes=100_000)
    (directory / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([directory / "pretrain.jsonl"], vocab_size=512).save(directory / "tokenizer")
    return directory


def pretrain_moe(corpus: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    args = [
        "train", "pretrain", "--data", corpus / "pretrain.jsonl", "--preset", "moe",
        "--tokenizer", corpus / "tokenizer", "--out", out, "--seq-len", "64", "--batch-size", "4",
        "--max-steps", "8", "--lr", "3e-3", "--warmup-steps", "2", "--workers", "1", "--logger", "none",
        "--log-every", "1", "--eval-every", "100", *set_flags(TINY_MOE), *extra,
    ]  # fmt: skip
    return wren(*args)


@pytest.fixture(scope="module")
def trained(corpus) -> Path:
    """A few steps of the moe preset, shrunk, with the default aux-loss coefficient."""
    run = corpus / "default-coef"
    result = pretrain_moe(corpus, run)
    assert result.returncode == 0, result.stderr
    return run


def test_moe_pretraining_logs_the_aux_loss_and_each_experts_share(trained):
    rows = metric_rows(trained)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    for row in rows:
        # Switch-Transformer balance loss: 1 when routing is uniform, up to E/k when it collapses.
        assert 0.9 < row["train/aux_loss"] < N_EXPERTS / 2
        layer0 = [row[f"moe/layer0_expert{e}_share"] for e in range(N_EXPERTS)]
        assert sum(layer0) == pytest.approx(1.0) and all(0 <= share <= 1 for share in layer0)
        # Every MoE layer that is logged is a distribution over its experts.
        for layer in range(TINY_MOE["n_layers"]):
            shares = [row.get(f"moe/layer{layer}_expert{e}_share") for e in range(N_EXPERTS)]
            if shares[0] is not None:
                assert sum(shares) == pytest.approx(1.0)


def test_transformers_loads_the_trained_moe_with_equal_logits(trained):
    final = trained / "final"
    hf_config = json.loads((final / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert hf_config["num_experts"] == N_EXPERTS and hf_config["moe_intermediate_size"] == 32
    assert hf_config["router_aux_loss_coef"] == pytest.approx(0.01)  # the model config's default
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    ours = load_model(final, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        logits, _ = ours(ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_the_aux_loss_coefficient_is_applied(corpus, trained, tmp_path):
    run = tmp_path / "no-balancing"
    result = pretrain_moe(corpus, run, "--aux-loss-coef", "0")
    assert result.returncode == 0, result.stderr
    with_aux, without = rows_by_step(trained), rows_by_step(run)
    # train/loss is the cross-entropy alone, so step 1 (same weights, same batch) matches; the
    # balance loss's gradient then makes the two runs' weights, and so their losses, differ.
    assert without[1]["train/loss"] == with_aux[1]["train/loss"]
    assert without[1]["train/aux_loss"] == with_aux[1]["train/aux_loss"]
    assert without[1]["train/grad_norm"] != with_aux[1]["train/grad_norm"]
    assert all(without[step]["train/loss"] != with_aux[step]["train/loss"] for step in range(2, 9))
    assert json.loads((run / "final" / "config.json").read_text())["router_aux_loss_coef"] == 0
