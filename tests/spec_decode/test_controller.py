"""The back-off controller alone: when it pauses a sequence, for how long, and what clears its record."""

from __future__ import annotations

from minipaged.spec_decode.controller import DraftController


def drafting_steps(controller: DraftController, outcomes: list[bool], seq_id="s") -> list[int]:
    """Steps (0, 1, ...) at which the sequence carries drafts; ``outcomes[i]`` says whether its
    i-th verification accepted something."""
    steps, verifications = [], iter(outcomes)
    for step in range(200):
        if controller.should_propose(seq_id):
            accepted = next(verifications, None)
            if accepted is None:
                break
            steps.append(step)
            controller.record(seq_id, 3, 1 if accepted else 0)
    return steps


def test_misses_pause_then_probe_with_doubling_pauses():
    c = DraftController(backoff_after=2, backoff_min_steps=2, backoff_max_steps=8)
    # miss, miss -> pause 2; probe misses -> pause 4; -> 8; -> 8 (the cap)
    assert drafting_steps(c, [False] * 6) == [0, 1, 4, 9, 18, 27]


def test_an_accepted_draft_clears_the_record():
    c = DraftController(backoff_after=2, backoff_min_steps=2, backoff_max_steps=8)
    # miss miss (pause 2), probe accepts: back to every step; two new misses pause for the minimum again
    assert drafting_steps(c, [False, False, True, True, False, False, True]) == [0, 1, 4, 5, 6, 7, 10]
    assert len(c) == 0  # an acceptance leaves no record


def test_none_never_pauses_and_empty_drafts_do_not_count():
    c = DraftController(backoff_after=None, backoff_min_steps=1, backoff_max_steps=1)
    assert drafting_steps(c, [False] * 5) == [0, 1, 2, 3, 4]
    c = DraftController(backoff_after=1, backoff_min_steps=1, backoff_max_steps=1)
    for _ in range(5):
        c.record("s", 0, 0)  # no drafts verified (no match, or dropped by the scheduler)
    assert not c.is_paused("s") and len(c) == 0


def test_sequences_are_independent_and_forgotten():
    c = DraftController(backoff_after=1, backoff_min_steps=3, backoff_max_steps=3)
    c.record("a", 2, 0)
    assert c.is_paused("a") and not c.is_paused("b")
    c.forget(["a"])
    assert not c.is_paused("a") and len(c) == 0
