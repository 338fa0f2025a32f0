"""Process-group and parameter helpers shared by the constraints (single process, DDP, DeepSpeed ZeRO-1/2/3).

Constraints that edit weights after an optimizer step read and write parameters through
:func:`get_full_param` / :func:`set_full_param`, so that the same code is exact without DeepSpeed
(the parameter itself) and under ZeRO (the fp32 master copy, then the module's copy is refreshed). Under
DeepSpeed both are **collective**: call them on every rank, for the same parameters, in the same order
(``on_step_end`` runs on every rank).

Everything here is a no-op / identity in a single process, so single-process behaviour is unchanged.

* :func:`world_size`, :func:`rank`, :func:`is_main_process`, :func:`barrier`
* :func:`all_reduce_sum` — per-rank statistics that feed the loss (e.g. the number of valid rows).
* :func:`main_process_first` — rank 0 computes / writes (calibration, artifacts), the others wait.
* :func:`sync_folder` — copy a folder that exists on rank 0 to ranks (nodes) that do not see it:
  nothing assumes a shared filesystem.
* :func:`is_zero3`, :func:`param_shape`, :func:`gathered` — ZeRO-3 partitioned parameters.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence

import torch

from .errors import ConfigError

__all__ = [
    "all_reduce_sum", "barrier", "broadcast_object", "gathered", "get_full_param", "is_distributed",
    "is_main_process", "is_zero3", "main_process_first", "param_shape", "rank", "set_full_param", "sync_folder",
    "world_size", "zero3_active",
]


# ----------------------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """A process group with more than one rank is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def _device() -> torch.device:
    """Device for collective tensors: CUDA under NCCL, CPU otherwise (gloo)."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` (a vector) over all ranks, as a float64 CPU tensor (the values themselves in one process)."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).clone()
    if not is_distributed():
        return t
    d = t.to(_device())
    torch.distributed.all_reduce(d, op=torch.distributed.ReduceOp.SUM)
    return d.cpu()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled; fine for metadata and small/medium folders)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=_device() if _device().type == "cuda" else None)
    return box[0]


@contextlib.contextmanager
def main_process_first(local: bool = False) -> Iterator[bool]:
    """Rank 0 (``local``: each node's local rank 0) runs the block first; the others enter after it finished.
    Yields whether this rank is the one that goes first. Use it for one-time work whose result the other ranks then
    read (calibration, artifact writes, downloads); with ``local=False`` and no shared filesystem, follow it with
    :func:`sync_folder`."""
    first = (int(os.environ.get("LOCAL_RANK", rank())) == 0) if local else is_main_process()
    if not first:
        barrier()
    try:
        yield first
    finally:
        if first:
            barrier()


def _pack(folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=".")
    return buf.getvalue()


def _unpack(data: bytes, folder: str) -> None:
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{os.path.abspath(folder)}.sync{rank()}.tmp"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)  # noqa: S202
    try:
        os.replace(tmp, folder)
    except OSError:  # another rank on this node won the race: its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def sync_folder(folder: str | os.PathLike, src: int = 0) -> bool:
    """Make ``folder`` (as it is on rank ``src``) exist on every rank. Collective. Ranks that already see it (shared
    filesystem, or same node) keep their copy; ranks that do not receive it packed from ``src`` and write it
    atomically. Returns whether anything was copied here. Raises on every rank when ``src`` has no such folder."""
    if not is_distributed():
        return False
    folder = os.fspath(folder)
    have = os.path.isdir(folder)
    flags = all_reduce_sum([0.0 if have else 1.0, 1.0 if (have and rank() == src) else 0.0])
    if flags[1] == 0:
        raise FileNotFoundError(f"{folder}: not found on rank {src}, so it cannot be sent to the other ranks")
    if flags[0] == 0:
        return False
    data = broadcast_object(_pack(folder) if rank() == src else None, src=src)
    if not have:
        _unpack(data, folder)
    barrier()
    return not have


# ---------------------------------------------------------------------------------------------- ZeRO-3
def is_zero3(param: torch.Tensor) -> bool:
    """``param`` is partitioned by DeepSpeed ZeRO-3 (its ``.data`` is empty outside a gather)."""
    return hasattr(param, "ds_id")


def zero3_active(model: torch.nn.Module | None) -> bool:
    """``model`` is ZeRO-3-partitioned (then forwards are collective: every rank must run the same sequence of
    forwards). DeepSpeed partitions every parameter of the module it wraps, so the first one tells: walking all of
    them cost ~8 ms per call on a LoRA-wrapped 135M model (2,500 modules), several calls per training step."""
    first = next(iter(model.parameters()), None) if model is not None else None
    return first is not None and is_zero3(first)


def param_shape(param: torch.Tensor) -> torch.Size:
    """The full shape of ``param`` (also when it is ZeRO-3-partitioned)."""
    return param.ds_shape if is_zero3(param) else param.shape


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full values of ZeRO-3 params inside the block (collective; a no-op for ordinary tensors). With
    ``modifier_rank`` the values that rank writes are re-partitioned on exit."""
    params = list(params)
    any_z3 = any(p is not None and is_zero3(p) for p in params)
    if not any_z3:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # A param DeepSpeed already holds (prefetched for a module that runs next) is used as it is and left to DeepSpeed
    # to release: freeing it here would break that module. Prefetching follows the same trace on every rank, so
    # every rank gathers the same params.
    z3 = [p for p in params if p is not None and is_zero3(p)
          and (modifier_rank is not None or p.ds_status == ZeroParamStatus.NOT_AVAILABLE)]
    if not z3:
        yield
        return

    with deepspeed.zero.GatheredParameters(z3, modifier_rank=modifier_rank):
        yield


# ---------------------------------------------------------------------------------- full-parameter access
def _has_master(param: torch.Tensor) -> bool:
    if is_zero3(param):
        return getattr(param, "_z3_optimizer", None) is not None
    # ZeRO-1/2: every optimized param has the attribute; it is None on ranks whose partition holds no fragment of it,
    # yet those ranks must join the collective (``get_full_hp_param`` all-reduces the fragments)
    return hasattr(param, "_hp_mapping")


def get_full_param(param: torch.nn.Parameter) -> torch.Tensor:
    """The full (unpartitioned) float32 value of ``param`` as the optimizer sees it (a new tensor).

    Without DeepSpeed: a float32 copy of the parameter. Under ZeRO-1/2/3: the fp32 master weights
    (``deepspeed.utils.safe_get_full_fp32_param``); a frozen ZeRO-3 param (no master) is gathered. Collective
    under DeepSpeed."""
    if _has_master(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().clone()
    if is_zero3(param):
        with gathered([param]):
            return param.data.detach().float().clone()
    return param.data.detach().float().clone()


def set_full_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write ``value`` (full shape) into ``param`` where the next optimizer step will read it from.

    Under ZeRO-1/2/3 the fp32 master (``safe_set_full_fp32_param``) **and** the module's working copy (ZeRO-3:
    inside a gather, written by rank 0 and re-partitioned), so the next forward and the next step both see it;
    editing only the module copy would be undone by the next step. Collective under DeepSpeed."""
    shape = param_shape(param)
    if tuple(value.shape) != tuple(shape):
        raise ConfigError(f"set_full_param: value has shape {tuple(value.shape)}, the parameter {tuple(shape)}")
    with torch.no_grad():
        if _has_master(param):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, value.detach().to(torch.float32))
        if is_zero3(param):
            with gathered([param], modifier_rank=0):
                if is_main_process():
                    param.data.copy_(value.to(param.device, param.dtype))
        else:
            param.data.copy_(value.to(param.device, param.dtype))
