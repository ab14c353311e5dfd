"""Data-parallel training helpers on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

``torchrun --nproc-per-node K -m sentio_lab.ppo ...`` starts K processes; :func:`init_from_env` joins them into one
process group (torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``).
Without those variables (a plain ``python -m sentio_lab.ppo``) nothing is initialised and every helper here is the
identity for a world of one, so a single-process run is exactly what it was.

The data-parallel scheme (used by :mod:`sentio_lab.ppo`):

* each rank steps its own slice of the parallel episodes (``num_envs / K`` of them, env seed
  :func:`rank_seed`), so the K ranks together step the same ``num_envs`` episodes per step as one process would;
* gradients are averaged over ranks with one all-reduce of a flattened buffer (:func:`average_gradients`) after
  ``backward`` and before clipping -- what ``DistributedDataParallel`` does, written out because the agent is used
  through its methods (``get_action_and_value``), not ``forward``, which is what DDP's hooks attach to, and because
  the networks are a few thousand parameters: one bucket, nothing for DDP's overlap of communication to hide;
* observation normalisation statistics are updated with the observations of *all* ranks (:func:`all_gather_rows`,
  in rank order), so every rank holds the same statistics, equal to one process stepping all episodes;
* decisions that end loops (approximate-KL early stop, a non-finite rollout) are taken on values reduced over
  ranks, so no rank leaves a collective call that the others still wait in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True in a process group of more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that logs and writes checkpoints."""
        return self.rank == 0


def context() -> DistContext:
    """The current process group's context (a world of one when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda else "gloo"


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment; a world of one without ``WORLD_SIZE`` > 1.

    On CUDA each process uses ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``), so ``--device cuda`` means "this
    rank's GPU".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    backend = backend_for(device)
    if backend == "nccl":  # pragma: no cover -- needs GPUs
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return context()


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_envs(num_envs: int, ctx: DistContext) -> int:
    """This rank's share of ``num_envs`` parallel episodes (they must divide evenly, so every rank's batch is equal)."""
    if num_envs % ctx.world_size:
        raise ValueError(f"num_envs={num_envs} does not split evenly over {ctx.world_size} processes")
    return num_envs // ctx.world_size


def rank_seed(seed: int, rank: int) -> int:
    """Env and sampling seed of a rank: the run's seed on rank 0, distinct streams on the others."""
    return seed + 1_000_033 * rank


def all_gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated along dim 0 in rank order (``x`` when alone)."""
    if not ctx.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def average_gradients(module: nn.Module, ctx: DistContext) -> None:
    """Replace every gradient with its mean over ranks: one all-reduce of one flattened buffer."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a tensor over ranks (``value`` itself when alone)."""
    if not ctx.enabled:
        return value
    out = value.detach().clone().to(torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / ctx.world_size).to(value.dtype)


def any_rank(flag: bool, ctx: DistContext, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on any rank (``flag`` itself when alone); ``device``: where NCCL can reduce."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers (normalisation statistics included) to every rank."""
    if not ctx.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)
