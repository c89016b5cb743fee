"""LoRA adapters on disk, in PEFT's format, so `peft.PeftModel.from_pretrained` loads them.

    adapter_config.json         PEFT's LoraConfig: r, lora_alpha, target_modules, base model...
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight (r x in) and .lora_B.weight
                                (out x r) for every adapted layer, <layer> being the module's name
                                in the base model (Wren's names are Hugging Face's)
    tokenizer files, trainer_state/   optional, written by `wren train lora`

Reading takes any plain LoRA adapter PEFT writes for a Llama-, Mistral-, Qwen2- or Qwen2-MoE-shaped
model, rank patterns and rsLoRA included; what the native model cannot express (DoRA, trained
biases, adapted embeddings, modules_to_save) is refused with a message rather than half-applied.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wren.atomic import atomic_directory
from wren.checkpoint.weights import write_safetensors
from wren.errors import WrenError
from wren.model.lora import ADAPTABLE_LAYERS, LoRALinear, add_adapters, lora_layers, lora_state_dict

__all__ = [
    "Adapter",
    "apply_adapter",
    "is_adapter_dir",
    "load_adapter_weights",
    "merge_adapter",
    "read_adapter",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight$")

# Settings that, set to anything but off / empty, ask for more than the native model can apply.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers)",
    "lora_bias": "trained LoRA biases",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication",
    "alpha_pattern": "alpha_pattern",
}


@dataclass
class Adapter:
    """A LoRA adapter read from disk: per-layer (A, B) matrices and the scale settings."""

    path: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A, B)
    alpha: float
    dropout: float
    use_rslora: bool
    base_model_name_or_path: str | None

    def rank(self, layer: str) -> int:
        return self.weights[layer][0].shape[0]

    def scaling(self, layer: str) -> float:
        rank = self.rank(layer)
        return self.alpha / rank**0.5 if self.use_rslora else self.alpha / rank

    def trained_on(self) -> str:
        return f" (it was made for {self.base_model_name_or_path})" if self.base_model_name_or_path else ""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# -- writing ---------------------------------------------------------------------------------------


def _peft_config(layers: dict[str, LoRALinear], base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT would write for these layers: its long-standing keys only, so
    older PEFT versions read it too."""
    ranks = Counter(layer.rank for layer in layers.values())
    rank = ranks.most_common(1)[0][0]
    first = next(iter(layers.values()))
    if any(layer.alpha != first.alpha or layer.use_rslora != first.use_rslora for layer in layers.values()):
        raise ValueError("every adapter of one model must share alpha and use_rslora to be saved")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    suffixes = {name.rpartition(".")[2] for name in layers}
    alpha = int(first.alpha) if float(first.alpha).is_integer() else first.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": [name for name in ADAPTABLE_LAYERS if name in suffixes]
        + sorted(suffixes - set(ADAPTABLE_LAYERS)),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {name: layer.rank for name, layer in layers.items() if layer.rank != rank},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | Path | None = None,
    tokenizer: Any = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the model's LoRA adapters (not its base weights) as a PEFT adapter directory,
    atomically. `write_extra(staging_dir)` may add files inside the same atomic write."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    base = str(base_model_name_or_path) if base_model_name_or_path is not None else None
    config = _peft_config(layers, base)
    tensors = {_PEFT_PREFIX + key: tensor for key, tensor in lora_state_dict(model).items()}
    with atomic_directory(out_dir) as staging:
        write_safetensors(tensors, staging / ADAPTER_WEIGHTS)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(staging)
        if write_extra is not None:
            write_extra(staging)
    return Path(out_dir)


# -- reading ---------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise WrenError(f"{path}: not a directory; expected a LoRA adapter directory with {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise WrenError(f"{config_path}: no such file; expected a PEFT LoRA adapter directory") from None
    except ValueError as exc:
        raise WrenError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise WrenError(f"{config_path}: expected a JSON object of adapter settings")
    if config.get("peft_type", "LORA") != "LORA":
        raise WrenError(f"{config_path}: peft_type {config['peft_type']!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        value = config.get(key)
        if value not in (None, False, {}, []):
            raise WrenError(f"{config_path}: {what} is not supported ({key} = {value!r}); expected LoRA")
    if config.get("bias", "none") != "none":
        raise WrenError(f"{config_path}: trained biases are not supported (bias = {config['bias']!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise WrenError(f"{config_path}: missing or non-numeric {key!r}; expected a LoRA adapter config")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise WrenError(f"{weights_path}: no such file; expected the adapter weights in safetensors format")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise WrenError(f"{weights_path}: cannot read safetensors weights ({exc})") from exc


def read_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter directory."""
    path = Path(path)
    config = _read_config(path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    weights_path = path / ADAPTER_WEIGHTS
    for key, tensor in _read_tensors(path).items():
        match = _KEY.match(key)
        if match is None:
            raise WrenError(
                f"{weights_path}: tensor {key!r} is not the LoRA A or B matrix of a linear layer; "
                "expected base_model.model.<layer>.lora_A.weight / .lora_B.weight (no DoRA, biases, "
                "embeddings or modules_to_save)"
            )
        if tensor.dim() != 2:
            raise WrenError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}; expected a matrix")
        halves.setdefault(match["layer"], {})[match["part"]] = tensor
    if not halves:
        raise WrenError(f"{weights_path}: holds no LoRA weights")
    weights = {}
    for layer, parts in halves.items():
        if set(parts) != {"A", "B"}:
            raise WrenError(f"{weights_path}: {layer} has lora_{''.join(parts)} without its other half")
        a, b = parts["A"], parts["B"]
        if a.shape[0] != b.shape[1]:
            raise WrenError(
                f"{weights_path}: {layer}: lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in) and (out, r)"
            )
        weights[layer] = (a, b)
    return Adapter(
        path=path,
        weights=weights,
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


# -- applying --------------------------------------------------------------------------------------


def _check_fits(model: nn.Module, adapter: Adapter, base: str | Path | None) -> None:
    """Every adapted layer must exist in the model as a linear layer of the adapter's shape."""
    base_text = f"base model {base}" if base is not None else "the base model"
    # Report the first problem in the model's own order (layers absent from it come first).
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for layer in sorted(adapter.weights, key=lambda name: order.get(name, -1)):
        a, b = adapter.weights[layer]
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            module = None
        if isinstance(module, LoRALinear):
            raise WrenError(f"{adapter.path}: {layer} already has an adapter; apply one adapter at a time")
        if not isinstance(module, nn.Linear):
            raise WrenError(
                f"{adapter.path}: the adapter changes {layer}, which {base_text} has no linear layer "
                f"for{adapter.trained_on()}"
            )
        if (module.out_features, module.in_features) != (b.shape[0], a.shape[1]):
            raise WrenError(
                f"{adapter.path}: the adapter does not fit {base_text}: {layer} is "
                f"{module.out_features}x{module.in_features} there, the adapter's update is "
                f"{b.shape[0]}x{a.shape[1]}{adapter.trained_on()}"
            )


def apply_adapter(
    model: nn.Module, adapter_dir: str | Path, *, merge: bool = True, base: str | Path | None = None
) -> nn.Module:
    """Apply a LoRA adapter directory to a loaded model, in place, and return the model.

    merge=True folds each update into its base weight (computed in fp32, then stored in the
    weight's dtype): the model stays plain and runs at full speed. merge=False wraps the layers
    instead (base frozen, adapters in the base dtype), for a model that keeps the adapter
    separate. `base` names the model in error messages.
    """
    adapter = read_adapter(adapter_dir)
    _check_fits(model, adapter, base)
    if merge:
        with torch.no_grad():
            for layer, (a, b) in adapter.weights.items():
                weight = model.get_submodule(layer).weight
                a, b = (t.to(weight.device, torch.float32) for t in (a, b))
                weight.copy_(weight.float() + (b @ a) * adapter.scaling(layer))
        return model
    ranks = {layer: adapter.rank(layer) for layer in adapter.weights}
    add_adapters(model, ranks, adapter.alpha, adapter.dropout, adapter.use_rslora)
    _copy_weights(model, adapter)
    return model


def _copy_weights(model: nn.Module, adapter: Adapter) -> None:
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path, base: str | Path | None = None) -> None:
    """Load saved adapter weights into a model whose adapters are already in place (resuming
    training): the adapted layers, ranks, alpha and rsLoRA setting must be the same."""
    adapter = read_adapter(adapter_dir)
    layers = lora_layers(model)
    base_text = f" on base model {base}" if base is not None else ""
    if set(adapter.weights) != set(layers):
        missing = sorted(set(layers) - set(adapter.weights))
        extra = sorted(set(adapter.weights) - set(layers))
        raise WrenError(
            f"{adapter.path}: the saved adapter covers other layers than this run's settings{base_text} "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same --lora-targets"
        )
    for name, layer in layers.items():
        a, b = adapter.weights[name]
        if (tuple(b.shape), tuple(a.shape)) != (
            tuple(layer.lora_B.weight.shape),
            tuple(layer.lora_A.weight.shape),
        ):
            raise WrenError(
                f"{adapter.path}: {name}: saved lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"this run's rank {layer.rank} on a {layer.out_features}x{layer.in_features} layer"
                f"{base_text}; resume with the same --lora-rank and the same --init base"
            )
        if abs(adapter.scaling(name) - layer.scaling) > 1e-12 * max(1.0, abs(layer.scaling)):
            raise WrenError(
                f"{adapter.path}: saved with lora_alpha {adapter.alpha:g}, this run asks for "
                f"{layer.alpha:g}; resume with the same --lora-alpha"
            )
    _copy_weights(model, adapter)


def merge_adapter(base: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter as a plain checkpoint: the merged weights in the base's stored dtype,
    with the base's tokenizer (or the adapter directory's, when the base has none)."""
    from wren.checkpoint import load_model, save_checkpoint, stored_dtype
    from wren.tokenizer import Tokenizer

    model = load_model(base, dtype=torch.float32)
    apply_adapter(model, adapter_dir, merge=True, base=base)
    tokenizer = None
    for source in (Path(base), Path(adapter_dir)):
        if (source / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(source)
            break
    return save_checkpoint(model, out_dir, tokenizer=tokenizer, dtype=stored_dtype(base))
