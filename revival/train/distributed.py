"""Data-parallel training on torchrun: DDP or FSDP2, rows sharded by rank, one gradient reduction per optimizer step,
and distributed checkpoints that resume on any world size.

    torchrun --nproc-per-node 8 -m revival.cli train --config configs/x.yaml train.parallel=fsdp
    revival train --nproc 8 --config configs/x.yaml train.parallel=fsdp       # the same, torchrun launched for you

`train.parallel`: ``none`` (one process, the plain trainer), ``ddp`` (DistributedDataParallel: every rank holds the
whole model, gradients all-reduced) or ``fsdp`` (FSDP2 ``fully_shard`` on every block and on the model: parameters,
gradients and optimizer state sharded over the ranks; on CUDA under bf16 the parameters are gathered in bf16 and the
gradients reduced in fp32). A run with ``ddp``/``fsdp`` started without torchrun is a group of one process.

Data (contract, on top of revival/data/packing.py): ``position`` counts the sequences read by all ranks together. Each
micro-batch reads ``world_size * batch_size`` positions, rank ``r`` the ``batch_size`` rows from
``position + r * batch_size``, so world size W at batch b reads, micro-batch by micro-batch, exactly the rows world
size 1 reads at batch W * b, and a saved position resumes on any world size.

Checkpoints (layout of revival/train/checkpoint.py plus ``dcp/``): ``dcp/`` holds the model and optimizer state
written by torch.distributed.checkpoint (each rank its shards), loadable on any world size, with or without a process
group; ``model.safetensors`` holds the whole model (gathered to rank 0) for ``revival generate``/``from_pretrained``;
``trainer_state.pt`` the counters, scheduler and rank 0's RNG state. A resumed run reads the weights from
``model.safetensors`` and the optimizer from ``dcp/``, on any world size and in any mode (``none`` included); a
single-process checkpoint (no ``dcp/``) resumes on several ranks too. The output directory must be on a file system
every rank sees (on several nodes: a shared one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..devices import resolve_device
from ..errors import UserError

PARALLEL_MODES = ("none", "ddp", "fsdp")
DCP_DIR = "dcp"


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `world_size` processes, its device, the parallel mode."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, draws progress bars and writes the single-file parts of checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def _check_parallel(parallel: str) -> None:
    if parallel not in PARALLEL_MODES:
        raise UserError(f"train.parallel: expected one of {list(PARALLEL_MODES)}, got {parallel!r}")


def _rank_device(device_name: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank` on its node: cuda:LOCAL_RANK, or the CPU."""
    if device_name == "cpu":
        return torch.device("cpu")
    if device_name not in ("auto", "cuda"):
        raise UserError(f"train.device: {device_name!r} with a distributed train.parallel; expected 'auto', 'cuda' "
                         "or 'cpu' (each process uses cuda:LOCAL_RANK)")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank}: this node has only {torch.cuda.device_count()} CUDA devices; "
                             "launch at most that many processes per node")
        return torch.device("cuda", local_rank)
    if device_name == "cuda":
        raise UserError("train.device: 'cuda' requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device("cpu")


def init_world(parallel: str, device_name: str) -> World:
    """Join (or create) the default process group for `parallel` and pick this rank's device.

    ``none`` makes no group and refuses to run under a launcher with WORLD_SIZE > 1 (every process would train the
    whole model on the same rows). ``ddp``/``fsdp`` read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) and use NCCL on CUDA, gloo on the CPU; without those env vars the group is this one process.
    """
    _check_parallel(parallel)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if launched > 1:
            raise UserError(f"train.parallel: 'none' in a launch of {launched} processes (WORLD_SIZE={launched}); "
                             "set train.parallel=ddp or train.parallel=fsdp")
        return World(device=resolve_device(device_name, "train.device"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_backend() != backend:
        raise UserError(f"train.device: {device.type} needs the {backend} backend, but the process group in use "
                         f"runs {dist.get_backend()}")
    return World(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(world: World) -> None:
    """Leave the process group (at the end of a command; a library caller may keep it for more runs)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def silent(*args: Any, **kwargs: Any) -> None:
    """The print function of the ranks other than 0."""


class NullLogger:
    """The metrics logger of the ranks other than 0 (rank 0 writes metrics.csv and TensorBoard)."""

    def __init__(self, out_dir: str | Path):
        self.csv_path = Path(out_dir) / "metrics.csv"

    def log(self, step: int, split: str, **metrics: float) -> None:
        pass

    def close(self) -> None:
        pass


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# -- the model ---------------------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, world: World, param_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to train: `model` itself (``none``), a DDP wrapper around it (``ddp``), or `model` sharded in place
    by ``fully_shard`` per block and at the root (``fsdp``; `param_dtype` bf16 gathers bf16 parameters and reduces
    fp32 gradients). Build the optimizer after this: FSDP replaces the parameters by their shards.

    Under ``fsdp`` each block frees its gathered parameters after its forward and gathers them again in backward on
    several ranks; on one rank, where a shard is the whole parameter and resharding saves no memory, only costs
    copies, it keeps them. The root never reshards (FSDP2's advice: backward needs it first)."""
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    if world.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        reshard_after_forward = world.world_size > 1
        mesh = init_device_mesh(world.device.type, (world.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, world: World, enabled: bool):
    """Backward passes inside reduce gradients across ranks only when `enabled` (the last micro-batch of a step):
    accumulation without an all-reduce / reduce-scatter per micro-batch.

    FSDP's switch is touched only to turn syncing off, and turned back on on the way out: it is on outside this
    context, and setting it walks every module and parameter group (host time in every step, `docs/distributed.md`)."""
    if world.parallel == "ddp" and not enabled:
        with module.no_sync():
            yield
    elif world.parallel == "fsdp" and not enabled:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global 2-norm is at most `max_norm`; returns the norm before.

    Plain tensors (``none``, ``ddp``: every rank holds the whole averaged gradient) take torch's `clip_grad_norm_`.
    FSDP's gradients are DTensors sharded over the ranks: the norm is computed on the local shards with foreach kernels
    and their squared sums all-reduced over the mesh, instead of DTensor dispatches per tensor (host time the GPU waits
    for, `docs/distributed.md`). Same result up to the summation order."""
    from torch.distributed.tensor import DTensor, Shard

    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if not all(isinstance(g, DTensor) and all(isinstance(p, Shard) for p in g.placements) for g in grads):
        raise ValueError("parameters: expected every gradient a DTensor sharded on each mesh dimension (FSDP2 "
                         "fully_shard) or none, got a mix")
    local = [g.to_local() for g in grads]
    squared = torch.stack(torch._foreach_norm(local)).float().square().sum()
    mesh = grads[0].device_mesh
    if mesh.size() > 1:
        dist.all_reduce(squared, group=mesh.get_group())
    total = squared.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


class LocalShardAdamW(torch.optim.AdamW):
    """torch's AdamW, stepping FSDP's DTensor parameters through their local shards: the update is elementwise, so
    each rank updating its shard as plain tensors (torch's fused or foreach kernels, as the group says) is the update
    of the whole parameter, without the DTensor dispatch of every multi-tensor op (host time the GPU waits for,
    `docs/distributed.md`). The state is torch's, created by torch's code: exp_avg / exp_avg_sq are DTensors like
    their parameters, so `state_dict`, torch.distributed.checkpoint and `load_optimizer_state` see exactly what
    torch's AdamW holds, and a checkpoint of either resumes with the other. Plain parameters step as in torch's."""

    def _init_group(self, group, *arguments):
        # torch's step fills these lists (params, grads, moments, steps) here and hands them to its functional adam():
        # swapping in the local shards is the whole change (older torch's own AdamW passes a bool `amsgrad` among them)
        # (`_local_tensor`, not `to_local()`: that makes a new view per call on a Parameter in torch >= 2.13; the import
        # once per group: once per tensor, 915 a step, cost ~4M instructions a step)
        from torch.distributed.tensor import DTensor

        has_complex = super()._init_group(group, *arguments)
        for tensors in arguments:
            if isinstance(tensors, list):
                tensors[:] = [tensor._local_tensor if isinstance(tensor, DTensor) else tensor for tensor in tensors]
        return has_complex


def rank_position(position: int, batch_size: int, world: World) -> int:
    """The first position of this rank's rows in the micro-batch of all ranks that starts at `position`."""
    return position + world.rank * batch_size


def mean_over_ranks(value: float, world: World) -> float:
    """The mean of `value` over the ranks (float64, so the mean of two equal-weight halves is exact)."""
    if not world.distributed or world.world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(total)
    return total.item() / world.world_size


# -- checkpoints -------------------------------------------------------------------------------------------------------
def _full_model(model: nn.Module, world: World) -> nn.Module | None:
    """The whole model on the CPU in rank 0 (None elsewhere); every rank must call this (FSDP gathers)."""
    if world.parallel != "fsdp":
        return model if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return None
    from ..models import LanguageModel

    with torch.device("meta"):
        full = LanguageModel(model.config)
    full.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:  # assign= gives the two names separate parameters; re-tie them
        full.lm_head.weight = full.embedding.weight
    return full


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
                    run_config: dict[str, Any], trainer_state: dict[str, Any], world: World, keep: int = 2) -> Path:
    """Write checkpoint `step` from every rank (a collective call): ``dcp/`` with the sharded model and optimizer
    state, then rank 0 adds the whole model, tokenizer, run config and `trainer_state` and publishes it atomically
    (revival/train/checkpoint.py). `model` is the unwrapped model (for DDP: the module inside the wrapper)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from . import checkpoint as ckpt

    staging = Path(out_dir) / "checkpoints" / f".step-{step:08d}.dcp.partial"
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(world)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
    full = _full_model(model, world)
    final = None
    if world.is_main:
        try:
            final = ckpt.save_checkpoint(out_dir, step, full, tokenizer, run_config, trainer_state, keep=keep,
                                         extra={DCP_DIR: staging})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    barrier(world)
    return final if final is not None else Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def load_optimizer_state(checkpoint_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         trainer_state: dict[str, Any]) -> None:
    """Restore `optimizer` from a checkpoint of any world size and parallel mode; every rank calls it. `model` is the
    unwrapped model, its weights already loaded from the checkpoint's ``model.safetensors`` (before sharding).

    With ``dcp/`` the state is read by torch.distributed.checkpoint, resharded to this world size; without (a
    single-process run) it is ``trainer_state["optimizer"]``, sharded here when `model` is FSDP-sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule

    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=checkpoint_dir / DCP_DIR)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    elif "optimizer" not in trainer_state:
        raise UserError(f"resume: {checkpoint_dir} has neither {DCP_DIR}/ nor an optimizer state in "
                        "trainer_state.pt; it is not a training checkpoint")
    elif isinstance(model, FSDPModule):
        by_name = _optimizer_state_by_name(model, optimizer, trainer_state["optimizer"])
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(trainer_state["optimizer"])


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` of a single-process run (parameters numbered in group order) keyed by parameter
    names instead, the form torch.distributed.checkpoint.state_dict reads; `optimizer` has the same groups."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    if len(order) != sum(len(group["params"]) for group in state["param_groups"]):
        raise UserError(f"resume: the checkpoint's optimizer holds "
                         f"{sum(len(group['params']) for group in state['param_groups'])} parameters, the model "
                         f"{len(order)}")
    return {"state": {order[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                             for group in state["param_groups"]]}


# -- launching ---------------------------------------------------------------------------------------------------------
def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """The torchrun command line that runs ``revival <cli_args>`` in `nproc` processes on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "revival.cli", *cli_args]


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run ``revival <cli_args>`` under torchrun with `nproc` processes; returns torchrun's exit status."""
    return subprocess.call(torchrun_command(nproc, cli_args))
