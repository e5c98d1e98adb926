"""Request traces for the memory simulation: seeded synthetic workloads and CSV loading.

A trace is a list of requests, each with an arrival time (seconds), a prompt length and
the number of tokens it will generate. The synthetic workloads follow the PagedAttention
paper (Kwon et al., SOSP 2023, section 6.1): Poisson arrivals and length distributions
whose means match ShareGPT (input 161.31, output 337.99 tokens) and Alpaca (19.31, 58.45).
The paper only publishes means and histograms, so the shapes here are lognormals clipped
to ``[1, max_len]`` whose location is solved so that the *clipped* mean hits the target.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Request:
    """One request of a trace: it arrives, holds ``input_len`` prompt tokens, generates ``output_len``."""

    req_id: int
    arrival: float
    input_len: int
    output_len: int

    @property
    def total_len(self) -> int:
        """Tokens whose KV the request holds when it finishes (prompt + generated)."""
        return self.input_len + self.output_len


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival time; ``name`` labels plots and tables."""

    name: str
    requests: tuple[Request, ...]

    def __len__(self) -> int:
        return len(self.requests)

    def input_lens(self) -> np.ndarray:
        """int64 [num_requests]"""
        return np.array([r.input_len for r in self.requests], dtype=np.int64)

    def output_lens(self) -> np.ndarray:
        """int64 [num_requests]"""
        return np.array([r.output_len for r in self.requests], dtype=np.int64)

    def arrivals(self) -> np.ndarray:
        """float64 [num_requests], seconds"""
        return np.array([r.arrival for r in self.requests], dtype=np.float64)


@dataclass(frozen=True)
class LengthDistribution:
    """Lognormal token lengths with shape ``sigma``, rounded and clipped to ``[1, max_len]``.

    ``mean`` is the target mean *after* clipping; :meth:`sample` solves the lognormal
    location for it (see :func:`clipped_lognormal_mean`).
    """

    mean: float
    sigma: float
    max_len: int

    def __post_init__(self) -> None:
        if not self.mean >= 1:
            raise ValueError(f"mean must be >= 1 token, got {self.mean}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.max_len < self.mean:
            raise ValueError(f"max_len ({self.max_len}) must be >= mean ({self.mean})")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """int64 [n] lengths in ``[1, max_len]``."""
        mu = _solve_mu(self.mean, self.sigma, self.max_len)
        raw = rng.lognormal(mu, self.sigma, size=n)
        return np.clip(np.rint(raw), 1, self.max_len).astype(np.int64)


@dataclass(frozen=True)
class Workload:
    """A named pair of length distributions (prompt, output)."""

    name: str
    input: LengthDistribution
    output: LengthDistribution


MAX_LEN = 2048  # the maximum sequence length Orca-Max reserves in the paper (OPT's context)

# Paper means (section 6.1); the sigmas are our choice: ShareGPT conversations have a
# long tail, Alpaca instructions are short and narrow.
SHAREGPT = Workload(
    "ShareGPT",
    input=LengthDistribution(161.31, 1.0, MAX_LEN),
    output=LengthDistribution(337.99, 1.0, MAX_LEN),
)
ALPACA = Workload(
    "Alpaca",
    input=LengthDistribution(19.31, 0.6, MAX_LEN),
    output=LengthDistribution(58.45, 0.8, MAX_LEN),
)
WORKLOADS = {w.name.lower(): w for w in (SHAREGPT, ALPACA)}


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(X, lo, hi)] for X ~ LogNormal(mu, sigma), in closed form.

    Uses E[X; a < X < b] = exp(mu + sigma^2/2) * (Phi((ln b - mu - s^2)/s) - Phi((ln a - mu - s^2)/s)).
    """
    s2 = sigma * sigma
    la, lb = math.log(lo), math.log(hi)
    p_lo = _normal_cdf((la - mu) / sigma)
    p_hi = 1.0 - _normal_cdf((lb - mu) / sigma)
    middle = math.exp(mu + s2 / 2) * (_normal_cdf((lb - mu - s2) / sigma) - _normal_cdf((la - mu - s2) / sigma))
    return lo * p_lo + middle + hi * p_hi


def _solve_mu(mean: float, sigma: float, max_len: int) -> float:
    # The clipped mean is increasing in mu, so bisection is enough.
    lo, hi = -10.0, math.log(max_len) + 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if clipped_lognormal_mean(mid, sigma, 1.0, float(max_len)) < mean:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def synthetic_trace(
    workload: Workload | str,
    num_requests: int,
    request_rate: float,
    *,
    seed: int,
    max_len: int = MAX_LEN,
) -> Trace:
    """A seeded trace with Poisson arrivals at ``request_rate`` requests/s.

    Outputs are cut so that ``input_len + output_len <= max_len`` (a request can never
    outgrow the model's context, which is what Orca-Max reserves).
    """
    if isinstance(workload, str):
        try:
            workload = WORKLOADS[workload.lower()]
        except KeyError:
            raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}") from None
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s, got {request_rate}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / request_rate, size=num_requests))
    inputs = np.minimum(workload.input.sample(rng, num_requests), max_len - 1)
    outputs = np.minimum(workload.output.sample(rng, num_requests), max_len - inputs)
    requests = tuple(Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, inputs, outputs)))
    return Trace(f"{workload.name} ({request_rate:g} req/s)", requests)


class TraceFormatError(ValueError):
    """A CSV trace is malformed; the message names the file, line and column."""


_CSV_COLUMNS = ("arrival", "input_len", "output_len")


def load_trace_csv(path: str | Path, *, name: str | None = None) -> Trace:
    """Read a trace from a CSV with header ``arrival,input_len,output_len`` (extra columns ignored).

    ``arrival`` is in seconds (float >= 0), lengths are integers >= 1. Rows may be in
    any order; the trace is sorted by arrival (stable, so ties keep file order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace CSV not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in _CSV_COLUMNS if c not in header]
        if missing:
            raise TraceFormatError(f"{path}: missing column(s) {missing}; header is {header}")
        rows = [_parse_row(path, reader.line_num, row) for row in reader]
    if not rows:
        raise TraceFormatError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    requests = tuple(Request(i, a, p, o) for i, (a, p, o) in enumerate(rows))
    return Trace(name or path.stem, requests)


def _parse_row(path: Path, line: int, row: dict[str, str]) -> tuple[float, int, int]:
    def field(col: str, kind: type, minimum: float) -> float | int:
        text = (row.get(col) or "").strip()
        try:
            value = kind(text)
        except ValueError:
            raise TraceFormatError(f"{path}:{line}: column {col!r}: cannot parse {text!r} as {kind.__name__}") from None
        if not (value >= minimum and math.isfinite(value)):
            raise TraceFormatError(f"{path}:{line}: column {col!r}: {value} must be finite and >= {minimum}")
        return value

    return field("arrival", float, 0.0), field("input_len", int, 1), field("output_len", int, 1)
