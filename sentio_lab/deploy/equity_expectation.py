"""What a paper account's equity is expected to be: the backtest-parity curve and a band from the out-of-sample
evaluation, both from the account's first bar (equity 1.0 there, as the ledger starts it).

* :func:`parity_expectation`: the greedy backtest of the account's own checkpoint on the account's own feed
  (:func:`sentio_lab.evaluation.episodes.evaluate_policy` over the feed's bars from the account's first bar, the
  call ``tests/deploy/test_ledger_paper.py`` proves the paper ledger equals to 1e-9). A gap between the two is a
  deployment bug (fills, costs, features), not a market event.
* :func:`oos_band`: where the model's own out-of-sample evaluation says the equity should lie. The declared
  choice: at horizon ``h`` bars after the account opened, the ``quantiles`` (default 5 % and 95 %) of
  ``equity[s + h] / equity[s]`` over every start ``s`` of every out-of-sample equity path (CPCV paths x seeds of
  the experiment behind the model's verdict, :func:`sentio_lab.deploy.drift.oos_equity_paths`). Overlapping
  windows keep the paths' volatility clustering and drawdown shape, which a Gaussian band from the mean and
  variance would lose. The band ends where fewer than ``min_windows`` windows of that length exist (a quantile of
  a handful of values is not a band); nothing is extrapolated past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sentio_lab.agents.variants import action_masking, env_options, load_trained, load_variant
from sentio_lab.deploy.drift import oos_equity_paths
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.experiment.assembly import RESULTS_FILE

#: The band's default quantiles (5 % and 95 %).
QUANTILES: tuple[float, float] = (0.05, 0.95)
#: Fewest windows of one length behind a band point.
MIN_WINDOWS = 20


def parity_expectation(checkpoint: str | Path, feed: str | Path, first_bar: int) -> pd.Series:
    """The equity the backtest of ``checkpoint`` on ``feed`` expects at every bar from ``first_bar`` (1.0 there)
    to the feed's last bar, indexed by bar position in the feed (the ledger's ``bar``).

    A ``ValueError`` when the backtest cannot start at ``first_bar`` (a bar before the model's first complete
    observation: the ledger and the feed disagree)."""
    trained = load_trained(checkpoint, dataset=feed)
    variant = load_variant(trained.bundle["variant"])
    bars = len(trained.market.data.frame)
    if not 0 <= first_bar < bars - 1:
        raise ValueError(f"the account opens at bar {first_bar}, but {feed} has {bars} bars")
    result = evaluate_policy(trained.agent, trained.market, window=trained.args.features.window,
                             positions=tuple(trained.args.env.positions), costs=variant.cost_model(trained.args),
                             bars=(first_bar, bars), env_options=env_options(trained.args, trained.market),
                             **action_masking(trained.args))
    if result.start != first_bar:
        raise ValueError(f"the account opens at bar {first_bar}, but the model's first complete observation on "
                         f"{feed} is bar {result.start}; is this the feed the account traded?")
    return pd.Series(result.equity.to_numpy(), index=pd.RangeIndex(first_bar, first_bar + len(result.equity),
                                                                   name="bar"), name="expected")


@dataclass(frozen=True)
class EquityBand:
    """Quantiles of the out-of-sample equity ratio after ``h`` bars, ``h = 0 .. horizon`` (module doc)."""

    lower: np.ndarray
    """The lower quantile at each horizon (1.0 at ``h = 0``)."""
    upper: np.ndarray
    """The upper quantile at each horizon."""
    windows: np.ndarray
    """How many windows of each length the quantiles read (``h = 0``: the number of paths)."""
    quantiles: tuple[float, float]
    paths: int
    """Out-of-sample paths behind the band."""
    complete: bool
    """True when the band reaches the horizon it was asked for; False when the paths ran short first."""

    @property
    def horizon(self) -> int:
        """The longest horizon the band covers, in bars."""
        return len(self.lower) - 1

    def from_bar(self, first_bar: int) -> pd.DataFrame:
        """The band placed on the ledger's bars: columns ``lower`` and ``upper`` indexed by ``first_bar + h``."""
        index = pd.RangeIndex(first_bar, first_bar + len(self.lower), name="bar")
        return pd.DataFrame({"lower": self.lower, "upper": self.upper}, index=index)


def oos_band(paths: Sequence[pd.Series | np.ndarray], horizon: int, *, quantiles: tuple[float, float] = QUANTILES,
             min_windows: int = MIN_WINDOWS) -> EquityBand:
    """The band of equity ratios over ``0 .. horizon`` bars from the out-of-sample equity ``paths`` (module doc)."""
    low, high = quantiles
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"band quantiles must satisfy 0 < lower < upper < 1, got {quantiles}")
    if horizon < 0:
        raise ValueError(f"horizon must be >= 0 bars, got {horizon}")
    logs = []
    for i, path in enumerate(paths):
        equity = np.asarray(path, dtype=np.float64)
        if equity.ndim != 1 or not np.all(np.isfinite(equity)) or np.any(equity <= 0):
            raise ValueError(f"out-of-sample path {i}: equity must be a 1-D series of finite positive values")
        logs.append(np.log(equity))
    if not logs:
        raise ValueError("no out-of-sample paths: the band needs the evaluation's equity paths")
    lower, upper, counts = [1.0], [1.0], [len(logs)]
    for h in range(1, horizon + 1):
        ratios = [log[h:] - log[:-h] for log in logs if len(log) > h]
        count = sum(len(r) for r in ratios)
        if count < min_windows:
            break
        q = np.quantile(np.exp(np.concatenate(ratios)), [low, high])
        lower.append(float(q[0]))
        upper.append(float(q[1]))
        counts.append(count)
    return EquityBand(lower=np.asarray(lower), upper=np.asarray(upper), windows=np.asarray(counts),
                      quantiles=(low, high), paths=len(logs), complete=len(lower) == horizon + 1)


def experiment_paths(folder: str | Path, name: str | None = None) -> tuple[list[pd.Series], str]:
    """The out-of-sample equity paths of configuration ``name`` of an experiment folder and the configuration's name
    (``name`` None: the folder's only agent configuration; several are refused, naming them)."""
    folder = Path(folder)
    if name is None:
        results = folder / RESULTS_FILE
        if not results.is_file():
            raise FileNotFoundError(f"{folder}: no {RESULTS_FILE}; is it an experiment's output folder?")
        frame = pd.read_parquet(results, columns=["kind", "name"])
        agents = list(dict.fromkeys(frame.loc[frame["kind"] == "agent", "name"]))
        if len(agents) != 1:
            raise ValueError(f"{folder}: {len(agents)} agent configurations {agents}; name one (--oos-name)")
        name = agents[0]
    return oos_equity_paths(folder, name), name


__all__ = ["MIN_WINDOWS", "QUANTILES", "EquityBand", "experiment_paths", "oos_band", "parity_expectation"]
