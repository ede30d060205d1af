"""Free memory, and the memory budgets sized from it (alpha-CROWN's per-row slopes; the
branch-and-bound batch in :mod:`adcert.certify.domains` reads :func:`memory_free` too)."""
from __future__ import annotations

import os
from typing import Optional

import torch

#: Share of the free memory alpha-CROWN's per-row intermediate slopes may take by default.
ALPHA_MEMORY_SHARE = 0.25

#: Copies of every per-row slope alive during the optimisation: the slope, its gradient, Adam's
#: two moments, the kept best and the gathered copy in the autograd graph. Measured on CNN7
#: width 16, CIFAR shape, fp32: peak RSS grew by 23 bytes per extra slope element (4.0 GB at
#: 1.7e7 elements, 5.9 GB at 9.7e7).
SLOPE_COPIES = 6


def memory_free(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, else the host's available memory
    (``MemAvailable`` of ``/proc/meminfo``, else the physical pages free)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def alpha_budget(device: torch.device, dtype: torch.dtype, free: Optional[int] = None) -> int:
    """Default ``max_alpha_elements``: per-row slope elements filling :data:`ALPHA_MEMORY_SHARE`
    of ``free`` bytes (default :func:`memory_free`) at :data:`SLOPE_COPIES` copies each."""
    free = memory_free(device) if free is None else free
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(ALPHA_MEMORY_SHARE * free) // (SLOPE_COPIES * itemsize)
