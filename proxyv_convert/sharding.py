"""Distillation with the frozen weights sharded over the processes (FSDP2, `torch.distributed.fsdp.fully_shard`).

A launch asks for it through accelerate's environment (`accelerate launch --config_file recipes/accelerate/fsdp.yaml`,
or `--use_fsdp --fsdp_version 2 ...`). The plan is ours, the same on GPUs and on CPU processes: accelerate 1.16 runs
CPU processes as DDP (MULTI_CPU) whatever the launch asks, and its own FSDP2 wrap does not know the ProxyV modules.

Units: every block of the model's repeated stacks (decoder layers, vision encoder layers: the children of each
ModuleList), every per-layer VisionMLP, the input embedding; the root unit holds the rest (projector, vision
embeddings, final norm, lm_head, learned proxies). Frozen and trainable parameters never share a unit except in the
root, and FSDP2 keeps `requires_grad` per parameter, so only the ProxyV parameters get gradients and optimizer state.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .errors import ProxyVError

FSDP_CONFIG = "recipes/accelerate/fsdp.yaml"  # the accelerate config users pass to `accelerate launch`


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() == "true"


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was asked for FSDP (`--use_fsdp`, or `distributed_type: FSDP` in its config)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch(mixed_precision: str) -> None:
    """ProxyVError, before anything loads, for launch options `proxyv distill` cannot honour."""
    fix = f"launch with `accelerate launch --config_file {FSDP_CONFIG} ...`"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ProxyVError(f"DeepSpeed is not supported by `proxyv distill`; shard the frozen weights with FSDP: {fix}")
    if not fsdp_requested():
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ProxyVError(f"--fsdp_version {version} is not supported: `proxyv distill` shards with FSDP2; "
                          f"pass --fsdp_version 2 or {fix}")
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ProxyVError("--fsdp_cpu_ram_efficient_loading true is not supported (every process loads the model "
                          f"before it is sharded); pass --fsdp_cpu_ram_efficient_loading false or {fix}")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ProxyVError("--fsdp_activation_checkpointing is not supported; pass --gradient-checkpointing to "
                          "`proxyv distill` instead")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ProxyVError(f"--fsdp_auto_wrap_policy {policy} is not supported: `proxyv distill` wraps each decoder "
                          f"layer and ProxyV module itself; drop the option or {fix}")
    if mixed_precision == "fp16":
        raise ProxyVError("--mixed-precision fp16 is not supported with FSDP; use --mixed-precision bf16")
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ProxyVError(f"FSDP needs at least 2 processes; {fix} and --num_processes 2 or more")


def unit_names(model: nn.Module) -> list[str]:
    """The submodules that become FSDP units of their own, deepest first (the root is one more)."""
    embedding = model.get_input_embeddings()
    names = [name for name, module in model.named_modules() if module is embedding]
    for stack_name, stack in model.named_modules():
        if isinstance(stack, (nn.ModuleList, nn.ModuleDict)):
            names += [f"{stack_name}.{child}" for child, _ in stack.named_children()]
    return sorted(names, key=lambda name: -name.count("."))


def shard_model(model: nn.Module, device_type: str, world_size: int) -> dict:
    """Apply FSDP2 to `model` in place (the plan in this module's docstring); returns what each process holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    # FSDP2 warns when a unit returns a view (a ProxyV layer drops the proxies by slicing): no code writes into these
    # outputs in place, and tests/test_fsdp.py checks the trained tensors against one process
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    mesh = init_device_mesh(device_type, (world_size,))
    offload = CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy()
    units = unit_names(model)
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh, offload_policy=offload,
                    reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"))
    fully_shard(model, mesh=mesh, offload_policy=offload)  # the root keeps its weights gathered until the backward
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "strategy": "fsdp2", "processes": world_size, "units": len(units) + 1,
        "frozen_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "frozen_bytes_per_process": sum(local(p).numel() * p.element_size() for p in frozen),
    }


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a plain tensor is all of it)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor. Collective: under FSDP every process calls it, in the same order."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as the sharded `like` is (each process slices its own part: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
