"""Data-parallel training under torchrun: process group set-up and teardown, and the few collectives the
training loop needs. A plain `python` run is world size 1 and touches none of torch.distributed.

    torchrun --nproc_per_node 2 -m gpt_tinystories train ...   (nccl on CUDA, gloo on CPU)
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .model import GPT
from .runtime import pick_device


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool = False  # launched by torchrun: a process group, DDP/FSDP, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_name: str) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if "LOCAL_RANK" not in os.environ:  # a plain `python` run
            return cls(0, 1, pick_device(device_name))
        local_rank = int(os.environ["LOCAL_RANK"])
        device = pick_device("cpu" if device_name == "cpu" else device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            if device.type == "cuda":  # naming the device binds this rank to it (no guessing from the rank)
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        return cls(dist.get_rank(), world_size, device, distributed=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache), then the others (which find it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        """The slowest rank's training clock, and whether any rank must stop. Ranks must share one clock: under a
        time budget it sets the learning rate (replicas given different rates drift apart) and the last step."""
        if self.world_size == 1:
            return seconds, stop
        both = torch.tensor([seconds, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        seconds, flag = both.tolist()
        return seconds, bool(flag)

    def any_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A bool tensor, true on every rank if it is true on one; the host does not wait for it."""
        if self.world_size == 1:
            return flag
        tensor = flag.to(torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.bool()

    def teardown(self) -> None:
        # A barrier before destroying the group: without it gloo sometimes aborts at exit (shared/pitfalls.md).
        if self.distributed and dist.is_initialized():
            gc.collect()  # whatever still holds the group through a reference cycle lets go of it first
            dist.barrier()
            dist.destroy_process_group()


class _Loss(nn.Module):
    """DDP synchronises gradients through forward(); training wants the model's fused loss."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, targets)


class DataParallelLoss:
    """The training loss of `model` across ranks: DDP (a full copy per rank, gradients all-reduced on the last
    micro-step), or FSDP2 (`fsdp=True`: parameters, gradients and optimizer state sharded per block).

    State leaves and enters as full (unsharded) state dicts, so checkpoints load on any world size, with or
    without FSDP. Under FSDP gathering them is collective: every rank must call model_state()/optimizer_state().
    """

    def __init__(self, model: GPT, world: Distributed, fsdp: bool = False, compile: bool = False) -> None:
        self.model, self.world = model, world
        self.fsdp = fsdp and world.distributed
        module: nn.Module = _Loss(model)
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(module)  # the root: embeddings and final norm, gathered around each forward
        elif world.distributed:
            ids = [world.device.index] if world.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.module = module
        self.call = torch.compile(module) if compile else module
        self.options = StateDictOptions(full_state_dict=True, cpu_offload=world.world_size > 1)

    def describe(self) -> str:
        if not self.world.distributed:
            return ""
        processes = f"{self.world.world_size} process{'es' if self.world.world_size > 1 else ''}"
        return f", {'FSDP2' if self.fsdp else 'DDP'} on {processes} ({dist.get_backend()})"

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full weights (on rank 0; other ranks get an empty dict under FSDP)."""
        if not self.fsdp:
            return self.model.state_dict()
        return get_model_state_dict(self.model, options=self.options)

    def optimizer_state(self, optimizers: list[torch.optim.Optimizer]) -> dict:
        """One state dict for all the optimizers, keyed by parameter name."""
        return get_optimizer_state_dict(self.model, optimizers, options=self.options)

    def load_optimizer_state(self, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
        set_optimizer_state_dict(self.model, optimizers, state, options=StateDictOptions(full_state_dict=True))

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.call(inputs, targets)

    def sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Skip the all-reduce until the last micro-step of a step (DDP's no_sync)."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(last_micro_step)
            return contextlib.nullcontext()
        if last_micro_step or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()
