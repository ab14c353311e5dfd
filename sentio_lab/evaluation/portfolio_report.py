"""What a portfolio experiment adds to the report: where the return came from, asset by asset, what each asset
cost in trading, and how concentrated the book was.

One greedy (or rule-based) episode through a :class:`~sentio_lab.env.portfolio.PortfolioEnv` is recorded step by
step by :func:`record_episode` into a :class:`PortfolioEpisode`; the report's figures are functions of it:

* **Per-asset contribution** (:func:`step_contributions`). Over step k (decision at bar t, fill on bar t+1 at
  ``fill`` = its open or close, mark at its close) asset i earns ``s_i (fill_i - close_i,t) + s'_i (close_i,t+1 -
  fill_i)`` with ``s`` its shares before the fill and ``s'`` after; dividing by the equity at bar t gives its
  contribution to the step's simple return. The env's identity ``E_{t+1} = E_t + sum_i PnL_i - cost`` (cash earns
  nothing; a long-short book's borrow counts as cost) makes ``sum_i contribution_i - cost / E_t`` the step's simple
  return exactly. Over an episode (and a stitched path) the contributions are summed in units of the starting equity
  (:func:`episode_contributions`): they add up, with the costs, to the total return.
* **Turnover per asset**: the notional traded in asset i over the equity at the fill prices (the env's ``turnover``
  is its sum over the assets), annualised by the bars per year.
* **Concentration**: the effective number of assets ``1 / sum_i w_i^2`` of the invested weights (the asset weights
  held at a bar's close, rescaled to sum to 1; cash left out and reported beside it as the mean cash weight),
  averaged over the bars at which something is invested (:func:`effective_number_of_assets`). Equal weights over A
  assets give A, a single asset 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sentio_lab.env.portfolio import PortfolioEnv

#: ``decide(k, t, obs) -> (targets, hold)``: long-only target weights ``(A + 1,)`` (cash last) decided at bar t (step
#: k of the episode, observation ``obs``) and whether the account holds its shares this step instead.
Decide = Callable[[int, int, torch.Tensor], tuple[np.ndarray, bool]]
#: Largest residual of a step's P&L identity, relative to its starting equity, that :func:`record_episode` accepts.
_IDENTITY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PortfolioEpisode:
    """One recorded episode of ``L`` steps from bar ``start`` (module doc)."""

    start: int
    """Bar of the first decision (the episode starts all in cash, equity 1, at its close)."""
    equity: np.ndarray
    """float64 (L + 1,): equity at the closes of bars ``start .. start + L`` (1.0 first)."""
    contribution: np.ndarray
    """float64 (L, A): each asset's share of each step's simple return (before costs)."""
    cost: np.ndarray
    """float64 (L,): each step's fees and price concessions (and a short book's borrow) over the equity at its
    decision bar."""
    turnover: np.ndarray
    """float64 (L, A): notional traded in each asset over the equity at the fill prices."""
    weights: np.ndarray
    """float64 (L, A + 1): the weights held at the closes of bars ``start + 1 .. start + L`` (cash last)."""

    @property
    def returns(self) -> np.ndarray:
        """float64 (L,): simple returns of the equity."""
        return self.equity[1:] / self.equity[:-1] - 1.0


def step_contributions(shares_before: np.ndarray, shares_after: np.ndarray, close_before: np.ndarray,
                       fill: np.ndarray, close_after: np.ndarray, equity_before: np.ndarray) -> np.ndarray:
    """Each asset's P&L over one step as a share of the equity at the decision bar (module doc), ``(..., A)``."""
    pnl = shares_before * (fill - close_before) + shares_after * (close_after - fill)
    return pnl / np.asarray(equity_before)[..., None]


def record_episode(env: PortfolioEnv, decide: Decide, start: int, steps: int) -> PortfolioEpisode:
    """Run ``decide`` through the one-account ``env`` for ``steps`` steps from bar ``start``.

    ``decide`` returns what the env steps on: long-only target weights ``(A + 1,)``, long-short signed weights
    ``(A,)``, or an anchored env's tilt. A long-short book may pay borrow on its shorts (``costs.borrow_bps``), which
    the env charges to cash outside ``info["cost"]``: the step's ``cost`` is the env's fees plus that borrow,
    computed as the env charges it (:func:`borrow_paid`). Every step is then checked against the P&L identity
    ``E_{t+1} = E_t + sum_i PnL_i - cost``: a residual above ``1e-9`` of ``E_t`` raises, naming the step (the
    contributions or the borrow do not account for the env's equity).
    """
    if env.num_envs != 1:
        raise ValueError("record_episode: build the env with num_envs=1")
    if steps > env.episode_length:
        raise ValueError(f"record_episode: steps={steps} exceeds the env's episode_length {env.episode_length}")
    obs = env.reset(starts=[start])
    fill, close = env.arrays.fill, env.arrays.close
    n_assets = env.num_assets
    equity = np.ones(steps + 1)
    contribution, turnover = np.zeros((steps, n_assets)), np.zeros((steps, n_assets))
    cost, weights = np.zeros(steps), np.zeros((steps, n_assets + 1))
    for k in range(steps):
        t = int(env.t[0])
        shares_before = env.shares[0].cpu().numpy().copy()
        cash_before = float(env.cash[0])
        targets, hold = decide(k, t, obs)
        action = torch.as_tensor(np.asarray(targets, dtype=np.float64)[None, :])
        obs, _, terminated, _, info = env.step(action, hold=torch.tensor([bool(hold)]))
        if bool(terminated[0]):
            raise ValueError(f"record_episode: the account was ruined at bar {t + 1}; a report cannot chain it")
        price = fill[t + 1]
        if bool(info["done"][0]):  # the env has reset the account: the filled shares from the targets
            shares_after = _filled_shares(info, price, cash_before, shares_before, bool(hold))
        else:
            shares_after = env.shares[0].cpu().numpy()
        equity[k + 1] = float(info["equity"][0])
        contribution[k] = step_contributions(shares_before, shares_after, close[t], price, close[t + 1],
                                             equity[k])
        paid = float(info["cost"][0]) + borrow_paid(env, shares_before, shares_after, t)
        residual = equity[k] + float(contribution[k].sum()) * equity[k] - paid - equity[k + 1]
        if abs(residual) > _IDENTITY_TOLERANCE * equity[k]:
            raise ValueError(f"record_episode: step {k} (decision bar {t}): equity {equity[k + 1]!r} differs from "
                             f"equity + contributions - costs by {residual:.3g}; the P&L identity does not hold")
        cost[k] = paid / equity[k]
        at_price = cash_before + float(shares_before @ price)
        turnover[k] = np.abs(shares_after - shares_before) * price / at_price
        held = shares_after * close[t + 1] / equity[k + 1]
        weights[k] = np.r_[held, 1.0 - held.sum()]
    return PortfolioEpisode(start=start, equity=equity, contribution=contribution, cost=cost, turnover=turnover,
                            weights=weights)


def borrow_paid(env: PortfolioEnv, shares_before: np.ndarray, shares_after: np.ndarray, t: int) -> float:
    """The borrow the one-account ``env`` charges over the step decided at bar ``t``, as
    :class:`~sentio_lab.env.portfolio.PortfolioEnv` charges it: the short shares held over bar ``t + 1`` (after the
    fill at its open; with next-close fills, those held before that close's fill) times the env's borrow per share
    of bar ``t + 1``. 0.0 without borrow."""
    per_share = env._borrow_per_share
    if per_share is None:
        return 0.0
    held = shares_before if env._borrow_on_held else shares_after
    return float((np.clip(-np.asarray(held, dtype=np.float64), 0.0, None) * per_share[t + 1].cpu().numpy()).sum())


def _filled_shares(info: dict, price: np.ndarray, cash_before: float, shares_before: np.ndarray,
                   hold: bool) -> np.ndarray:
    """The shares held after an episode's last step (the env has reset the account by then): target weight x the
    post-cost equity at the fill prices / the fill price (the env's sizing rule), or the shares held before."""
    if hold:
        return shares_before
    if "capped" in info and bool(info["capped"].any()):
        raise ValueError("record_episode: a participation cap bound on the episode's last step; its filled shares "
                         "are not the targets' (report with costs without a participation cap)")
    targets = info["weights"][0].cpu().numpy()[: len(price)]
    after_costs = cash_before + float(shares_before @ price) - float(info["cost"][0])
    return targets * after_costs / price


def episode_contributions(episode: PortfolioEpisode) -> tuple[np.ndarray, float]:
    """Per-asset contributions to the episode's total return ``(A,)`` and its costs (as a return, >= 0), in units of
    the starting equity: ``contributions.sum() - costs == equity[-1] / equity[0] - 1``."""
    level = episode.equity[:-1, None] / episode.equity[0]
    return (episode.contribution * level).sum(axis=0), float((episode.cost * level[:, 0]).sum())


def effective_number_of_assets(weights: np.ndarray) -> np.ndarray:
    """``1 / sum_i w_i^2`` of the asset weights (``(..., A + 1)``, cash last) rescaled to the invested part; NaN
    where nothing is invested."""
    assets = np.asarray(weights, dtype=np.float64)[..., :-1]
    invested = assets.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = assets / invested
        out = 1.0 / (share**2).sum(axis=-1)
    return np.where(invested[..., 0] > 1e-12, out, np.nan)


def path_tables(episodes: Sequence[PortfolioEpisode], assets: Sequence[str], periods_per_year: float
                ) -> dict[str, float]:
    """One backtest path (its test groups' episodes in time order, chained as
    :func:`sentio_lab.env.splits.stitch_equity` chains them): per-asset contribution to the path's total return
    (``contrib:<asset>``) and annualised turnover (``turnover:<asset>``), ``costs`` (as a return), the total
    return, the mean effective number of assets and the mean cash weight."""
    out: dict[str, float] = {}
    contribution = np.zeros(len(assets))
    costs, level = 0.0, 1.0
    for episode in episodes:
        parts, paid = episode_contributions(episode)
        contribution += level * parts
        costs += level * paid
        level *= episode.equity[-1] / episode.equity[0]
    turnover = np.concatenate([e.turnover for e in episodes]).mean(axis=0) * periods_per_year
    weights = np.concatenate([e.weights for e in episodes])
    for a, name in enumerate(assets):
        out[f"contrib:{name}"] = float(contribution[a])
    for a, name in enumerate(assets):
        out[f"turnover:{name}"] = float(turnover[a])
    out.update(costs=costs, total_return_check=level - 1.0,
               effective_assets=float(np.nanmean(effective_number_of_assets(weights))),
               cash_weight=float(weights[:, -1].mean()), max_weight=float(weights[:, :-1].max(axis=1).mean()))
    return out


def asset_table(results: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Strategies (rows) x assets (columns): the median over paths x seeds of the ``<prefix>:<asset>`` columns."""
    columns = [c for c in results.columns if c.startswith(f"{prefix}:")]
    table = results.groupby("name", sort=False)[columns].median()
    table.columns = [c.split(":", 1)[1] for c in columns]
    return table


def concentration_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, medians over paths x seeds: effective number of assets, mean cash and largest weight, the
    summed turnover per year, the costs paid (as a return) and the total return."""
    columns = ["effective_assets", "cash_weight", "max_weight", "turnover_per_year", "costs", "total_return"]
    return results.groupby("name", sort=False)[columns].median()
