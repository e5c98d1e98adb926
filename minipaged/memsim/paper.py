"""Published numbers of the PagedAttention paper (Kwon et al., SOSP 2023, arXiv 2309.06180).

Copied here so the study never reads anything outside the package at run time. The
Fig. 2 breakdown is read off the bar chart (percent of KV memory, time-averaged, OPT-13B
on an A100-40GB); the paper lumps free memory into "external fragmentation & others".
"""

from __future__ import annotations

from minipaged.memsim.sharing import SharingResult
from minipaged.memsim.simulate import SimResult

# strategy -> (token states, reservation, internal, external & others), percent; None = not shown
FIG2_BREAKDOWN: dict[str, tuple[float, float, float | None, float]] = {
    "Orca-Max": (20.4, 13.3, 57.3, 8.9),
    "Orca-Pow2": (26.8, 17.9, 13.6, 41.6),
    "Orca-Oracle": (38.2, 25.2, None, 36.6),
}
VLLM_TOKEN_STATES = 96.3  # percent of KV memory holding token states under vLLM (Fig. 2)

# (mode, workload) -> (low, high) percent of KV memory saved by sharing (section 6.3, OPT-13B)
SHARING_SAVINGS: dict[tuple[str, str], tuple[float, float]] = {
    ("parallel", "Alpaca"): (6.1, 9.8),
    ("parallel", "ShareGPT"): (16.2, 30.5),
    ("beam", "Alpaca"): (37.6, 55.2),
    ("beam", "ShareGPT"): (44.3, 66.3),
}


def fig2_rows(results: list[SimResult], *, saturated_only: bool = True) -> list[dict[str, object]]:
    """Rows (strategy, category, ours %, paper %) for a side-by-side table of Fig. 2.

    Our ``external`` and ``free`` are summed into the paper's "external & others"; the
    paged strategies are compared with vLLM's 96.3% token states.
    """
    rows: list[dict[str, object]] = []
    for res in results:
        b = {k: 100 * v for k, v in res.breakdown(saturated_only=saturated_only).items()}
        ours = (b["token_states"], b["reservation"], b["internal"], b["external"] + b["free"])
        paper = FIG2_BREAKDOWN.get(res.strategy)
        names = ("token states", "reservation", "internal frag.", "external frag. & others")
        for i, name in enumerate(names):
            if paper is not None:
                ref = paper[i]
            else:
                ref = VLLM_TOKEN_STATES if i == 0 else None
            rows.append(
                {
                    "strategy": res.strategy,
                    "trace": res.trace,
                    "quantity": name,
                    "ours %": round(ours[i], 1),
                    "paper %": ref,
                }
            )
    return rows


def sharing_rows(results: list[SharingResult], workload_of: dict[str, str]) -> list[dict[str, object]]:
    """Rows (mode, width, workload, ours %, paper range %); ``workload_of`` maps trace name -> workload."""
    rows: list[dict[str, object]] = []
    for res in results:
        workload = workload_of[res.trace]
        lo, hi = SHARING_SAVINGS[(res.mode, workload)]
        rows.append(
            {
                "mode": res.mode,
                "width": res.width,
                "workload": workload,
                "ours %": round(100 * res.saving, 1),
                "paper %": f"{lo}-{hi}",
            }
        )
    return rows
