"""Baseline policies that trade through the agents' own env, fills, costs and position set.

Every baseline is a *policy over bars*: ``act(t)`` takes the env's current bar index per env (a long tensor,
batched) and returns one level index of the env's position set per env, exactly what an agent's
``act_greedy(obs)`` returns. :func:`run_policy` steps a :class:`~sentio_lab.env.TradingEnv` the way
:func:`sentio_lab.evaluation.episodes.evaluate_policy` does (one deterministic episode per env from the range's first
observable bar, ``reset(starts=...)``, ``ruin_fraction=0``) and returns the same
:class:`~sentio_lab.evaluation.episodes.Evaluation`, so every row of a comparison has the same accounting. Baselines
read
prices, not the normalised observation: :class:`PriceHistory` holds the closes (and bar times) they need.

Causality: the desired weight at bar ``t`` is a function of closes ``<= t`` (and of bar times ``<= t``); it is
filled at the next open like any action. Until a signal is defined (too little history) the baseline is flat,
and :attr:`WeightPolicy.first_defined` says from which bar it is not.

The baselines (their weight rules are :mod:`sentio_lab.env.benchmarks`, re-exported here):

* ``buy_and_hold``: weight 1.
* ``sma_crossover``: long-flat, 1 while the 50-bar mean of closes is above the 200-bar mean, else 0.
* ``momentum``: time-series momentum, the sign of the return from 12 months ago to 1 month ago (Moskowitz,
  Ooi and Pedersen, 2012): +1 / -1, or long-flat with ``long_only=True``. Months are calendar months on the
  bar times (the last bar at or before ``ts_t - 12 months``); without times, ``bars_per_month`` bars.
* ``vol_target``: buy-and-hold scaled to the training range's volatility,
  ``clip(train_vol / forecast_vol_t, 0, max_level)``, with ``forecast_vol_t`` the EWMA (RiskMetrics,
  lambda 0.94) root mean square of log returns up to ``t`` and ``train_vol`` the root mean square of the
  training segments' log returns.
* ``random``: a uniformly random level per bar, one generator per seed, reported as the mean over seeds
  (:func:`evaluate_random`).

A desired weight maps to the nearest level of the position set (ties towards flat). A baseline that wants
long (or short) exposure on a set without a long (short) level raises instead of silently going flat.

What is ours and why: the signals are a few lines of numpy / pandas each; vectorbt's indicator factories
would add a second accounting, and the point is that the env does all the accounting. The runner is a batched
twin of ``evaluate_policy``, which feeds observations, while baselines need the bar index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from sentio_lab.env import _MIN_EQUITY as _EQUITY_FLOOR
from sentio_lab.env import TradingEnv, check_positions
from sentio_lab.env.anchor import AnchorConfig
from sentio_lab.env.benchmarks import (  # the rules live in the env stage (anchors read them); re-exported here
    BASELINES,
    Baseline,
    BuyAndHold,
    PriceHistory,
    Segment,
    SmaCrossover,
    TimeSeriesMomentum,
    VolTarget,
    anchor_config,
    benchmark_span,
    benchmark_weights,
    make_baseline,
    on_levels,
    trailing_mean,
)
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.episodes import Evaluation

__all__ = [
    "BASELINES", "Baseline", "BuyAndHold", "PriceHistory", "Segment", "SmaCrossover", "TimeSeriesMomentum",
    "VolTarget", "anchor_config", "benchmark_span", "benchmark_weights", "make_baseline", "on_levels",
    "trailing_mean", "nearest_levels", "check_exposures", "Policy", "WeightPolicy", "RandomPolicy", "run_policy",
    "evaluate_baseline", "ZeroTiltPolicy", "evaluate_anchor_benchmark", "RandomEvaluation", "evaluate_random",
]


# ============================================================================================== policies
def nearest_levels(weights: np.ndarray, positions: Sequence[float]) -> np.ndarray:
    """Index of the nearest level of ``positions`` for each weight (ties towards the smaller |level|)."""
    levels = check_positions(positions)
    order = np.argsort(np.abs(levels), kind="stable")  # argmin keeps the first of equal distances
    distance = np.abs(levels[order][None, :] - np.asarray(weights, dtype=np.float64)[:, None])
    return order[np.argmin(distance, axis=1)]


def check_exposures(name: str, exposures: Sequence[float], positions: Sequence[float]) -> None:
    """Raise if the position set has no level on a side (long / short) that ``name`` asks for."""
    levels = check_positions(positions)
    for want in exposures:
        if want > 0 and not (levels > 0).any():
            raise ValueError(f"{name} wants long exposure but positions {tuple(positions)} have no long level")
        if want < 0 and not (levels < 0).any():
            hint = " (use long_only=True for the long-flat variant)" if name == "momentum" else ""
            raise ValueError(f"{name} wants short exposure but positions {tuple(positions)} have no short level{hint}")


class Policy(Protocol):
    """What :func:`run_policy` steps: a level index per env from the env's bar index per env."""

    def act(self, t: torch.Tensor) -> torch.Tensor:
        """Level indices (long, one per env) for the bars ``t`` (long, one per env)."""
        ...


class WeightPolicy:
    """A deterministic baseline bound to one market and position set: ``act(t)`` is a table lookup."""

    def __init__(self, baseline: Baseline, history: PriceHistory, positions: Sequence[float],
                 device: str | torch.device = "cpu") -> None:
        """Compute the baseline's weights once (causal per bar) and map them to level indices."""
        check_exposures(baseline.name, baseline.exposures, positions)
        self.baseline = baseline
        self.weights = baseline.weights(history)
        if self.weights.shape != history.close.shape:
            raise ValueError(f"{baseline.name}: {self.weights.shape} weights for {history.close.shape} bars")
        defined = ~np.isnan(self.weights)
        # First bar with a defined signal; the policy is flat before it.
        self.first_defined = int(np.argmax(defined)) if defined.any() else len(defined)
        self.levels = nearest_levels(np.where(defined, self.weights, 0.0), positions)
        self._table = torch.as_tensor(self.levels, dtype=torch.long, device=device)

    def act(self, t: torch.Tensor) -> torch.Tensor:
        """The level index chosen at each bar ``t``."""
        return self._table.index_select(0, t.to(self._table.device))


class RandomPolicy:
    """Env ``i`` draws a uniformly random level per step from its own generator, seeded ``seeds[i]``."""

    def __init__(self, seeds: Sequence[int], num_levels: int, device: str | torch.device = "cpu") -> None:
        """One CPU generator per seed, so a seed's path does not depend on which other seeds run beside it."""
        if len(seeds) == 0 or len(set(seeds)) != len(seeds):
            raise ValueError(f"random: seeds must be distinct and non-empty, got {tuple(seeds)}")
        self.seeds, self.num_levels, self.device = tuple(seeds), num_levels, torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in self.seeds]

    def act(self, t: torch.Tensor) -> torch.Tensor:
        """One draw per env (``t`` only sets the batch size)."""
        if len(t) != len(self.generators):
            raise ValueError(f"random: {len(t)} envs for {len(self.generators)} seeds")
        draws = [torch.randint(0, self.num_levels, (1,), generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)


# ================================================================================================ runner
def run_policy(
    policy: Policy,
    market: PreparedMarket,
    *,
    window: int,
    positions: Sequence[float],
    costs: CostModel,
    range_name: str = "test",
    bars: Segment | None = None,
    num_envs: int = 1,
    device: str | torch.device = "cpu",
    anchor: AnchorConfig | None = None,
) -> list[Evaluation]:
    """One deterministic episode per env over the range (``bars`` overrides the named one), as
    :func:`sentio_lab.evaluation.episodes.evaluate_policy` runs an agent: same env, start, length, fills, costs and
    ruin. With ``anchor`` the env is anchored (the policy's actions are tilts) and the weights recorded are the ones
    it filled."""
    start, stop = market.range(range_name) if bars is None else bars
    first = max(start, market.arrays.first_valid + window - 1)
    length = stop - 1 - first
    env = TradingEnv(market.arrays, num_envs=num_envs, window=window, episode_length=length, start=start, stop=stop,
                     positions=positions, costs=costs, ruin_fraction=0.0, device=device, anchor=anchor)
    env.reset(starts=[first] * num_envs)
    chosen = np.empty((num_envs, length), dtype=np.int64)
    filled = np.empty((num_envs, length))
    equity = np.empty((num_envs, length + 1))
    equity[:, 0] = 1.0
    steps = np.full(num_envs, length)
    alive = np.ones(num_envs, dtype=bool)
    with torch.no_grad():
        for k in range(length):
            action = policy.act(env.t)
            chosen[:, k] = action.cpu().numpy()
            _, _, terminated, _, info = env.step(action)
            equity[:, k + 1] = info["equity"].cpu().numpy()
            if anchor is not None:
                filled[:, k] = info["weight"].cpu().numpy()
            ruined = terminated.cpu().numpy() & alive  # ruin: the rest of the range is not tradable
            steps[ruined], alive = k + 1, alive & ~ruined
            if not alive.any():
                break
    levels = np.asarray(positions, dtype=np.float64)
    index = market.data.frame.index
    out = []
    for i in range(num_envs):
        n = int(steps[i])
        curve = equity[i, : n + 1].copy()
        if not alive[i]:
            curve[-1] = max(curve[-1], _EQUITY_FLOOR)
        out.append(Evaluation(
            range_name=range_name if bars is None else f"bars[{start}:{stop})", start=first,
            weights=pd.Series(levels[chosen[i, :n]] if anchor is None else filled[i, :n],
                              index=index[first : first + n], name="weight"),
            equity=pd.Series(curve, index=index[first : first + n + 1], name="equity"),
            costs=costs, ruined=not alive[i], fill_price=market.arrays.fill_price,
        ))
    return out


def evaluate_baseline(
    baseline: Baseline | str,
    market: PreparedMarket,
    *,
    window: int,
    positions: Sequence[float],
    costs: CostModel,
    range_name: str = "test",
    bars: Segment | None = None,
    train: Sequence[Segment] | None = None,
) -> Evaluation:
    """Run a deterministic baseline (an instance or a :data:`BASELINES` name) over the range through the env."""
    baseline = make_baseline(baseline)
    policy = WeightPolicy(baseline, PriceHistory.from_market(market, train), positions)
    (evaluation,) = run_policy(policy, market, window=window, positions=positions, costs=costs,
                               range_name=range_name, bars=bars)
    return evaluation


class ZeroTiltPolicy:
    """The anchored benchmark as a policy: the zero tilt at every bar, in an env anchored to it."""

    def __init__(self, anchor: AnchorConfig) -> None:
        """Bound to ``anchor``'s tilts."""
        self.action = anchor.zero_action

    def act(self, t: torch.Tensor) -> torch.Tensor:
        """The zero tilt's index for every env."""
        return torch.full_like(t, self.action)


def evaluate_anchor_benchmark(
    baseline: Baseline | str,
    market: PreparedMarket,
    *,
    window: int,
    positions: Sequence[float],
    costs: CostModel,
    range_name: str = "test",
    bars: Segment | None = None,
    train: Sequence[Segment] | None = None,
) -> Evaluation:
    """The benchmark an anchored agent tilts around, as it trades in the anchored env: the zero tilt over the range.

    Its weights are the rule's own, clipped to the position range (:func:`~sentio_lab.env.benchmarks.anchor_config`),
    not rounded to levels: where the rule's weights are levels (:func:`~sentio_lab.env.benchmarks.on_levels`) this
    is :func:`evaluate_baseline` bit for bit; for ``vol_target`` it is the unrounded volatility target, the benchmark
    an anchored agent's excess return is measured against."""
    anchor = anchor_config(baseline, market, train=train)
    (evaluation,) = run_policy(ZeroTiltPolicy(anchor), market, window=window, positions=positions, costs=costs,
                               range_name=range_name, bars=bars, anchor=anchor)
    return evaluation


@dataclass
class RandomEvaluation:
    """The random baseline over several seeds: one evaluation per seed and their mean."""

    seeds: tuple[int, ...]
    evaluations: list[Evaluation]
    mean_equity: pd.Series
    """Mean of the seeds' equity curves (the account of 1/n in each seed); a ruined seed stays at its floor."""

    def mean_over_seeds(self, statistic: Callable[[Evaluation], float]) -> float:
        """Mean of ``statistic`` (e.g. a Sharpe ratio of the equity) over the seeds."""
        return float(np.mean([statistic(e) for e in self.evaluations]))


def evaluate_random(
    market: PreparedMarket,
    seeds: Sequence[int],
    *,
    window: int,
    positions: Sequence[float],
    costs: CostModel,
    range_name: str = "test",
    bars: Segment | None = None,
) -> RandomEvaluation:
    """Run the random policy for every seed at once (one env per seed) and report the mean over seeds."""
    policy = RandomPolicy(seeds, len(check_positions(positions)))
    evaluations = run_policy(policy, market, window=window, positions=positions, costs=costs,
                             range_name=range_name, bars=bars, num_envs=len(seeds))
    full = max((e.equity.index for e in evaluations), key=len)
    mean = pd.concat([e.equity.reindex(full).ffill() for e in evaluations], axis=1).mean(axis=1)
    return RandomEvaluation(seeds=tuple(seeds), evaluations=evaluations, mean_equity=mean.rename("equity"))
