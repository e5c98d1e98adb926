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
    """A list of StepRecord with a pandas view.

    ``max_steps`` bounds it for a long-running engine: past ``2 * max_steps`` records the oldest are
    dropped down to the newest ``max_steps`` (amortised, so an append stays O(1)). ``num_steps``
    counts every step ever recorded, kept or dropped; ``since(step)`` reads the kept records from a
    step number on, which stays right after a trim where slicing by ``len`` would not.
    """

    def __init__(self, max_steps: int | None = None) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.num_steps = 0

    def append(self, record: StepRecord) -> None:
        """Record one step, dropping the oldest records when over the bound."""
        super().append(record)
        self.num_steps += 1
        if self.max_steps is not None and len(self) > 2 * self.max_steps:
            del self[: len(self) - self.max_steps]

    def since(self, step: int) -> list[StepRecord]:
        """The kept records of steps numbered ``step`` and later."""
        first = self[0].step if self else self.num_steps
        return self[max(step - first, 0) :]

    def to_dataframe(self):
        """One row per step; columns are the StepRecord fields (``scheduled`` left as tuples)."""
        import pandas as pd

        return pd.DataFrame(
            [dataclasses.asdict(r) for r in self], columns=[f.name for f in dataclasses.fields(StepRecord)]
        )
