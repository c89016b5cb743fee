"""Import a MiniMind checkpoint (a plain `torch.save(model.state_dict())` .pth) as a Wren checkpoint.

Three key layouts are read (github.com/jingyaogong/minimind):

- **MiniMind2** (`model/model_minimind.py`): transformers-style names, `model.embed_tokens.weight`,
  `model.layers.N.self_attn.q_proj.weight`, `model.layers.N.mlp.gate_proj.weight`; for MoE
  `mlp.experts.E.*`, the router `mlp.gate.weight` and ungated `mlp.shared_experts.S.*`. Its rotary
  embeddings use the "rotate half" layout, as Wren's do, so dense weights are taken as they are.
- **legacy** (`model/model.py`, MiniMind v1 and the first MiniMind2 releases): `tok_embeddings`,
  `layers.N.attention.wq`, `feed_forward.w1/w2/w3`, a single `feed_forward.shared_experts`. Its rotary
  embeddings rotate adjacent pairs (complex numbers), so the q/k rows of each head are reordered into
  the rotate-half order; attention scores are unchanged because q and k move together.

- **qk-norm** (the current `model_minimind.py`): MiniMind2's names plus `self_attn.q_norm` /
  `k_norm`, an RMSNorm over each head's queries and keys before the rotary embedding, as in Qwen3.
  Dense checkpoints become Qwen3-shaped Wren checkpoints, MoE ones (routed experts only) Qwen3-MoE
  shaped; its defaults differ (rms_norm_eps 1e-6, top-1 routing, renormalised even at top-1, so
  the chosen expert's weight is 1). Shared experts with QK-norm are refused: Qwen3-MoE, the one
  stock format with QK-norm and experts, has no shared expert.

A state dict says nothing about the number of heads, the rope base or the norm epsilon; those come
from MiniMind's own defaults (n_heads=8, rope_theta=1e6, rms_norm_eps=1e-5, top-2 routing) and can be
overridden with `--set key=value`. Everything with a shape (vocab, dim, layers, kv heads, ffn
widths, experts) is read from the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wren.checkpoint import save_checkpoint
from wren.checkpoint.weights import stock_to_wren
from wren.errors import WrenError
from wren.model import CausalLM, ModelConfig

# MiniMind's config defaults for what the tensors cannot tell (MiniMindConfig / LMConfig).
MINIMIND_DEFAULTS: dict[str, Any] = dict(
    n_heads=8,
    rope_theta=1e6,
    norm_eps=1e-5,
    n_experts_per_token=2,
    norm_topk_prob=True,
    bos_token_id=1,
    eos_token_id=2,
)
# Where a layout's MiniMindConfig defaults differ from the above.
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qk-norm": dict(norm_eps=1e-6, n_experts_per_token=1, qk_norm=True),
}
MAX_SEQ_LEN = {"minimind2": 32768, "legacy": 8192, "qk-norm": 32768}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_MINIMIND2_KEY = re.compile(
    r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|self_attn\.[qk]_norm"
    r"|input_layernorm|post_attention_layernorm"
    r"|mlp\.(?:gate|up|down)_proj|mlp\.gate|mlp\.(?:experts|shared_experts)\.\d+\.(?:gate|up|down)_proj)\.weight"
)
# Derived buffers some versions saved alongside the weights (rotary tables, v1's causal mask).
_IGNORED_KEY = re.compile(
    r"(?:.*\.)?(?:pos_cis|freqs_cis|freqs_cos|freqs_sin|rotary_emb\.inv_freq)|layers\.\d+\.attention\.mask"
)
_QK_NORM_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight")
_LEGACY_W = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


@dataclass
class MiniMindImport:
    """What `convert_minimind` wrote."""

    out_dir: Path
    layout: str  # "minimind2", "qk-norm" or "legacy"
    config: ModelConfig
    parameters: int
    has_tokenizer: bool


def read_minimind_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a MiniMind .pth file, unwrapped from {"model": ...} and DDP/compile prefixes."""
    path = Path(path)
    if not path.is_file():
        raise WrenError(f"{path}: no such file; expected a MiniMind .pth checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only refusals all land here
        raise WrenError(f"{path}: cannot read a PyTorch checkpoint ({_first_line(exc)})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # MiniMind's *_resume.pth
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WrenError(
            f"{path}: expected a state dict of tensors (torch.save(model.state_dict())), "
            f"found {type(state).__name__}"
        )
    out = {}
    for key, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = tensor
    return out


def detect_layout(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """'minimind2', 'qk-norm' or 'legacy'; a WrenError naming the first unexpected keys otherwise."""
    if "model.embed_tokens.weight" in state:
        layout, known = "minimind2", _MINIMIND2_KEY
    elif "tok_embeddings.weight" in state:
        layout, known = "legacy", None
    else:
        raise WrenError(
            f"{path}: not a MiniMind state dict: expected model.embed_tokens.weight (MiniMind2) or "
            f"tok_embeddings.weight (older model.py); first keys: {_some(state)}"
        )
    if layout == "minimind2" and any(_QK_NORM_KEY.fullmatch(k) for k in state):
        layout = "qk-norm"
    if known is not None:
        unexpected = [k for k in state if not known.fullmatch(k) and not _IGNORED_KEY.fullmatch(k)]
        if unexpected:
            raise WrenError(
                f"{path}: unexpected keys for a MiniMind2 checkpoint: {_some(unexpected)}; expected "
                "model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v,o}_proj.weight, "
                "model.layers.N.mlp.{gate,up,down}_proj.weight (or mlp.experts.E.* / mlp.gate / "
                "mlp.shared_experts.S.*), model.norm.weight, lm_head.weight"
            )
    return layout


def _rename_legacy(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Older model.py names -> MiniMind2 names (which are already Hugging Face's)."""
    fixed = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    out, unexpected = {}, []
    for key, tensor in state.items():
        if _IGNORED_KEY.fullmatch(key):
            continue
        if key in fixed:
            out[fixed[key]] = tensor
        elif m := re.fullmatch(r"layers\.(\d+)\.attention\.w([qkvo])\.weight", key):
            out[f"model.layers.{m[1]}.self_attn.{m[2]}_proj.weight"] = tensor
        elif m := re.fullmatch(r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight", key):
            norm = "input_layernorm" if m[2] == "attention_norm" else "post_attention_layernorm"
            out[f"model.layers.{m[1]}.{norm}.weight"] = tensor
        elif m := re.fullmatch(r"layers\.(\d+)\.feed_forward\.gate\.weight", key):
            out[f"model.layers.{m[1]}.mlp.gate.weight"] = tensor
        elif m := re.fullmatch(
            r"layers\.(\d+)\.feed_forward\.(experts\.\d+\.|shared_experts\.)?w([123])\.weight", key
        ):
            # The legacy MoE has one shared expert, stored without an index.
            middle = {None: "", "shared_experts.": "shared_experts.0."}.get(m[2], m[2])
            out[f"model.layers.{m[1]}.mlp.{middle}{_LEGACY_W[m[3]]}.weight"] = tensor
        else:
            unexpected.append(key)
    if unexpected:
        raise WrenError(
            f"{path}: unexpected keys for an older MiniMind (model.py) checkpoint: {_some(unexpected)}; "
            "expected tok_embeddings.weight, layers.N.attention.w{q,k,v,o}.weight, "
            "layers.N.{attention,ffn}_norm.weight, layers.N.feed_forward.w{1,2,3}.weight, norm.weight, "
            "output.weight"
        )
    return out


def _pairs_to_halves(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows from interleaved rotary pairs (0,1)(2,3)... to halves (0,d/2)..."""
    dim_in = weight.shape[1]
    return weight.view(n_heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(n_heads * head_dim, dim_in)


def _layer_indices(state: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))})


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered sub-modules (experts) sit under `prefix`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m[1] for k in state if (m := pattern.match(k))})


def _require(state: dict[str, torch.Tensor], key: str, path: str | Path) -> torch.Tensor:
    if key not in state:
        raise WrenError(f"{path}: missing {key}; the checkpoint is incomplete")
    return state[key]


def infer_config(
    state: dict[str, torch.Tensor], layout: str, overrides: dict[str, Any], path: str | Path
) -> ModelConfig:
    """A Wren config from the tensor shapes, MiniMind's defaults, then `overrides`."""
    vocab_size, dim = _require(state, "model.embed_tokens.weight", path).shape
    layers = _layer_indices(state)
    if layers != list(range(len(layers))) or not layers:
        raise WrenError(f"{path}: layer indices are not 0..N-1: {layers[:10]}")
    q_rows = _require(state, "model.layers.0.self_attn.q_proj.weight", path).shape[0]
    k_rows = _require(state, "model.layers.0.self_attn.k_proj.weight", path).shape[0]
    n_heads = int(overrides.get("n_heads", MINIMIND_DEFAULTS["n_heads"]))
    if q_rows % n_heads:
        raise WrenError(
            f"{path}: q_proj has {q_rows} rows, not a multiple of n_heads={n_heads}; pass --set n_heads=N"
        )
    head_dim = int(overrides.get("head_dim", q_rows // n_heads))
    if k_rows % head_dim:
        raise WrenError(f"{path}: k_proj has {k_rows} rows, not a multiple of head_dim={head_dim}")

    moe_layers = [i for i in layers if f"model.layers.{i}.mlp.gate.weight" in state]
    dense_layers = [i for i in layers if i not in moe_layers]
    n_shared = _count(state, f"model.layers.{moe_layers[0]}.mlp.shared_experts") if moe_layers else 0
    if n_shared and layout == "qk-norm":
        raise WrenError(
            f"{path}: a mixture-of-experts checkpoint with QK-norm and {n_shared} shared expert(s) cannot "
            "be converted: QK-norm MoE is written as Qwen3-MoE, which has no shared expert (expected "
            "routed experts only, as the current MiniMind MoE has)"
        )
    values: dict[str, Any] = {
        **MINIMIND_DEFAULTS,
        **LAYOUT_DEFAULTS.get(layout, {}),
        "vocab_size": vocab_size,
        "dim": dim,
        "n_layers": len(layers),
        "n_kv_heads": k_rows // head_dim,
        "head_dim": head_dim,
        "max_seq_len": MAX_SEQ_LEN[layout],
        "tie_embeddings": "lm_head.weight" not in state
        or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]),
    }
    if dense_layers:
        key = f"model.layers.{dense_layers[0]}.mlp.gate_proj.weight"
        values["ffn_dim"] = _require(state, key, path).shape[0]
    if moe_layers:
        mlp = f"model.layers.{moe_layers[0]}.mlp"
        expert_ffn = _require(state, f"{mlp}.experts.0.gate_proj.weight", path).shape[0]
        values.update(
            n_experts=_count(state, f"{mlp}.experts"),
            expert_ffn_dim=expert_ffn,
            dense_layers=dense_layers,
        )
        if layout == "qk-norm":
            values["shared_expert_ffn_dim"] = 0  # Qwen3-MoE: routed experts only
        else:
            values.update(
                # MiniMind's shared experts are folded into one of their summed width; with none, a
                # one-unit expert of zeros keeps the Qwen2-MoE shape (which needs a shared expert).
                shared_expert_ffn_dim=n_shared * expert_ffn or 1,
                # Qwen2-MoE readers (transformers 4, vLLM) always build q/k/v biases: write zeros.
                qkv_bias=True,
            )
        values.setdefault("ffn_dim", expert_ffn)
    values.update(overrides)
    if values.get("n_experts") and values["n_experts_per_token"] == 1 and layout != "qk-norm":
        # Older MiniMind renormalises the top-k weights only when k > 1; the current one (qk-norm)
        # whenever norm_topk_prob is set, which makes a top-1 weight exactly 1.
        values["norm_topk_prob"] = False
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise WrenError(f"{path}: invalid model settings ({exc})") from exc


def _to_stock(state: dict[str, torch.Tensor], config: ModelConfig, layout: str) -> dict[str, torch.Tensor]:
    """MiniMind2-named tensors -> the stock (Llama / Qwen2-MoE / Qwen3(-MoE)) names and shapes Wren loads."""
    dtype = state["model.embed_tokens.weight"].dtype
    out = {k: v.to(dtype) for k, v in state.items() if ".mlp.shared_experts." not in k}
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(config.n_layers):
        attn = f"model.layers.{i}.self_attn"
        if layout == "legacy":
            for proj, heads in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
                key = f"{attn}.{proj}.weight"
                out[key] = _pairs_to_halves(out[key], heads, config.head_dim)
        if config.qkv_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                out.setdefault(
                    f"{attn}.{proj}.bias", torch.zeros(out[f"{attn}.{proj}.weight"].shape[0], dtype=dtype)
                )
        if config.is_moe_layer(i) and config.shared_expert_ffn_dim:
            out.update(_folded_shared_expert(state, f"model.layers.{i}.mlp", config, dtype))
    return out


def _folded_shared_expert(
    state: dict[str, torch.Tensor], mlp: str, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """MiniMind's ungated shared experts as Wren's one gated shared expert.

    SwiGLU experts side by side are one wider SwiGLU: concatenating their gate/up rows and their
    down columns sums their outputs. Wren scales the shared expert by sigmoid(gate(x)) and its gate
    has no bias, so the gate's weights are zero (sigmoid(0) = 1/2) and down_proj is doubled; both
    factors are powers of two, so the product is exact.
    """
    n_shared = _count(state, f"{mlp}.shared_experts")
    if n_shared:
        experts = [f"{mlp}.shared_experts.{s}" for s in range(n_shared)]
        gate = torch.cat([state[f"{e}.gate_proj.weight"] for e in experts], dim=0)
        up = torch.cat([state[f"{e}.up_proj.weight"] for e in experts], dim=0)
        down = torch.cat([state[f"{e}.down_proj.weight"] for e in experts], dim=1) * 2
    else:
        width = config.shared_expert_ffn_dim
        gate = up = torch.zeros(width, config.dim)
        down = torch.zeros(config.dim, width)
    return {
        f"{mlp}.shared_expert.gate_proj.weight": gate.to(dtype),
        f"{mlp}.shared_expert.up_proj.weight": up.to(dtype),
        f"{mlp}.shared_expert.down_proj.weight": down.to(dtype),
        f"{mlp}.shared_expert_gate.weight": torch.zeros(1, config.dim, dtype=dtype),
    }


def convert_minimind(
    checkpoint: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> MiniMindImport:
    """Read a MiniMind .pth and write it, with the tokenizer from `tokenizer` if given, as a Wren
    checkpoint in `out_dir`. dtype ("float32", "float16", "bfloat16") None keeps the file's dtype."""
    if dtype is not None and dtype not in DTYPES:
        raise WrenError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    overrides = dict(overrides or {})
    state = read_minimind_state(checkpoint)
    layout = detect_layout(state, checkpoint)
    if layout == "legacy":
        state = _rename_legacy(state, checkpoint)
    state = {k: v for k, v in state.items() if not _IGNORED_KEY.fullmatch(k)}

    loaded_tokenizer = None
    if tokenizer is not None:
        from wren.tokenizer import Tokenizer

        loaded_tokenizer = Tokenizer.load(tokenizer)
        # The tokenizer's ids beat MiniMind's defaults; --set beats both.
        overrides = {
            "bos_token_id": loaded_tokenizer.bos_token_id,
            "eos_token_id": loaded_tokenizer.stop_token_ids,
            "pad_token_id": loaded_tokenizer.pad_token_id,
            **overrides,
        }
    config = infer_config(state, layout, overrides, checkpoint)
    if loaded_tokenizer is not None and loaded_tokenizer.vocab_size > config.vocab_size:
        raise WrenError(
            f"{tokenizer}: the tokenizer has {loaded_tokenizer.vocab_size} tokens but {checkpoint} "
            f"embeds only {config.vocab_size}; expected the tokenizer the model was trained with"
        )

    try:
        stock = _to_stock(state, config, layout)
    except KeyError as exc:
        raise WrenError(f"{checkpoint}: missing {exc.args[0]}; the checkpoint is incomplete") from None
    weights = stock_to_wren(stock)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    with torch.device("meta"):  # no memory, no random init: the loaded tensors are adopted
        model = CausalLM(config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise WrenError(
            f"{checkpoint}: the weights do not fit the inferred config ({_first_line(exc)}); "
            "check the --set values"
        ) from exc
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    save_checkpoint(model, out_dir, tokenizer=loaded_tokenizer, dtype=DTYPES[dtype] if dtype else None)
    return MiniMindImport(
        out_dir=Path(out_dir),
        layout=layout,
        config=config,
        parameters=model.num_parameters(),
        has_tokenizer=loaded_tokenizer is not None,
    )


def _some(keys: Any, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]
