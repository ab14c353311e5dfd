"""The configuration of gated online learning (:class:`OnlineConfig`) and its promotion gate (:func:`judge`).

The gate compares a candidate's per-bar returns with an incumbent's on the same bars (the refresh loop,
:mod:`sentio_lab.deploy.online`, runs it for a fine-tuned challenger against the champion and for a rollback):

* the paired stationary-bootstrap Sharpe A/B test (:func:`sentio_lab.evaluation.inference.sharpe_difference_test`)
  must find the candidate better: difference > 0 and two-sided p < ``ab_alpha``;
* the deflated Sharpe ratio of the excess returns (candidate minus incumbent), deflated over every trial so far,
  must be above ``min_dsr``;
* Hansen's SPA test must not find the incumbent better (reverse p >= ``spa_alpha``).

Under the null the A/B condition passes with probability about ``ab_alpha / 2``; :func:`null_pass_rate` measures
the whole gate's false-positive rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sentio_lab.evaluation.inference import SharpeDifference, sharpe_difference_test, spa_agent_vs_baselines
from sentio_lab.evaluation.metrics import deflated_sharpe_ratio, probabilistic_sharpe_ratio, sharpe_ratio


@dataclass(frozen=True)
class OnlineConfig:
    """How often and on what a refresh fine-tunes, and the gate a challenger must pass."""

    every_bars: int = 63
    """a refresh every this many new bars (K)"""
    window_bars: int = 252
    """the rolling window the challenger fine-tunes on (W bars before the evaluation bars)"""
    eval_bars: int = 63
    """the most recent bars both models are evaluated on (E; neither trained on them)"""
    finetune_steps: int = 4096
    """env steps of fine-tuning (rounded up to whole PPO iterations of the champion's batch size)"""
    ab_alpha: float = 0.05
    """the A/B test's two-sided p-value must be below this, with the challenger's Sharpe the higher"""
    min_dsr: float = 0.5
    """the DSR of the excess returns over the champion, deflated over every trial so far, must be above this"""
    spa_alpha: float = 0.05
    """the reverse SPA test must not find the champion better at this level"""
    alert_cooldown_bars: int = 21
    """a drift alert triggers a refresh once this many bars have passed since the last one"""
    reps: int = 1000
    """bootstrap replicates of the A/B and SPA tests"""
    seed: int = 0
    """seed of the bootstraps"""
    rollback: bool = True
    """judge a champion promoted here against its predecessor before each refresh"""

    def __post_init__(self) -> None:
        for name in ("every_bars", "window_bars", "eval_bars", "finetune_steps", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_bars < 12:
            raise ValueError(f"--eval-bars {self.eval_bars}: the bootstrap needs at least 12 bars")


# ------------------------------------------------------------------------------------------ the gate
@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on a candidate against an incumbent over the same bars."""

    ab: SharpeDifference | None
    """The paired Sharpe A/B test (candidate minus incumbent; None when a series does not vary)."""
    excess_sharpe: float
    """Per-bar Sharpe ratio of the candidate's returns minus the incumbent's (this trial's entry)."""
    dsr: float
    """DSR of those excess returns, deflated over ``n_trials``."""
    n_trials: int
    spa_p_value: float
    """SPA p-value of "the incumbent is at least as good" (small: the candidate is better)."""
    spa_reverse_p_value: float
    """SPA p-value of "the candidate is at least as good" (small: the incumbent is better)."""
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when no condition failed."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the A/B test flattened)."""
        found = {k: v for k, v in dataclasses.asdict(self).items() if k != "ab"}
        found["ab"] = None if self.ab is None else dataclasses.asdict(self.ab)
        found["passed"] = self.passed
        return found


def judge(candidate: pd.Series, incumbent: pd.Series, trial_sharpes: Sequence[float],
          config: OnlineConfig) -> GateDecision:
    """The gate (module doc) on per-bar returns of ``candidate`` and ``incumbent`` over the same bars.

    ``trial_sharpes``: the excess Sharpe ratios of the trials before this one; with this one they set ``N`` and
    ``Var[SR_n]`` of the DSR. With fewer than two finite trial Sharpe ratios there is no spread to deflate by and
    the DSR is PSR(0) of the excess returns.
    """
    if not candidate.index.equals(incumbent.index):
        raise ValueError("judge: candidate and incumbent returns are not on the same bars")
    excess = candidate - incumbent
    excess_sharpe = sharpe_ratio(excess)
    trials = [*(math.nan if s is None else float(s) for s in trial_sharpes), excess_sharpe]
    finite = [s for s in trials if np.isfinite(s)]
    if not np.isfinite(excess_sharpe):
        dsr = math.nan  # identical returns: nothing to promote
    elif len(finite) >= 2:
        dsr = deflated_sharpe_ratio(excess, n_trials=len(trials), sr_variance=float(np.var(finite, ddof=1)))
    else:
        dsr = probabilistic_sharpe_ratio(excess, 0.0)
    failures = []
    ab = None
    try:
        ab = sharpe_difference_test(candidate, incumbent, reps=config.reps, seed=config.seed)
    except ValueError as err:
        failures.append(f"A/B: {err}")
    if ab is not None and not (ab.difference > 0 and ab.p_value < config.ab_alpha):
        failures.append(f"A/B: Sharpe difference {ab.difference:+.4f} per bar, p = {ab.p_value:.3f} (needs > 0 and "
                        f"p < {config.ab_alpha})")
    if not dsr > config.min_dsr:
        failures.append(f"DSR {dsr:.3f} of the excess returns over {len(trials)} trial(s) is not above "
                        f"{config.min_dsr}")
    spa_p = spa_reverse = math.nan
    if np.isfinite(excess_sharpe):
        spa = spa_agent_vs_baselines(candidate.rename("candidate"), incumbent.to_frame("incumbent"),
                                     reps=config.reps, seed=config.seed)
        spa_p, spa_reverse = float(spa.consistent), float(spa.reverse["candidate"].consistent)
    if not np.isfinite(spa_reverse):
        failures.append("SPA: not run (the excess returns do not vary)")
    elif spa_reverse < config.spa_alpha:
        failures.append(f"SPA: the incumbent is better (reverse SPA p = {spa_reverse:.3f} < {config.spa_alpha})")
    return GateDecision(ab=ab, excess_sharpe=excess_sharpe, dsr=float(dsr), n_trials=len(trials), spa_p_value=spa_p,
                        spa_reverse_p_value=spa_reverse, failures=tuple(failures))


def null_pass_rate(config: OnlineConfig, *, draws: int = 200, sharpe: float = 0.05, correlation: float = 0.5,
                   seed: int = 0, edge: float = 0.0) -> float:
    """Share of ``draws`` null comparisons the gate passes: candidate and incumbent returns over ``eval_bars``
    bars with the same per-bar Sharpe ratio ``sharpe`` (Gaussian, correlated ``correlation``, as a fine-tuned
    model's returns are with its parent's), trials accumulating as in the loop. The measured false-positive
    rate of the gate per refresh; ``edge`` adds that much per-bar Sharpe to the candidate (its power)."""
    rng = np.random.default_rng(seed)
    index = pd.RangeIndex(config.eval_bars)
    trials: list[float] = []
    passed = 0
    for _ in range(draws):
        common, own = rng.standard_normal((2, config.eval_bars))
        other = correlation * common + math.sqrt(1.0 - correlation**2) * own
        a = pd.Series(0.01 * (sharpe + edge + common), index=index)
        b = pd.Series(0.01 * (sharpe + other), index=index)
        decision = judge(a, b, trials, config)
        trials.append(decision.excess_sharpe)
        passed += decision.passed
    return passed / draws
