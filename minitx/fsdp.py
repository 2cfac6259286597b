"""`trainer.strategy=fsdp`: fully sharded data parallel with FSDP2 (torch's `fully_shard`), through Lightning's
ModelParallelStrategy. Lightning's own `fsdp` strategy (FSDP1) refuses a CPU; FSDP2 runs on CPU processes (gloo) as
on GPUs (NCCL), so the same run is tested here and trained there.

Each transformer block is one shard group (its parameters are all-gathered just before its forward and freed
after), the embeddings, final norm and tied LM head are the root's. Checkpoints are consolidated: rank 0 writes one
ordinary .ckpt with the full weights and optimizer state, which minitx.load, minitx-sample and resume= read as any
other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from minitx.tasks import Task

STRATEGY = "fsdp"  # the trainer.strategy value that selects it
HEADS = ("mlm_logits", "class_logits")  # an Encoder's methods that tasks call outside its forward


class FullyShardedStrategy(ModelParallelStrategy):
    """ModelParallelStrategy as plain FSDP: every process is one data-parallel shard (Lightning's default mesh would
    make a node's processes a tensor-parallel group), and checkpoints are gathered into one file on rank 0."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        # the process count is known only now (the Trainer's devices and num_nodes)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(strategy: Any) -> bool:
    return isinstance(strategy, FullyShardedStrategy)


def shard(model: torch.nn.Module, mesh: DeviceMesh, precision: str, compile: bool) -> str:
    """fully_shard each block, then the root (what remains: embeddings, final norm, the tied head); a model without
    transformer.blocks is one group. Under bf16-mixed the blocks compute and all-gather in bfloat16 and reduce
    gradients in float32 (Lightning's autocast alone would gather float32 weights); `compile` compiles each block
    before it is sharded. Returns what was done, for the log."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    blocks = getattr(getattr(model, "transformer", None), "blocks", [])
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16-mixed" else MixedPrecisionPolicy())
    for block in blocks:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in HEADS:  # heads a task calls after forward: they run with the root's weights gathered
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return (f"fsdp: {len(blocks)} blocks and the root sharded over {mesh.size()} processes, this one holding {held:,} "
            f"of {total:,} parameters")


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, on the CPU; empty on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unshard_for_rank_zero(module: Task, is_global_zero: bool) -> None:
    """After training, replace the sharded model by a whole copy of its final weights on rank 0, so that what the
    task shows at the end (a sample, computed on rank 0 alone) needs no other process. Every rank must call it."""
    from minitx.checkpoint import build_model

    state = full_state(module.model)
    if not is_global_zero:
        return
    extras = module.checkpoint_extras()
    model = build_model(module.model_cfg, module.task, extras.get("labels"), extras.get("pooling", "cls"))
    model.load_state_dict(state)
    module.model = model.to(module.device)
