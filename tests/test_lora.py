"""LoRA: adapters in the model, PEFT's adapter format both ways (checked against peft itself),
`wren train lora` runs with exact resume after SIGKILL, `wren lora merge`, and `wren data fill`."""

import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, TINY_MODEL_SETTINGS, addition_conversations, kill_after_step, losses, wren
from safetensors import safe_open

from wren.checkpoint import init_checkpoint, load_model, read_model_config
from wren.checkpoint.adapter import apply_adapter, load_adapter_weights, read_adapter, save_adapter
from wren.errors import WrenError
from wren.model.lora import ADAPTABLE_LAYERS, LoRALinear, inject_lora, lora_layers, merge_lora
from wren.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Arithmetic conversations, a tokenizer, and two random tiny base models: dense and MoE."""
    directory = tmp_path_factory.mktemp("lora")
    conversations = addition_conversations(20)
    (directory / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    train_tokenizer([directory / "sft.jsonl"], vocab_size=512).save(directory / "tok")
    init_checkpoint("micro", directory / "tok", directory / "base", overrides=TINY_MODEL_SETTINGS)
    init_checkpoint("moe", directory / "tok", directory / "moe", overrides=TINY_MODEL_SETTINGS)
    return directory


def lora_args(workdir: Path, out: Path, *extra) -> list:
    return [
        "train", "lora", "--init", workdir / "base", "--data", workdir / "sft.jsonl", "--out", out,
        "--seq-len", "64", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2", "--workers", "1",
        "--logger", "none", "--log-every", "1", "--lora-rank", "4", *extra,
    ]  # fmt: skip


def sample_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids)[0]


@torch.no_grad()
def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter).eval()(ids).logits


def randomise_b(model) -> None:
    """Trained-looking adapters: a zero B would make any comparison pass."""
    generator = torch.Generator().manual_seed(2)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


# -- the adapter module ----------------------------------------------------------------------------


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train(workdir):
    model = load_model(workdir / "base", dtype=torch.float32)
    ids = sample_ids(model.config.vocab_size)
    before = logits(model, ids)
    names = inject_lora(model, rank=4, alpha=8, dropout=0.5)
    assert len(names) == 2 * len(ADAPTABLE_LAYERS)
    assert names[0] == "model.layers.0.self_attn.q_proj"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    assert layer.scaling == 2.0 and layer.lora_A.weight.shape == (4, model.config.ffn_dim)
    bound = 1 / model.config.ffn_dim**0.5  # Kaiming-uniform with a = sqrt(5), as PEFT
    assert 0 < layer.lora_A.weight.abs().max() <= bound and not layer.lora_B.weight.any()
    # B = 0: identical in eval mode, and in training mode too, as dropout only touches the adapter.
    assert torch.equal(logits(model, ids), before)
    with torch.no_grad():
        assert torch.equal(model.train()(ids)[0], before)

    randomise_b(model)
    adapted = logits(model, ids)
    assert (adapted - before).abs().max() > 1e-2
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids)[0], model(ids)[0])  # dropout on in training...
    assert torch.equal(logits(model, ids), adapted)  # ... and off in eval mode
    base_keys = set(load_model(workdir / "base").state_dict())
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == base_keys
    assert torch.allclose(logits(model, ids), adapted, atol=1e-5)


def test_targets_choose_the_layers(workdir):
    model = load_model(workdir / "base")
    assert inject_lora(model, ["q_proj", "v_proj"], rank=2) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert isinstance(model.model.layers[1].self_attn.v_proj, LoRALinear)
    assert not isinstance(model.model.layers[1].self_attn.k_proj, LoRALinear)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        inject_lora(load_model(workdir / "base"), ["lm_head"])


# -- PEFT's format, both ways ----------------------------------------------------------------------


@pytest.mark.parametrize("base_name", ["base", "moe"])
def test_a_wren_adapter_loads_in_peft_with_equal_logits(workdir, tmp_path, base_name):
    base = workdir / base_name
    model = load_model(base, dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8)
    randomise_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=base)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        8,
    )
    assert config["base_model_name_or_path"] == str(base)
    assert config["target_modules"] == list(ADAPTABLE_LAYERS)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    mlp = "mlp.shared_expert" if base_name == "moe" else "mlp"  # MoE: routed experts keep no adapter
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert f"base_model.model.model.layers.1.{mlp}.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * len(ADAPTABLE_LAYERS)

    ids = sample_ids(model.config.vocab_size)
    expected = peft_logits(base, tmp_path / "adapter", ids)
    base_logits = logits(load_model(base), ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    merged = load_model(base, adapter=tmp_path / "adapter")
    assert not lora_layers(merged)
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)


def test_a_peft_adapter_loads_into_wren_with_equal_logits(workdir, tmp_path):
    base = workdir / "base"
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        use_rslora=True,
        init_lora_weights=False,  # random B: a real difference to reproduce
        task_type="CAUSAL_LM",
    )
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "peft")
    ids = sample_ids(read_model_config(workdir / "base").vocab_size)
    expected = peft_logits(base, tmp_path / "peft", ids)

    merged = load_model(base, adapter=tmp_path / "peft")
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)
    separate = apply_adapter(load_model(base), tmp_path / "peft", merge=False)
    assert lora_layers(separate)["model.layers.0.mlp.down_proj"].rank == 2
    assert torch.allclose(logits(separate, ids), expected, atol=1e-5)


def test_adapters_that_do_not_fit_are_refused(workdir, tmp_path):
    model = load_model(workdir / "base")
    inject_lora(model, rank=4)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=workdir / "base")
    init_checkpoint("micro", workdir / "tok", tmp_path / "other", overrides=dict(TINY_MODEL_SETTINGS, dim=32))

    result = wren("lora", "merge", tmp_path / "other", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert (
        "does not fit base model" in message
        and "q_proj is 32x32 there, the adapter's update is 64x64" in message
    )
    assert str(workdir / "base") in message  # names the base it was made for
    assert not (tmp_path / "merged").exists()

    # Resuming with other settings than the checkpoint's.
    for targets, rank, fragment in ((ADAPTABLE_LAYERS, 8, "--lora-rank"), (["q_proj"], 4, "--lora-targets")):
        other = load_model(workdir / "base")
        inject_lora(other, targets, rank=rank)
        with pytest.raises(WrenError, match=fragment):
            load_adapter_weights(other, tmp_path / "adapter")

    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(WrenError, match="DoRA is not supported"):
        read_adapter(tmp_path / "adapter")


# -- training from the command line ----------------------------------------------------------------


def test_train_lora_writes_a_peft_adapter_that_merges(workdir, tmp_path):
    run = tmp_path / "run"
    result = wren(*lora_args(workdir, run, "--max-steps", "20", "--eval-every", "20", "--save-every", "10"))
    assert result.returncode == 0, result.stderr
    assert "trainable parameters" in result.stdout
    curve = losses(run)
    assert sorted(curve) == list(range(1, 21))
    assert curve[20] < curve[1] - 0.5  # the adapters learn

    final = run / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state"} <= names
    assert "model.safetensors" not in names  # the base is not copied
    optimizer = torch.load(final / "trainer_state" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == 2 * 2 * len(ADAPTABLE_LAYERS)  # adapter moments only
    adapter = read_adapter(final)
    assert adapter.base_model_name_or_path == str(workdir / "base")
    assert all(b.abs().max() > 0 for _, b in adapter.weights.values())

    ids = sample_ids(read_model_config(workdir / "base").vocab_size)
    expected = peft_logits(workdir / "base", final, ids)
    assert (expected - logits(load_model(workdir / "base"), ids)).abs().max() > 1e-3
    assert torch.allclose(logits(load_model(workdir / "base", adapter=final), ids), expected, atol=1e-5)

    result = wren("lora", "merge", workdir / "base", final, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    merged = load_model(tmp_path / "merged")
    assert set(merged.state_dict()) == set(load_model(workdir / "base").state_dict())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    # An adapter is not a model to start from: the error says which base to pass instead.
    args = lora_args(workdir, tmp_path / "again", "--max-steps", "1")
    args[args.index(workdir / "base")] = final
    result = wren(*args)
    assert result.returncode == 2 and "is a LoRA adapter" in result.stderr
    assert str(workdir / "base") in result.stderr


def test_lora_resume_after_sigkill_gives_identical_losses(workdir, tmp_path):
    # Dropout draws random numbers every step: resuming must restore them too.
    common = ("--max-steps", "16", "--save-every", "4", "--eval-every", "100", "--lora-dropout", "0.1")
    common += ("--cache-dir", tmp_path / "cache")
    straight = tmp_path / "straight"
    result = wren(*lora_args(workdir, straight, *common))
    assert result.returncode == 0, result.stderr

    killed = tmp_path / "killed"
    # Killed mid-run: after step 9 is logged, past the step-8 checkpoint.
    last_step = kill_after_step(lora_args(workdir, killed, *common), killed, 9)
    assert last_step < 16, "the run finished before it could be killed"

    result = wren(*lora_args(workdir, killed, *common, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    assert losses(killed) == losses(straight)  # bit-identical, every step
    straight_b = read_adapter(straight / "final").weights
    for name, (a, b) in read_adapter(killed / "final").weights.items():
        assert torch.equal(a, straight_b[name][0]) and torch.equal(b, straight_b[name][1])


# -- identity data ---------------------------------------------------------------------------------


def test_data_fill_replaces_placeholders(tmp_path):
    source = tmp_path / "identity.jsonl"
    rows = [
        {"conversations": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": c}]}
        for c in ("I am {{name}}, made by {{ author }}.", "Call me {{name}}.")
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "filled.jsonl"
    result = wren("data", "fill", source, "--set", "name=Wren 2", "--set", 'author="Me"', "--out", out)
    assert result.returncode == 0, result.stderr
    assert "2 rows" in result.stdout and "{{name}} x2" in result.stdout
    filled = [json.loads(line) for line in out.read_text().splitlines()]
    assert filled[0]["conversations"][1]["content"] == 'I am Wren 2, made by "Me".'
    assert filled[1]["conversations"][0] == rows[1]["conversations"][0]

    result = wren("data", "fill", source, "--set", "name=Wren", "--out", out)
    assert result.returncode == 2
    assert f"{source}:1: no value for {{{{author}}}}; pass --set author=..." in result.stderr


IDENTITY = SHARED_DATA / "sft" / "identity.jsonl"


@pytest.mark.skipif(
    not IDENTITY.is_file(), reason="../shared/data/sft/identity.jsonl is not beside the checkout"
)
def test_lora_on_the_shared_identity_data(workdir, tmp_path):
    filled = tmp_path / "identity.jsonl"
    result = wren(
        "data", "fill", IDENTITY, "--set", "name=Wren", "--set", "author=the Wren authors", "--out", filled
    )
    assert result.returncode == 0, result.stderr
    text = filled.read_text(encoding="utf-8")
    assert "{{" not in text and "I am Wren, an AI assistant" in text
    run = tmp_path / "run"
    args = lora_args(workdir, run, "--max-steps", "4", "--eval-every", "100")
    args[args.index(workdir / "sft.jsonl")] = filled
    result = wren(*args)
    assert result.returncode == 0, result.stderr
    assert read_adapter(run / "final").weights
