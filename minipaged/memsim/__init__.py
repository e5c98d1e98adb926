"""Memory-fragmentation study: replay request traces against KV allocation strategies.

Reproduces the memory argument of the PagedAttention paper (Kwon et al., SOSP 2023,
Fig. 2): contiguous per-request reservation (the Orca baselines, on a real first-fit
allocator) against minipaged's own block manager, on the same trace and KV budget.
``traces`` makes the workloads, ``allocators`` the strategies, ``simulate`` the replay,
``sharing`` the savings of block sharing for parallel sampling and beam search.
"""

from minipaged.memsim.allocators import (
    ContiguousStrategy,
    FirstFitAllocator,
    MemoryBreakdown,
    PagedStrategy,
    orca_max,
    orca_oracle,
    orca_pow2,
)
from minipaged.memsim.simulate import SimConfig, SimResult, simulate
from minipaged.memsim.traces import (
    ALPACA,
    SHAREGPT,
    Request,
    Trace,
    TraceFormatError,
    load_trace_csv,
    synthetic_trace,
)

__all__ = [
    "ALPACA",
    "SHAREGPT",
    "ContiguousStrategy",
    "FirstFitAllocator",
    "MemoryBreakdown",
    "PagedStrategy",
    "Request",
    "SimConfig",
    "SimResult",
    "Trace",
    "TraceFormatError",
    "load_trace_csv",
    "orca_max",
    "orca_oracle",
    "orca_pow2",
    "simulate",
    "synthetic_trace",
]
