"""Per-step trace of the engine, for notebooks and debugging.

One ``StepRecord`` per engine step. Block counts are differences of the block
manager's cumulative ``BlockStats`` counters across the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    step: int
    num_scheduled: int  # sequences in the step
    scheduled: tuple[tuple[str, int, int], ...]  # (request_id, completion index, tokens computed)
    num_prefill_tokens: int
    num_decode_tokens: int
    blocks_allocated: int
    blocks_freed: int
    blocks_copied: int
    preemptions: int  # in this step
    num_waiting: int  # queue lengths after the step
    num_running: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    utilization: float  # tokens stored / slots of used blocks
    tokens_stored: int  # tokens in used blocks; a block shared by several sequences counts once
    logical_blocks: int  # sum of the block-table lengths of all sequences: used_blocks without sharing
    num_finished: int  # sequences that finished in this step
    duration_s: float
    num_draft_tokens: int = 0  # speculative tokens verified in this step (part of num_decode_tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def sharing_saving(self) -> float:
        """Fraction of KV blocks block sharing saves now: ``1 - used_blocks / logical_blocks`` (0 when idle)."""
        return 1.0 - self.used_blocks / self.logical_blocks if self.logical_blocks else 0.0


class Trace(list):
    """A list of StepRecord with a pandas view."""

    def to_dataframe(self):
        """One row per step; columns are the StepRecord fields (``scheduled`` left as tuples)."""
        import pandas as pd

        return pd.DataFrame(
            [dataclasses.asdict(r) for r in self], columns=[f.name for f in dataclasses.fields(StepRecord)]
        )
