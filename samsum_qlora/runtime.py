"""Where this process runs: its place among torchrun's processes, its device, and how the processes
wait for and talk to each other.

Read from the environment once; every other module asks here. Under torchrun (or `accelerate
launch`) every process runs the same command; only the main one speaks and writes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def say(self, *args, **kwargs) -> None:
        """print(), on the main process only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


@functools.cache
def current() -> Runtime:
    env = os.environ
    return Runtime(
        rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)), local_rank=int(env.get("LOCAL_RANK", 0))
    )


# --- the device ------------------------------------------------------------------------------------


def has_cuda() -> bool:
    """Whether this process computes on a CUDA GPU (the one question every module asks here)."""
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if has_cuda() else "cpu"


def use_local_gpu() -> int | str:
    """This process's device for `device_map`: its GPU under torchrun (made the current one too:
    liger-kernel's RoPE launches on the current device, not its tensors'), else the CPU."""
    import torch

    if not has_cuda():
        return "cpu"
    torch.cuda.set_device(current().local_rank)
    return current().local_rank


def synchronize() -> None:
    """Wait for the GPU's queued work (a timing must include it)."""
    import torch

    if has_cuda():
        torch.cuda.synchronize()


def release_memory(reset_peak: bool = False) -> None:
    """Give cached GPU blocks back, so the next model starts from an empty card."""
    import torch

    if has_cuda():
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def free_memory() -> int | None:
    """Bytes this process may still allocate on its GPU: what the card has free, within the share
    `torch.cuda.set_per_process_memory_fraction` allows it; None on a CPU."""
    import torch

    if not has_cuda():
        return None
    free, total = torch.cuda.mem_get_info()
    share = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return int(min(free, share * total - torch.cuda.memory_reserved()))


def peak_memory() -> int | None:
    """Bytes the GPU held at most since the last `release_memory(reset_peak=True)`; None on a CPU."""
    import torch

    return torch.cuda.max_memory_allocated() if has_cuda() else None


# --- signals -------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so both stop a command the same way."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For the block, SIGTERM raises `Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt:
    cleanups run and what was saved stays saved, where by default the process would die on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the processes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The processes joined for the block: the group the Trainer made, else a gloo group of our own
    (a few Python objects travel, never tensors; rank 0 may wait at a gather for a long eval)."""
    import torch.distributed as dist

    joined = current().distributed and not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def _group_ready() -> bool:
    import torch.distributed as dist

    return current().distributed and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Every process waits here for the others (nothing to wait for alone)."""
    import torch.distributed as dist

    if _group_ready():
        dist.barrier()


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run by the main process, its result handed to every process."""
    import torch.distributed as dist

    box = [compute() if current().is_main else None]
    if _group_ready():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every process's `value`, in rank order, on the main process (None on the others)."""
    import torch.distributed as dist

    if not _group_ready():
        return [value]
    out = [None] * current().world_size if current().is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def quiet_known_noise() -> None:
    """Silence what libraries print on every run although nothing is wrong; keep other warnings."""
    import logging
    import warnings

    # bitsandbytes on a CPU with AVX512-BF16 fetches an optional CPU kernel from the Hub at import
    # (through `kernels`, which transformers >= 5.25 installs); offline or unreachable it warns twice
    # and falls back to its own kernel, which is what runs here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # transformers' checkpoint rotation on filesystems with coarse timestamps (it orders by step)
    logging.getLogger("transformers.trainer_utils").setLevel(logging.ERROR)
    # peft asks the model a deprecated question on transformers 5
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # the tutorial recipe's paged AdamW on a CPU falls back to the plain one, which is what we want there
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # liger-kernel reports which Triton backends it did not find
    warnings.filterwarnings("ignore", module="liger_kernel")
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)
    # progress bars of one-shard loads and saves, and datasets' split preparation
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
