"""Training run settings: defaults, then a TOML / YAML / JSON file, then command-line overrides.

Every run writes the fully resolved settings to `train_config.json` in its output directory, which
is itself a valid `--config` file for repeating the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wren.errors import WrenError
from wren.model.lora import ADAPTABLE_LAYERS

OBJECTIVES = ("pretrain", "sft", "lora", "dpo", "distill", "reason")
# Objectives that refine an existing model: they need --init, not a fresh preset.
FROM_CHECKPOINT = ("lora", "dpo", "distill", "reason")
LORA_LAYERS = ADAPTABLE_LAYERS
SCHEDULES = ("cosine", "wsd", "constant")
LOGGERS = ("tensorboard", "wandb", "none")


@dataclass
class TrainConfig:
    objective: str = "pretrain"
    out_dir: str = ""  # empty: runs/<objective>
    data: list[str] = field(default_factory=list)
    # Start from a checkpoint directory, or from a preset plus a tokenizer (pretraining from zero).
    init: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    seq_len: int = 512
    batch_size: int = 32  # sequences per device per micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps

    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # warmup-stable-decay: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float | None = None  # MoE load balancing; None: the model config's value

    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10

    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or float32 / bfloat16
    compile: bool | None = None  # None: on for cuda
    fsdp: bool = False  # shard the model across ranks (FSDP2) instead of replicating it (DDP)

    val_fraction: float = 0.01
    skip_bad_lines: bool = False
    workers: int | None = None
    cache_dir: str | None = None  # None: <out_dir>/data-cache

    logger: str = "tensorboard"
    wandb_project: str | None = None

    # LoRA (`wren train lora`): adapters on these linear layers of every decoder layer.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_LAYERS))
    # DPO (`wren train dpo`): the frozen reference is `reference`, or the starting checkpoint.
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    reference: str | None = None
    # Distillation (`wren train distill`): loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student).
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    teacher_dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    # Reasoning SFT (`wren train reason`): loss weight of the <think> / </think> tag tokens.
    think_tag_weight: float = 10.0

    def validate(self) -> None:
        def bad(message: str) -> WrenError:
            return WrenError(f"training config: {message}")

        if self.objective not in OBJECTIVES:
            raise bad(f"objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.logger not in LOGGERS:
            raise bad(f"logger {self.logger!r}; expected one of {', '.join(LOGGERS)}")
        if not self.data:
            raise bad("no training data; pass --data FILE_OR_DIR (JSONL)")
        if self.init is None and (self.preset is None or self.tokenizer is None):
            raise bad("say what to train: --init CHECKPOINT, or --preset NAME with --tokenizer DIR")
        if self.init is not None and self.preset is not None:
            raise bad("--init and --preset are exclusive: a checkpoint already has its shape")
        if self.objective in FROM_CHECKPOINT and self.init is None:
            raise bad(f"{self.objective} refines a trained model; pass --init CHECKPOINT")
        if self.objective == "distill" and self.teacher is None:
            raise bad("distillation needs --teacher CHECKPOINT (a model with the same tokenizer)")
        unknown_layers = sorted(set(self.lora_targets) - set(LORA_LAYERS))
        if unknown_layers or not self.lora_targets:
            raise bad(f"lora_targets {unknown_layers or '[]'}; expected some of {', '.join(LORA_LAYERS)}")
        if self.lora_rank < 1:
            raise bad(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise bad("distill_alpha must be in [0, 1] and distill_temperature positive")
        for name in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "save_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise bad(f"keep_last must be at least 1, got {self.keep_last}")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise bad(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WrenError(f"{path}: cannot read config ({exc.strerror})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise WrenError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
            values = yaml.safe_load(text) or {}
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise WrenError(f"{path}: unknown config format; expected .toml, .yaml, .yml or .json")
    except WrenError:
        raise
    except Exception as exc:  # each parser has its own error type; all mean "malformed file"
        raise WrenError(f"{path}: cannot parse config ({exc})") from None
    if not isinstance(values, dict):
        raise WrenError(f"{path}: expected a table of settings at the top level")
    return values


def resolve_config(config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, updated by the config file, updated by overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{config_file}: " if config_file else ""
        raise WrenError(f"{where}unknown training setting(s): {', '.join(unknown)}")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    config = TrainConfig(**values)
    config.out_dir = config.out_dir or f"runs/{config.objective}"
    config.validate()
    return config
