"""Several processes, one model: the environment `torchrun` sets up, read once.

Run `torchrun --nproc_per_node N -m wren train ...`: each process trains on its share of every
global batch; NCCL on GPUs, gloo on CPUs. One process alone is the same code with world_size 1.

By default every process holds the whole model (DDP). With `--fsdp` each holds a 1/N shard of
the weights, gradients and optimizer moments (FSDP2, `fully_shard`): layers are gathered just in
time for their forward and backward, and gathered whole only to write a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wren.model import CausalLM


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_preference: str) -> DistributedEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedEnv(rank, world_size, local_rank, device)


def all_reduce_sum(value: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(env: DistributedEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def shutdown(env: DistributedEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- FSDP2 -----------------------------------------------------------------------------------------


def shard_model(model: CausalLM, env: DistributedEnv, bf16: bool) -> None:
    """Shard `model` in place across every rank: each decoder layer is its own unit (gathered for
    its own forward and backward only), the root takes the rest. The root therefore owns the
    embedding and the lm_head; with tied embeddings they are one parameter, which must live in one
    unit. `fully_shard` moves each unit to the device and then keeps only this rank's slice, so
    the device never holds more than the shards plus one whole unit (the CPU copy every rank
    starts from is whole).

    bf16: gather the weights in bfloat16 for compute, but keep the fp32 master shards and reduce
    gradients in fp32. Otherwise everything stays fp32 (CPU runs).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # An explicit mesh: FSDP's default picks CUDA whenever it exists, even for a gloo run on CPUs.
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root's weights are needed again as soon as backward starts (the lm_head goes first):
    # keep them gathered between forward and backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2's `no_sync`: backward accumulates unreduced gradients; the next backward outside this
    block reduce-scatters the sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the gradient norm of sharded parameters), else `value`."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _full_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_full_model(model: CausalLM) -> CausalLM | None:
    """The sharded `model` gathered whole into an ordinary fp32 CPU model on rank 0 (None on the
    others). Every rank must call it: each contributes its shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    # Built on the meta device, then adopting the gathered tensors: no second copy of the weights.
    with torch.device("meta"):
        full = CausalLM(model.config)
    full.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        full.lm_head.weight = full.model.embed_tokens.weight
    return full


def gather_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded model, whole and keyed by parameter name, on rank 0 ({} on
    the others). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a whole, name-keyed optimizer state (read by every rank) into a sharded model's
    optimizer: each rank keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())
