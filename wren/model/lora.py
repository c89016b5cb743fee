"""Low-rank adapters (LoRA) on the model's linear layers, in PyTorch alone.

An adapted layer computes `W x + b + (alpha / r) * B A dropout(x)`: W and b are the frozen base
weights, A (r x in) and B (out x r) are the only trained parameters. A starts as nn.Linear's
default (Kaiming-uniform, a = sqrt(5)) and B as zeros, so a fresh adapter changes nothing, as in
PEFT. Parameter names follow PEFT's (`...q_proj.lora_A.weight`), while the base weight keeps its
own name (`...q_proj.weight`), so the base part of the state dict is unchanged.

Layers are chosen by their last name component (`q_proj`, `down_proj`...), as PEFT's
`target_modules` does. In a mixture-of-experts layer this adapts the shared expert's projections
but not the routed experts: those are stacked parameters, not linear modules (PEFT leaves them
alone too).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wren.model.linear import Linear, linear

ADAPTABLE_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update. It holds the base layer's own weight and bias
    tensors (not copies), so wrapping costs no memory."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        # Dropout acts on the adapter's input only, and only in training mode.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a full (out x in) matrix, in fp32: scaling * B @ A."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge_into_base(self) -> Linear:
        """Fold the update into the base weight, in place, and return a plain linear layer
        holding that weight (and the bias): the same function up to rounding, no new memory.
        The wrapper must not be used afterwards."""
        with torch.no_grad():
            self.weight.copy_(self.weight.float() + self.delta_weight())
        with torch.device("meta"):  # a shell: its own weight is replaced at once
            linear = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adaptable_linears(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the linear layers whose last name component is one of `targets`, in model order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets
    ]


def inject_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = ADAPTABLE_LAYERS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Wrap every target linear layer in place and freeze everything but the adapters.

    Returns the names of the wrapped layers; raises ValueError when no layer matches.
    """
    unknown = sorted(set(targets) - set(ADAPTABLE_LAYERS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected some of {', '.join(ADAPTABLE_LAYERS)}")
    names = adaptable_linears(model, targets)
    if not names:
        raise ValueError(f"the model has no linear layer named {', '.join(targets)} to adapt")
    return add_adapters(model, dict.fromkeys(names, rank), alpha, dropout, use_rslora)


def add_adapters(
    model: nn.Module, ranks: dict[str, int], alpha: float, dropout: float = 0.0, use_rslora: bool = False
) -> list[str]:
    """Wrap exactly the named linear layers, each with its own rank, and freeze everything but
    the adapters. Returns the names."""
    model.requires_grad_(False)
    for name, rank in ranks.items():
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, use_rslora))
    return list(ranks)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer, by its name in the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, named `<layer>.lora_A.weight` / `<layer>.lora_B.weight`."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place. The model is plain again, every
    parameter trainable as a freshly loaded one is. Returns it."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merge_into_base())
    return model.requires_grad_(True)
