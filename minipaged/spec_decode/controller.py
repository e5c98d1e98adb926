"""Back-off: a sequence whose drafts keep failing stops proposing for a while, then tries again.

Verifying ``k`` drafts makes the step compute ``k + 1`` tokens for the sequence instead of one; when
none is accepted that work is lost (and the verification path costs more than a plain sample).
Text that never copies itself (random tokens, free-form sampling at a high temperature) would pay
this every step, so each sequence keeps a small record:

- a verification step that accepts nothing is a *miss*; ``backoff_after`` misses in a row pause
  the sequence's proposals for ``backoff_min_steps`` of its steps (decoding one token a step);
- after the pause the sequence proposes again: the next verification is a probe. Another miss
  pauses it again for twice as long, up to ``backoff_max_steps``; one accepted draft clears the
  record, so a sequence that starts copying is back to full speculation at once.

Steps where the proposer finds nothing, or where the scheduler drops the drafts for lack of room,
neither count nor clear: they cost nothing to verify. Greedy output is unchanged by construction
(the controller only decides whether drafts are proposed, never what is emitted); the pause only
changes how many forward passes a sequence needs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class BackoffState:
    """One sequence's record."""

    misses: int = 0  # verification steps in a row that accepted nothing
    pause: int = 0  # length of the latest pause in steps; 0 = never paused since the last acceptance
    pause_left: int = 0  # steps still to skip


@dataclass
class DraftController:
    """Per-sequence back-off of speculation (see the module docstring); ``backoff_after=None`` never pauses."""

    backoff_after: int | None
    backoff_min_steps: int
    backoff_max_steps: int
    _states: dict[Hashable, BackoffState] = field(default_factory=dict, init=False, repr=False)

    def should_propose(self, seq_id: Hashable) -> bool:
        """Whether ``seq_id`` may carry drafts into its next step; called once per step the sequence ran
        (a paused sequence counts its pause down here)."""
        state = self._states.get(seq_id)
        if state is None or state.pause_left == 0:
            return True
        state.pause_left -= 1
        return False

    def record(self, seq_id: Hashable, num_draft_tokens: int, num_accepted: int) -> None:
        """The outcome of one verification step of ``seq_id`` (``num_accepted`` of ``num_draft_tokens``)."""
        if self.backoff_after is None or num_draft_tokens == 0:
            return
        if num_accepted > 0:
            self._states.pop(seq_id, None)
            return
        state = self._states.setdefault(seq_id, BackoffState())
        state.misses += 1
        if state.misses >= self.backoff_after:  # stays at or above: after a pause one miss is enough
            state.pause = min(2 * state.pause, self.backoff_max_steps) if state.pause else self.backoff_min_steps
            state.pause_left = state.pause

    def is_paused(self, seq_id: Hashable) -> bool:
        """Whether ``seq_id`` is in a pause now."""
        state = self._states.get(seq_id)
        return state is not None and state.pause_left > 0

    def forget(self, seq_ids: Iterable[Hashable]) -> None:
        """Drop the records of finished sequences."""
        for seq_id in seq_ids:
            self._states.pop(seq_id, None)

    def __len__(self) -> int:
        """Sequences with a record (misses or a pause)."""
        return len(self._states)
