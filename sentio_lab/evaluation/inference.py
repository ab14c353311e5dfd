"""Statistical inference across strategies: is a result better than luck, than the search, than the baselines?

Descriptive statistics of one curve live in :mod:`sentio_lab.evaluation.metrics`; this module compares several.

Conventions
-----------
* Inputs are per-period returns (simple or log, as long as every series uses the same kind), one row per bar.
  Several configurations / strategies "on the same bars" come as a ``T x N`` DataFrame (or a mapping of
  equally indexed Series); paired tests refuse series whose indexes differ.
* Sharpe ratios are ``mean / std`` (``ddof=1``) **per period** unless a ``periods`` argument annualises them
  (times ``sqrt(periods)``), as in :func:`sentio_lab.evaluation.metrics.sharpe_ratio`.
* Every bootstrap is arch's stationary bootstrap (Politis and Romano, 1994), seeded (``seed``), with its
  mean block length from :func:`arch.bootstrap.optimal_block_length` (Politis and White, 2004, with Patton,
  Politis and White's correction) unless ``block_size`` is given: the largest "stationary" estimate over the
  series resampled together, rounded up (longer blocks keep more of the serial dependence).

What is arch's and what is ours: the resampling (:class:`arch.bootstrap.StationaryBootstrap`), the block
length estimate and Hansen's SPA test (:class:`arch.bootstrap.SPA`) are arch's. PSR / DSR are
:mod:`sentio_lab.evaluation.metrics`. Ours: PBO by CSCV, the percentile interval and p-value of the paired Sharpe
difference, the loss framing of the SPA calls and the handling of models identical to the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
import pandas as pd
from arch.bootstrap import SPA, StationaryBootstrap, optimal_block_length
from scipy.stats import rankdata

from sentio_lab.evaluation import metrics

ReturnsLike = pd.Series | np.ndarray | Sequence[float]
MatrixLike = pd.DataFrame | np.ndarray | Mapping[str, ReturnsLike]
#: A half's standard deviation at or below this counts as riskless in CSCV (Sharpe +-inf, or 0 for a flat half).
_RISKLESS_STD = 1e-12


# ------------------------------------------------------------------------------------------- helpers
def _matrix(returns: MatrixLike, what: str, min_columns: int = 1) -> pd.DataFrame:
    """A finite float64 ``T x N`` frame with string column names; raise naming ``what`` otherwise."""
    if isinstance(returns, Mapping):
        series = {str(k): metrics._as_series(v, f"{what}[{k!r}]") for k, v in returns.items()}
        indexes = [s.index for s in series.values()]
        if any(not idx.equals(indexes[0]) for idx in indexes[1:]):
            raise ValueError(f"{what}: the series must share one index (the same bars); align them first")
        frame = pd.DataFrame(series)
    elif isinstance(returns, pd.DataFrame):
        frame = returns.astype(np.float64)
        frame.columns = [str(c) for c in frame.columns]
    else:
        array = np.asarray(returns, dtype=np.float64)
        if array.ndim != 2:
            raise ValueError(f"{what}: expected a T x N matrix, got shape {array.shape}")
        frame = pd.DataFrame(array, columns=[str(i) for i in range(array.shape[1])])
    if frame.shape[1] < min_columns:
        raise ValueError(f"{what}: need at least {min_columns} columns, got {frame.shape[1]}")
    if frame.columns.duplicated().any():
        raise ValueError(f"{what}: duplicate column names {sorted(set(frame.columns[frame.columns.duplicated()]))}")
    if not np.isfinite(frame.to_numpy()).all():
        raise ValueError(f"{what}: NaN or inf values; every configuration needs a return on every bar")
    return frame


def _paired(a: ReturnsLike, b: ReturnsLike) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = metrics._as_series(a, "a"), metrics._as_series(b, "b")
    if len(sa) != len(sb) or (isinstance(a, pd.Series) and isinstance(b, pd.Series) and not sa.index.equals(sb.index)):
        raise ValueError("a and b must be returns on the same bars (same length, and the same index for Series)")
    if len(sa) < 10:
        raise ValueError(f"need at least 10 paired returns for a bootstrap, got {len(sa)}")
    return sa.to_numpy(), sb.to_numpy()


def block_length(*series: np.ndarray | pd.Series | pd.DataFrame) -> int:
    """Mean block length for a stationary bootstrap of ``series`` resampled together.

    The largest of arch's :func:`~arch.bootstrap.optimal_block_length` "stationary" estimates over the
    columns, rounded up, at least 1.
    """
    columns = np.column_stack([np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in series])
    estimates = optimal_block_length(columns)["stationary"].to_numpy()
    finite = estimates[np.isfinite(estimates)]
    return max(1, math.ceil(float(finite.max()))) if len(finite) else 1


def _check_reps(reps: int) -> int:
    if isinstance(reps, bool) or int(reps) != reps or reps < 100:
        raise ValueError(f"reps must be an integer >= 100, got {reps}")
    return int(reps)


# ------------------------------------------------------------------------------------- PSR and DSR
@dataclass(frozen=True)
class BenchmarkPSR:
    """PSR of a strategy against the best benchmark's per-period Sharpe ratio."""

    psr: float
    """P(true per-period SR > ``sr_benchmark``), :func:`sentio_lab.evaluation.metrics.probabilistic_sharpe_ratio`."""
    sharpe: float
    """The strategy's per-period Sharpe ratio."""
    sr_benchmark: float
    """The highest per-period Sharpe ratio among the benchmarks."""
    benchmark: str
    """Name of that benchmark."""


def psr_against_benchmarks(returns: ReturnsLike, benchmarks: Mapping[str, ReturnsLike] | pd.DataFrame) -> BenchmarkPSR:
    """PSR of ``returns`` with ``SR*`` = the best benchmark's per-period Sharpe ratio (e.g. the best baseline).

    The benchmark's Sharpe ratio is treated as a known number: its own estimation error is ignored, so this
    is optimistic about the benchmark; :func:`sharpe_difference_test` accounts for both on the same bars.
    """
    frame = benchmarks if isinstance(benchmarks, pd.DataFrame) else None
    named = {str(c): frame[c] for c in frame.columns} if frame is not None else dict(benchmarks)
    if not named:
        raise ValueError("psr_against_benchmarks: no benchmarks given")
    sharpes = {name: metrics.sharpe_ratio(values) for name, values in named.items()}
    finite = {name: sr for name, sr in sharpes.items() if np.isfinite(sr)}
    if not finite:
        raise ValueError(f"psr_against_benchmarks: no benchmark has a defined Sharpe ratio ({list(sharpes)})")
    best = max(finite, key=finite.__getitem__)
    return BenchmarkPSR(
        psr=metrics.probabilistic_sharpe_ratio(returns, finite[best]),
        sharpe=metrics.sharpe_ratio(returns),
        sr_benchmark=finite[best],
        benchmark=best,
    )


@dataclass(frozen=True)
class TrialsDSR:
    """Deflated Sharpe ratio of the selected configuration of a search."""

    dsr: float
    """PSR at ``sr0``: P(true SR > the SR the best of ``n_trials`` unskilled trials is expected to reach)."""
    selected: str
    sharpe: float
    """Per-period Sharpe ratio of the selected configuration."""
    sr0: float
    """Expected maximum per-period Sharpe ratio of ``n_trials`` trials with variance ``sr_variance``."""
    n_trials: int
    sr_variance: float
    """Sample variance (``ddof=1``) of the configurations' per-period Sharpe ratios."""


def deflated_sharpe_of_trials(
    trials: MatrixLike, selected: str | None = None, n_trials: int | None = None
) -> TrialsDSR:
    """DSR of the ``selected`` column (default: the highest Sharpe) of a search over configurations.

    ``trials`` holds the per-period returns of every configuration the runner tried (columns; a mapping of
    Series of different lengths is fine here). ``Var[SR_n]`` is the sample variance of their per-period Sharpe
    ratios and ``N`` their count, or ``n_trials`` when more were tried than are given (it may not be less).
    """
    if isinstance(trials, Mapping):
        columns = {str(k): metrics._as_series(v, f"trials[{k!r}]") for k, v in trials.items()}
    else:
        frame = _matrix(trials, "trials")
        columns = {c: frame[c] for c in frame.columns}
    sharpes = {name: metrics.sharpe_ratio(values) for name, values in columns.items()}
    if len(sharpes) < 2 or not np.isfinite(list(sharpes.values())).all():
        raise ValueError(f"deflated_sharpe_of_trials: need >= 2 configurations with finite Sharpe ratios: {sharpes}")
    n = len(sharpes) if n_trials is None else int(n_trials)
    if n < len(sharpes):
        raise ValueError(f"n_trials={n_trials} is fewer than the {len(sharpes)} configurations given")
    chosen = max(sharpes, key=sharpes.__getitem__) if selected is None else str(selected)
    if chosen not in columns:
        raise ValueError(f"selected {selected!r} is not among the configurations {list(columns)}")
    variance = float(np.var(list(sharpes.values()), ddof=1))
    return TrialsDSR(
        dsr=metrics.deflated_sharpe_ratio(columns[chosen], n_trials=n, sr_variance=variance),
        selected=chosen,
        sharpe=sharpes[chosen],
        sr0=metrics.expected_max_sharpe(n, variance),
        n_trials=n,
        sr_variance=variance,
    )


# ------------------------------------------------------------------------------------------ PBO, CSCV
@dataclass(frozen=True)
class PBOResult:
    """Probability of backtest overfitting by CSCV, with the distribution it comes from (one entry per split)."""

    pbo: float
    """Share of the splits whose in-sample best configuration has a logit <= 0 out of sample."""
    logits: np.ndarray
    """``lambda = log(w / (1 - w))`` per split."""
    relative_ranks: np.ndarray
    """``w = rank / (N + 1)``: the out-of-sample rank (1 = worst, N = best) of the in-sample choice."""
    chosen: np.ndarray
    """Column position of the in-sample best configuration per split."""
    is_performance: np.ndarray
    """In-sample statistic of the chosen configuration per split."""
    oos_performance: np.ndarray
    """Its out-of-sample statistic per split (a degradation plot is ``oos_performance`` against ``is_performance``)."""
    names: tuple[str, ...]
    n_blocks: int


def _half_statistic(sums: np.ndarray, centred_sq: np.ndarray, shift: np.ndarray, n: np.ndarray, statistic: str):
    """Per-split statistic of each column from block sums: (C x N) ``mean`` or per-period ``sharpe``."""
    mean = sums / n[:, None]
    if statistic == "mean":
        return mean
    # variance from sums of (x - shift), the column's overall mean: no cancellation for small-mean returns
    dev = mean - shift
    var = np.maximum(centred_sq - n[:, None] * dev**2, 0.0) / (n[:, None] - 1)
    std = np.sqrt(var)
    riskless = std <= _RISKLESS_STD
    with np.errstate(divide="ignore", invalid="ignore"):
        sharpe = np.where(riskless, np.sign(mean) * np.inf, mean / std)
    return np.where(riskless & (mean == 0), 0.0, sharpe)


def probability_of_backtest_overfitting(
    returns: MatrixLike,
    n_blocks: int = 16,
    statistic: Literal["sharpe", "mean"] | Callable[[np.ndarray], np.ndarray] = "sharpe",
) -> PBOResult:
    """PBO by combinatorially symmetric cross-validation (Bailey, Borwein, Lopez de Prado and Zhu, 2015).

    ``returns`` is ``T x N``: per-period returns of ``N`` configurations on the same ``T`` bars (or, with
    ``statistic="mean"``, any per-row performance such as one value per path). The rows are split, in order,
    into ``n_blocks`` (``S``, even) contiguous blocks (``numpy.array_split``: sizes differ by at most one row).
    For each of the ``C(S, S/2)`` ways of taking ``S/2`` blocks as the in-sample half (the rest, its
    complement, out of sample):

    1. the configuration with the best in-sample statistic is chosen (the first column on a tie);
    2. its out-of-sample rank among the ``N`` is taken, ascending (1 = worst, ``N`` = best; ties share their
       average rank), and ``w = rank / (N + 1)``;
    3. ``lambda = log(w / (1 - w))``: positive when the choice lands above the out-of-sample median.

    ``PBO`` is the share of splits with ``lambda <= 0``. With an odd ``N`` a choice exactly at the median
    (``lambda = 0``) counts as overfit, so pure noise gives ``(N + 1) / (2 N)`` rather than 1/2.

    ``statistic``: ``"sharpe"`` (per-period ``mean / std``, ``ddof=1``, of the half's rows; a half with a
    standard deviation below 1e-12 is riskless: +-inf, or 0 when its mean is 0), ``"mean"``, or a callable
    taking a ``rows x N`` array and returning ``N`` values (slower: called twice per split).
    """
    frame = _matrix(returns, "returns", min_columns=2)
    if isinstance(n_blocks, bool) or int(n_blocks) != n_blocks or n_blocks < 2 or n_blocks % 2:
        raise ValueError(f"n_blocks must be an even integer >= 2, got {n_blocks}")
    n_blocks = int(n_blocks)
    values = frame.to_numpy()
    t, n_configs = values.shape
    if t < 2 * n_blocks:
        raise ValueError(f"need at least 2 rows per block: {t} rows for {n_blocks} blocks")
    splits = np.array_split(np.arange(t), n_blocks)
    in_sample = np.zeros((math.comb(n_blocks, n_blocks // 2), n_blocks), dtype=bool)
    for row, chosen_blocks in enumerate(combinations(range(n_blocks), n_blocks // 2)):
        in_sample[row, list(chosen_blocks)] = True
    if callable(statistic):
        is_stat, oos_stat = (
            np.array([np.asarray(statistic(values[np.concatenate([splits[b] for b in np.flatnonzero(m)])]),
                                 dtype=np.float64) for m in masks])
            for masks in (in_sample, ~in_sample)
        )
    elif statistic in ("sharpe", "mean"):
        shift = values.mean(axis=0)
        sums = np.array([values[rows].sum(axis=0) for rows in splits])
        centred_sq = np.array([((values[rows] - shift) ** 2).sum(axis=0) for rows in splits])
        sizes = np.array([len(rows) for rows in splits], dtype=np.float64)
        is_stat, oos_stat = (
            _half_statistic(m @ sums, m @ centred_sq, shift, m @ sizes, statistic)
            for m in (in_sample.astype(np.float64), (~in_sample).astype(np.float64))
        )
    else:
        raise ValueError(f"statistic must be 'sharpe', 'mean' or a callable, got {statistic!r}")
    if is_stat.shape != (len(in_sample), n_configs) or np.isnan(is_stat).any() or np.isnan(oos_stat).any():
        raise ValueError("statistic: expected one non-NaN value per configuration in every half")
    chosen = np.argmax(is_stat, axis=1)
    ranks = rankdata(oos_stat, method="average", axis=1)[np.arange(len(chosen)), chosen]
    w = ranks / (n_configs + 1.0)
    logits = np.log(w / (1.0 - w))
    rows = np.arange(len(chosen))
    return PBOResult(
        pbo=float(np.mean(logits <= 0)),
        logits=logits,
        relative_ranks=w,
        chosen=chosen,
        is_performance=is_stat[rows, chosen],
        oos_performance=oos_stat[rows, chosen],
        names=tuple(frame.columns),
        n_blocks=n_blocks,
    )


# ------------------------------------------------------------------------------------------ A/B test
@dataclass(frozen=True)
class SharpeDifference:
    """Paired bootstrap comparison of two configurations' Sharpe ratios on the same bars."""

    difference: float
    """``SR(a) - SR(b)``, per period or annualised by ``periods``."""
    ci_low: float
    ci_high: float
    p_value: float
    """Two-sided bootstrap p-value of H0: equal Sharpe ratios."""
    sharpe_a: float
    sharpe_b: float
    confidence: float
    block_size: int
    reps: int
    periods: float


def sharpe_difference_test(
    a: ReturnsLike,
    b: ReturnsLike,
    *,
    periods: float = 1.0,
    reps: int = 2000,
    block_size: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> SharpeDifference:
    """A/B test of two configurations on the same paths: stationary bootstrap of the Sharpe ratio difference.

    The pairs ``(a[t], b[t])`` are resampled together in blocks (arch's :class:`StationaryBootstrap`, mean
    block length ``block_size`` or :func:`block_length` of both series), which keeps their correlation and
    serial dependence. Per replicate ``d* = SR(a*) - SR(b*)`` (times ``sqrt(periods)``; per period by default;
    the p-value does not depend on the scaling).

    * Interval: percentile interval of the ``d*`` (what arch's ``conf_int(method="percentile")`` gives).
    * p-value, two-sided: the centred replicates ``d* - d`` stand for the null distribution of ``d``,
      ``p = (1 + #{|d* - d| >= |d|}) / (1 + reps)``. Identical inputs give ``d = 0``, ``p = 1``.

    Replicates with an undefined Sharpe ratio (a resample with no variation) are dropped; ``reps`` reports
    how many were used.
    """
    x, y = _paired(a, b)
    if np.std(x) == 0 or np.std(y) == 0:
        raise ValueError("sharpe_difference_test: a configuration's returns do not vary (Sharpe undefined)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scale = math.sqrt(metrics._positive_periods(periods))
    size = block_length(x, y) if block_size is None else int(block_size)
    if size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    def difference(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.array([(u.mean() / u.std(ddof=1) - v.mean() / v.std(ddof=1)) * scale])

    observed = float(difference(x, y)[0])
    draws = StationaryBootstrap(size, x, y, seed=seed).apply(difference, _check_reps(reps))[:, 0]
    draws = draws[np.isfinite(draws)]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    extreme = np.abs(draws - observed) >= abs(observed) - 1e-15 * max(1.0, abs(observed))
    return SharpeDifference(
        difference=observed,
        ci_low=float(low),
        ci_high=float(high),
        p_value=float((1 + extreme.sum()) / (1 + len(draws))),
        sharpe_a=metrics.sharpe_ratio(x, periods),
        sharpe_b=metrics.sharpe_ratio(y, periods),
        confidence=confidence,
        block_size=size,
        reps=len(draws),
        periods=float(periods),
    )


# ------------------------------------------------------------------------------------------------ SPA
@dataclass(frozen=True)
class SPAResult:
    """Hansen's SPA p-values for H0: no model has a higher mean return than the benchmark."""

    consistent: float
    lower: float
    upper: float
    benchmark: str
    models: tuple[str, ...]
    """Models tested (those identical to the benchmark are in ``excluded`` instead)."""
    excluded: tuple[str, ...]
    """Models whose returns equal the benchmark's on every bar (no evidence either way; left out)."""
    block_size: int
    reps: int


def spa_test(
    benchmark: ReturnsLike,
    models: MatrixLike,
    *,
    benchmark_name: str = "benchmark",
    reps: int = 1000,
    block_size: int | None = None,
    seed: int = 0,
    studentize: bool = True,
) -> SPAResult:
    """Hansen's (2005) test of superior predictive ability: does any model beat the benchmark, after snooping?

    arch's :class:`~arch.bootstrap.SPA` on **losses = -returns**: the benchmark's losses are ``-benchmark``,
    the models' ``-models``, so the loss differential is ``model return - benchmark return`` and a small
    p-value says at least one model has a higher *mean per-period return* than the benchmark (for a
    risk-adjusted comparison pass returns scaled to a common volatility). ``consistent`` is Hansen's
    recommended p-value, ``lower`` / ``upper`` bracket it (``upper`` is White's reality check).

    A model equal to the benchmark on every bar has a zero differential, which arch's studentisation cannot
    handle (0 / 0 would make its p-value spuriously 0): such models are left out (``excluded``), and with
    none left every p-value is 1. The stationary bootstrap uses ``block_size`` or :func:`block_length` of
    the differentials, ``reps`` replicates and ``seed``.
    """
    bench = metrics._as_series(benchmark, "benchmark").to_numpy()
    frame = _matrix(models, "models")
    if len(frame) != len(bench):
        raise ValueError(f"benchmark has {len(bench)} returns, models {len(frame)}: they must share the bars")
    diffs = frame.to_numpy() - bench[:, None]
    identical = np.all(diffs == 0, axis=0)
    kept = [name for name, same in zip(frame.columns, identical, strict=True) if not same]
    excluded = tuple(name for name, same in zip(frame.columns, identical, strict=True) if same)
    reps = _check_reps(reps)
    if not kept:
        return SPAResult(1.0, 1.0, 1.0, benchmark_name, (), excluded, 0 if block_size is None else int(block_size),
                         reps)
    size = block_length(diffs[:, ~identical]) if block_size is None else int(block_size)
    spa = SPA(-bench, -frame[kept].to_numpy(), block_size=size, reps=reps, studentize=studentize, seed=seed)
    spa.compute()
    p = spa.pvalues
    return SPAResult(float(p["consistent"]), float(p["lower"]), float(p["upper"]), benchmark_name, tuple(kept),
                     excluded, size, reps)


@dataclass(frozen=True)
class AgentVsBaselines:
    """Both directions of the SPA comparison of agents with baselines."""

    consistent: float
    """p-value of H0 "the agent does not beat the best baseline": the largest per-baseline p-value."""
    lower: float
    upper: float
    per_baseline: dict[str, SPAResult]
    """SPA with each baseline as the benchmark and the agents as the models."""
    reverse: dict[str, SPAResult]
    """Per agent: SPA with the agent as the benchmark and the baselines as models (small p: a baseline beats it)."""


def spa_agent_vs_baselines(
    agents: ReturnsLike | MatrixLike,
    baselines: MatrixLike,
    *,
    reps: int = 1000,
    block_size: int | None = None,
    seed: int = 0,
    studentize: bool = True,
) -> AgentVsBaselines:
    """Is the agent better than the best baseline? Hansen's SPA, framed so that a small p-value says yes.

    SPA asks whether any *model* beats one *benchmark*. "The agent beats the best baseline" means it beats
    every baseline, so each baseline is made the benchmark in turn, with the agent(s) as the models
    (:func:`spa_test`, losses = -returns, mean returns compared). The hypothesis "some baseline is at least
    as good as the agent" is the union of the per-baseline nulls; rejecting it needs every one rejected, so
    its p-value is the **largest** per-baseline p-value (an intersection-union test: no multiplicity
    correction is needed, and none is made). With several agents, SPA corrects for the choice among them
    per baseline, but the agent doing the beating may differ from one baseline to the next.

    ``reverse`` gives the other direction per agent (agent as benchmark, baselines as models): a small
    p-value there says some baseline beats the agent; a large one is not evidence that the agent is better.
    All calls share ``seed`` (common random numbers).
    """
    if isinstance(agents, pd.Series) or (not isinstance(agents, Mapping | pd.DataFrame)
                                         and np.asarray(agents).ndim == 1):
        name = str(agents.name) if isinstance(agents, pd.Series) and agents.name is not None else "agent"
        agents = {name: agents}
    agent_frame = _matrix(agents, "agents")
    baseline_frame = _matrix(baselines, "baselines")
    if len(agent_frame) != len(baseline_frame):
        raise ValueError(f"agents have {len(agent_frame)} returns, baselines {len(baseline_frame)}: not the same bars")
    options = {"reps": reps, "block_size": block_size, "seed": seed, "studentize": studentize}
    per_baseline = {
        name: spa_test(baseline_frame[name].to_numpy(), agent_frame, benchmark_name=name, **options)
        for name in baseline_frame.columns
    }
    reverse = {
        name: spa_test(agent_frame[name].to_numpy(), baseline_frame, benchmark_name=name, **options)
        for name in agent_frame.columns
    }
    return AgentVsBaselines(
        consistent=max(r.consistent for r in per_baseline.values()),
        lower=max(r.lower for r in per_baseline.values()),
        upper=max(r.upper for r in per_baseline.values()),
        per_baseline=per_baseline,
        reverse=reverse,
    )
