"""Where this process runs: its place among torchrun's processes and whether it has a GPU.

Read from the environment once; every other module asks here. Under torchrun (or `accelerate
launch`) every process runs the same command; only the main one speaks and writes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


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


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def quiet_known_noise() -> None:
    """Silence what libraries print on every run although nothing is wrong; keep other warnings."""
    import logging
    import warnings

    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional kernel package at import
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers' checkpoint rotation on filesystems with coarse timestamps (it orders by step)
    logging.getLogger("transformers.trainer_utils").setLevel(logging.ERROR)
    # peft asks the model a deprecated question on transformers 5
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # the seed recipe's paged AdamW on a CPU falls back to the plain one, which is what we want there
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # liger-kernel reports which Triton backends it did not find
    warnings.filterwarnings("ignore", module="liger_kernel")
    logging.getLogger("liger_kernel").setLevel(logging.ERROR)
    # progress bars of one-shard loads and saves, and datasets' split preparation
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
