"""How torchrun's processes share the model: DDP replicas, or FSDP2 shards of weights, gradients and AdamW state.

Both reduce gradients by a sum, never a mean: the trainer weighs each micro-batch's loss by its share of the
whole step's tokens, so summing over processes gives exactly one process's gradient on the concatenated
batch whatever the shares. DDP averages, which the trainer cancels by scaling with the world size; FSDP2 is
told to sum. Its own average is not an option anyway: over gloo, FSDP2's reduce-scatter cannot take the
pre-multiplied sum it uses to average (pytorch issue 162338), so the divide factor is 1 and the op a plain sum.

Checkpoints do not change with the layout: a sharded run gathers its weights and its AdamW moments parameter
by parameter into the same full, index-keyed state a single process saves, and a run resumed under FSDP2
cuts that state into its own shards. So DDP, FSDP2 and single-process runs resume from each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel


def replicate(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """A DDP wrapper: one gradient all-reduce per step, overlapped with backward."""
    ids = [device.index] if device.type == "cuda" else None
    # The RoPE tables are buffers every process computes alike: broadcasting them each forward would only add a sync.
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: each block its own unit (gathered as it runs, freed after), the rest in the root unit.

    Under a low-precision plan the gathered weights are ``compute_dtype`` and gradients reduce in fp32, as
    autocast would compute them; the shards (and AdamW) stay fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Every unit sums: set on the root alone, the blocks would still average.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; for a shard, a collective every process must call in the same order."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, under the model's names: what a checkpoint stores."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # After a forward pass without backward (an evaluation) the root unit stays gathered, and its
            # parameters are then the compute-dtype copies, not the fp32 shards the checkpoint must hold.
            module.reshard()
    return {name: full_tensor(p) for name, p in model.named_parameters()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state_dict with every sharded moment gathered whole (on the CPU)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: full_tensor(value) if isinstance(value, DTensor) else value
                              for key, value in moments.items()}
                      for index, moments in state["state"].items()}
    return state


def load_sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state into an optimizer over sharded parameters, each process keeping its shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, moments in state["state"].items():
        param = params[index]
        # Every process read the whole state from the checkpoint, so each cuts its own shard without communicating.
        sharded[index] = {
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in moments.items()}
    optimizer.load_state_dict({**state, "state": sharded})


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total over sharded gradients is itself a DTensor; the plain tensor of its value."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
