"""Memory-fragmentation study: allocators, replay accounting, traces, sharing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipaged.memsim import (
    FirstFitAllocator,
    PagedStrategy,
    Request,
    SimConfig,
    Trace,
    TraceFormatError,
    load_trace_csv,
    orca_max,
    orca_oracle,
    orca_pow2,
    simulate,
    synthetic_trace,
)
from minipaged.memsim.allocators import AllocatorError, reserve_pow2
from minipaged.memsim.sharing import beam_search_savings, parallel_sampling_savings
from minipaged.memsim.simulate import CATEGORIES
from minipaged.memsim.traces import ALPACA, SHAREGPT, clipped_lognormal_mean


def _trace(*rows: tuple[float, int, int]) -> Trace:
    return Trace("hand", tuple(Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)))


# ---------------------------------------------------------------- first-fit allocator


def test_first_fit_matches_a_bitmap_reference() -> None:
    """Random allocate/free against a slot bitmap that scans for the first free run."""
    rng = np.random.default_rng(7)
    cap = 200
    alloc = FirstFitAllocator(cap)
    bitmap = np.zeros(cap, dtype=bool)
    live: dict[int, tuple[int, int]] = {}
    for handle in range(600):
        if live and rng.random() < 0.45:
            victim = int(rng.choice(list(live)))
            start, size = live.pop(victim)
            alloc.free(victim)
            bitmap[start : start + size] = False
        else:
            size = int(rng.integers(1, 40))
            free_run = np.convolve(~bitmap, np.ones(size, dtype=int), mode="valid") == size
            expected = int(np.argmax(free_run)) if free_run.any() else None
            got = alloc.allocate(handle, size)
            assert got == expected
            if got is not None:
                live[handle] = (got, size)
                bitmap[got : got + size] = True
        # holes are maximal free runs: coalescing left no two adjacent holes
        runs = _free_runs(bitmap)
        assert [(h.start, h.size) for h in alloc.holes()] == runs
        assert alloc.free_slots == int((~bitmap).sum())


def _free_runs(bitmap: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, used in enumerate([*bitmap, True]):
        if not used and start is None:
            start = i
        elif used and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_first_fit_rejects_misuse() -> None:
    alloc = FirstFitAllocator(8)
    alloc.allocate("a", 4)
    with pytest.raises(AllocatorError, match="already"):
        alloc.allocate("a", 1)
    alloc.free("a")
    with pytest.raises(AllocatorError, match="double free"):
        alloc.free("a")
    with pytest.raises(ValueError, match="size"):
        alloc.allocate("b", 0)
    with pytest.raises(ValueError, match="capacity"):
        FirstFitAllocator(0)


# ---------------------------------------------------------------- replay accounting


def test_first_fit_external_fragmentation_hand_trace() -> None:
    """Budget 10, Orca-Oracle (reserve prompt+output), one step per second.

    t=0  A(2+1) -> [0,3), B(1+3) -> [3,7), C(2+1) -> [7,10); D(4+1) needs 5, nothing free.
    t=1  A and C finish: holes [0,3) and [7,10), 6 free, largest 3 < 5 -> all 6 external.
    t=2  B grows to 3 tokens; D still blocked by the holes -> 6 external.
    t=3  B finishes, the holes coalesce into [0,10); D is admitted into [0,5).
    t=4  D finishes.
    """
    trace = _trace((0.0, 2, 1), (0.0, 1, 3), (0.0, 2, 1), (0.0, 4, 1))
    res = simulate(trace, orca_oracle(10), SimConfig(budget=10, step_time=1.0))
    s = res.series
    assert s.token_states.tolist() == [5, 2, 3, 4, 0]
    assert s.reservation.tolist() == [5, 2, 1, 1, 0]
    assert s.internal.tolist() == [0, 0, 0, 0, 0]
    assert s.external.tolist() == [0, 6, 6, 0, 0]
    assert s.free.tolist() == [0, 0, 0, 5, 10]
    assert s.waiting.tolist() == [1, 1, 1, 0, 0]
    assert res.breakdown()["external"] == pytest.approx(12 / 50)
    assert (res.completed, res.delayed, res.rejected, res.preemptions) == (4, 1, 0, 0)

    # Pages of one slot reserve nothing ahead: all four prompts (9 slots) fit at t=0,
    # tokens are placed in whatever slots are free and nobody waits.
    paged = simulate(trace, PagedStrategy(10, 1), SimConfig(budget=10, step_time=1.0))
    assert paged.series.external.sum() == 0
    assert paged.series.waiting.max() == 0
    assert (paged.completed, paged.delayed, paged.preemptions) == (4, 0, 0)


def test_paged_internal_fragmentation_matches_arithmetic() -> None:
    """With memory to spare everyone runs from t=0; the block manager's waste must equal
    sum(ceil(len / bs) * bs - len) over the live sequences at every step."""
    rng = np.random.default_rng(3)
    bs, budget = 8, 8 * 400
    rows = [(0.0, int(p), int(o)) for p, o in zip(rng.integers(1, 40, 12), rng.integers(1, 30, 12))]
    res = simulate(_trace(*rows), PagedStrategy(budget, bs), SimConfig(budget=budget, step_time=1.0))
    steps = max(o for _, _, o in rows) + 1
    lens = [[p + s for _, p, o in rows if s < o] for s in range(steps)]
    expected_tokens = [sum(ls) for ls in lens]
    expected_internal = [sum(math.ceil(n / bs) * bs - n for n in ls) for ls in lens]
    assert res.series.token_states.tolist() == expected_tokens
    assert res.series.internal.tolist() == expected_internal
    util = [t / (t + i) if t else 1.0 for t, i in zip(expected_tokens, expected_internal)]
    np.testing.assert_allclose(res.series.utilization(), util)
    assert res.series.reservation.sum() == 0 and res.series.external.sum() == 0


def test_breakdown_partitions_the_budget_and_all_requests_finish() -> None:
    trace = synthetic_trace("sharegpt", 60, 20.0, seed=11)
    budget = 4096
    for strategy in (orca_max(budget), orca_pow2(budget), orca_oracle(budget), PagedStrategy(budget, 16)):
        res = simulate(trace, strategy, SimConfig(budget=budget))
        s = res.series
        total = sum(getattr(s, c) for c in CATEGORIES)
        assert (total == budget).all(), strategy.name
        assert min(getattr(s, c).min() for c in CATEGORIES) >= 0
        assert res.completed + res.rejected == len(trace)
        assert sum(res.breakdown().values()) == pytest.approx(1.0)
        if strategy.preempts is False:
            assert res.preemptions == 0


def test_requests_that_never_fit_are_rejected() -> None:
    trace = _trace((0.0, 10, 10), (0.0, 2, 2))
    res = simulate(trace, orca_oracle(16), SimConfig(budget=16))
    assert (res.rejected, res.completed) == (1, 1)


def test_pow2_reservation_is_below_twice_the_output() -> None:
    policy = reserve_pow2(max_len=4096)
    for out in range(1, 700):
        r = policy(Request(0, 0.0, 5, out))
        grown = r - 5
        assert grown >= out and grown < 2 * out or grown == out == 1
        assert grown & (grown - 1) == 0


def test_config_and_strategy_validation() -> None:
    with pytest.raises(ValueError, match="budget"):
        SimConfig(budget=0)
    with pytest.raises(ValueError, match="step_time"):
        SimConfig(budget=8, step_time=0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        PagedStrategy(100, 16)
    with pytest.raises(ValueError, match="config.budget"):
        simulate(_trace((0.0, 1, 1)), orca_oracle(8), SimConfig(budget=16))


# ---------------------------------------------------------------- traces


@pytest.mark.parametrize("workload", [SHAREGPT, ALPACA], ids=lambda w: w.name)
def test_seeded_traces_hit_the_paper_means(workload) -> None:
    rate = 5.0
    trace = synthetic_trace(workload, 8000, rate, seed=1)
    assert trace.input_lens().mean() == pytest.approx(workload.input.mean, rel=0.05)
    assert trace.output_lens().mean() == pytest.approx(workload.output.mean, rel=0.05)
    gaps = np.diff(trace.arrivals())
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert (trace.input_lens() + trace.output_lens()).max() <= 2048
    again = synthetic_trace(workload, 8000, rate, seed=1)
    assert again == trace
    assert synthetic_trace(workload, 8000, rate, seed=2) != trace


def test_clipped_lognormal_mean_matches_sampling() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(4.0, 1.2, size=400_000)
    assert clipped_lognormal_mean(4.0, 1.2, 1.0, 500.0) == pytest.approx(np.clip(x, 1, 500).mean(), rel=5e-3)


def test_trace_validation() -> None:
    with pytest.raises(ValueError, match="workload"):
        synthetic_trace("nope", 10, 1.0, seed=0)
    with pytest.raises(ValueError, match="request_rate"):
        synthetic_trace("alpaca", 10, 0.0, seed=0)
    with pytest.raises(ValueError, match="num_requests"):
        synthetic_trace("alpaca", 0, 1.0, seed=0)


def test_csv_roundtrip_sorts_by_arrival(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival,input_len,output_len,note\n2.5,10,3,x\n0.5,4,7,y\n")
    trace = load_trace_csv(path)
    assert [(r.arrival, r.input_len, r.output_len) for r in trace.requests] == [(0.5, 4, 7), (2.5, 10, 3)]
    assert trace.name == "t"


@pytest.mark.parametrize(
    "text, match",
    [
        ("arrival,input_len\n0,1\n", r"missing column\(s\) \['output_len'\]"),
        ("arrival,input_len,output_len\n0,abc,3\n", r":2: column 'input_len': cannot parse 'abc'"),
        ("arrival,input_len,output_len\n0,4,3\n1,4,0\n", r":3: column 'output_len'.*>= 1"),
        ("arrival,input_len,output_len\n-1,4,3\n", r"column 'arrival'.*>= 0"),
        ("arrival,input_len,output_len\nnan,4,3\n", r"column 'arrival'.*finite"),
        ("arrival,input_len,output_len\n0,4.5,3\n", r"column 'input_len': cannot parse '4.5'"),
        ("arrival,input_len,output_len\n", "no requests"),
    ],
)
def test_csv_errors_name_line_and_column(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceFormatError, match=match):
        load_trace_csv(path)


def test_csv_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_trace_csv(tmp_path / "nope.csv")


# ---------------------------------------------------------------- sharing


def _no_reselection_blocks(p: int, outs: list[int], bs: int) -> tuple[int, int]:
    """Block-steps when all sequences fork off the prompt once and never again.

    The prompt's full blocks are shared; everything from the first partial block on is
    per sequence (copy-on-write gives each its own copy of a partial prompt block).
    """
    shared_full = p // bs
    shared = unshared = 0
    for t in range(1, max(outs) + 1):
        alive = [p + t for o in outs if t <= o]
        shared += shared_full + sum(math.ceil(n / bs) - shared_full for n in alive)
        unshared += sum(math.ceil(n / bs) for n in alive)
    return shared, unshared


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_beam_without_pruning_shares_exactly_the_prompt(bs: int) -> None:
    trace = _trace((0.0, 13, 9), (0.0, 32, 5))
    res = beam_search_savings(trace, 3, block_size=bs, prune_prob=0.0)
    expected = [_no_reselection_blocks(r.input_len, [r.output_len] * 3, bs) for r in trace.requests]
    assert res.shared_block_steps == sum(e[0] for e in expected)
    assert res.unshared_block_steps == sum(e[1] for e in expected)


def test_parallel_sampling_shares_exactly_the_prompt() -> None:
    trace = _trace((0.0, 21, 6))  # a one-request pool: every sample has the same length
    res = parallel_sampling_savings(trace, 4, block_size=8)
    shared, unshared = _no_reselection_blocks(21, [6] * 4, 8)
    assert (res.shared_block_steps, res.unshared_block_steps) == (shared, unshared)
    assert res.copies == 3 * 1  # three of the four samples copy the partial prompt block once


def test_sharing_savings_grow_with_width_and_vanish_at_one() -> None:
    trace = synthetic_trace("alpaca", 20, 10.0, seed=4)
    assert parallel_sampling_savings(trace, 1).saving == 0.0
    assert beam_search_savings(trace, 1).saving == 0.0
    par = [parallel_sampling_savings(trace, n, seed=0).saving for n in (2, 4, 6)]
    beam = [beam_search_savings(trace, k, seed=0).saving for k in (2, 4, 6)]
    assert 0 < par[0] < par[1] < par[2] < 1
    assert 0 < beam[0] < beam[1] < beam[2] < 1
    # forking a random survivor shares whole histories, far more than a common prompt
    assert all(b > p for b, p in zip(beam, par))


def test_idle_gaps_carry_no_samples() -> None:
    trace = _trace((0.0, 1, 1), (10.0, 1, 1))
    res = simulate(trace, orca_oracle(4), SimConfig(budget=4, step_time=1.0))
    assert res.series.time.tolist() == [0.0, 1.0, 10.0, 11.0]
    assert res.idle_time == 8.0 and res.makespan == 12.0
    assert res.series.token_states.tolist() == [1, 0, 1, 0]


def test_paged_hand_trace_internal_fragmentation() -> None:
    """Blocks of 4 slots. R1 has 5 prompt + 2 output tokens, R2 3 + 3.

    t=0  R1 5 tokens in 2 blocks (3 empty), R2 3 in 1 block (1 empty) -> internal 4
    t=1  R1 6 (2 empty), R2 4 (0 empty)                               -> internal 2
    t=2  R1 reaches 7 and finishes; R2 5 tokens in 2 blocks (3 empty) -> internal 3
    t=3  R2 reaches 6 and finishes                                    -> internal 0
    """
    res = simulate(_trace((0.0, 5, 2), (0.0, 3, 3)), PagedStrategy(32, 4), SimConfig(budget=32, step_time=1.0))
    assert res.series.token_states.tolist() == [8, 10, 5, 0]
    assert res.series.internal.tolist() == [4, 2, 3, 0]
    assert res.series.free.tolist() == [20, 20, 24, 32]
    np.testing.assert_allclose(res.series.utilization(), [8 / 12, 10 / 12, 5 / 8, 1.0])


def test_paged_watermark_rejects_requests_that_could_not_come_back() -> None:
    # 8 blocks of 4, 2 kept free at admission: 6 blocks = 24 tokens is the most a request may reach
    trace = _trace((0.0, 10, 14), (0.0, 10, 15))
    res = simulate(trace, PagedStrategy(32, 4, watermark_blocks=2), SimConfig(budget=32, step_time=1.0))
    assert (res.completed, res.rejected) == (1, 1)


def test_a_strategy_that_never_admits_is_reported_not_looped() -> None:
    class Stuck:
        name, budget, preempts = "stuck", 8, False

        def fits_ever(self, req):
            return True

        def try_admit(self, seq_id, req, num_tokens):
            return False

    with pytest.raises(RuntimeError, match="request 0 cannot be admitted"):
        simulate(_trace((0.0, 1, 1)), Stuck(), SimConfig(budget=8))


def test_paged_preempts_the_newest_request_and_readmits_it_with_its_tokens() -> None:
    """8 one-slot blocks; R1 and R2 both 3 prompt + 3 output tokens.

    t=0  both admitted: 6 slots used.        t=1  both grow to 4: memory full.
    t=2  R1 needs a slot: R2 (newest) is preempted with its 4 tokens; R1 grows to 5;
         R2 needs 4 slots, 3 are free -> waits.
    t=3  R1 reaches 6 and finishes; R2 is readmitted holding its 4 tokens.
    t=4  R2 has 5.                           t=5  R2 reaches 6 and finishes.
    """
    res = simulate(_trace((0.0, 3, 3), (0.0, 3, 3)), PagedStrategy(8, 1), SimConfig(budget=8, step_time=1.0))
    assert res.series.token_states.tolist() == [6, 8, 5, 4, 5, 0]
    assert res.series.waiting.tolist() == [0, 0, 1, 0, 0, 0]
    assert res.series.running.tolist() == [2, 2, 1, 1, 1, 0]
    assert (res.preemptions, res.completed, res.delayed) == (1, 2, 0)
