"""torchrun environment -> process group, and the few rank-0 helpers the rest of the code needs.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): nccl on GPU, gloo on CPU. Launched as a
plain `python` script: a single process and no process group at all.
"""
import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as tdist

from kd.errors import KDError

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KDError("train.device=cuda but no CUDA device is available; use train.device=auto")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store = _restart_scoped_store(world_size, timeout)
        kwargs = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        tdist.init_process_group(backend=backend, timeout=timeout,
                                 device_id=device if device.type == "cuda" else None, **kwargs)
        control_group()  # collective: create it on every rank now, at the same point
    return DistInfo(rank, world_size, local_rank, device)


def _restart_scoped_store(world_size: int, timeout: datetime.timedelta):
    """The torchrun agent's store, scoped to this restart attempt; None to let torch decide.

    torchrun (c10d rendezvous) keeps one TCPStore for the whole job and hands it to every worker
    generation. After `--max-restarts` restarts the workers, the keys of the previous generation
    (each rank's gloo/nccl address) are still there, and a fast rank reads the dead worker's
    address and fails with "connection refused". Prefixing the keys with the restart count keeps
    generations apart. That count is consistent only when all ranks share one agent (one node);
    on several nodes we leave torch's default (set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 there).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != world_size:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    base = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return tdist.PrefixStore(f"kd/attempt_{attempt}", base)


def run_in_process_group(requested_device: str, fn: Callable[[DistInfo], T]) -> T:
    """Set up the process group, run `fn(info)`, and always tear the group down."""
    info = setup(requested_device)
    try:
        return fn(info)
    finally:
        teardown()


def teardown() -> None:
    global _CONTROL_GROUP
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _CONTROL_GROUP = None


def is_rank0() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def rank0_first(fn: Callable[[], T]) -> None:
    """Run `fn` on rank 0 while the others wait; if it fails, every rank fails with its message.

    Without this, a user error on rank 0 (say, a missing file) would leave the others blocked in a
    barrier until the 30-minute collective timeout.
    """
    error = None
    if is_rank0():
        try:
            fn()
        except KDError as err:
            error = str(err)
    if tdist.is_initialized():
        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise KDError(error)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tensor = tensor.clone()
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        tensor /= tdist.get_world_size()
    return tensor


def all_reduce_max_int(value: int) -> int:
    """Agree on a small integer across ranks, on the CPU (gloo) control group: no GPU sync."""
    if not tdist.is_initialized():
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=control_group())
    return int(flag.item())


_CONTROL_GROUP = None


def control_group():
    """The default group on gloo; a gloo side group when the default one is nccl."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = (tdist.new_group(backend="gloo") if tdist.get_backend() == "nccl"
                          else tdist.group.WORLD)
    return _CONTROL_GROUP


def all_gather_object(value) -> list:
    """Every rank's `value` (a small picklable object), in rank order, over the CPU control group."""
    if not tdist.is_initialized():
        return [value]
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, value, group=control_group())
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tensor = tensor.clone()
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor
