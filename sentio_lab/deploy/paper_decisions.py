"""The decisions of paper trading: a checkpoint's greedy policy as a function of the bar history and the account
(:class:`CheckpointDecider`), and the mask state of a masked model's account replayed from the ledger
(:class:`MaskReplay`). :mod:`sentio_lab.deploy.paper` runs them bar by bar; its module doc says which models
are supported and why the others are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.selection import selected_weights
from sentio_lab.agents.training import num_actions
from sentio_lab.agents.variants import action_masking, agent_obs_dim, env_options, load_variant
from sentio_lab.data import MarketData
from sentio_lab.deploy.ledger import Ledger, Mark, Order
from sentio_lab.env import MarketArrays
from sentio_lab.env.anchor import anchored_targets
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket, effective_feature_config
from sentio_lab.env.mask_inputs import market_mask_inputs
from sentio_lab.env.masks import Masker, make_masker
from sentio_lab.features import build_observation_features
from sentio_lab.features.observation import warmup_rows

#: The environment variable of the crash test hook (module doc).


class PaperError(RuntimeError):
    """A paper-trading run that cannot go on: bad feed, unsupported model, a feed that changed under the ledger."""


# ------------------------------------------------------------------------------------------------ decisions
class CheckpointDecider:
    """The greedy policy of a checkpoint as a function of the bar history and the account (module doc).

    :meth:`market` builds the features of a history with the fitted feature state; :meth:`decide` takes that
    market and the account marked at its newest bar and returns the level index the agent picks there, from the
    observation :class:`~sentio_lab.env.TradingEnv` would show (feature window, held level, and the drawdown state
    where the variant observes it)."""

    def __init__(self, path: str | Path) -> None:
        """Load and verify the checkpoint at ``path`` (:func:`~sentio_lab.agents.checkpoint.load_checkpoint`)."""
        self.path = Path(path)
        self.bundle = load_checkpoint(self.path)
        self.variant = load_variant(self.bundle["variant"])
        self.args = self.variant.Args.from_dict(self.bundle["args"])
        self.masking: dict[str, Any] = action_masking(self.args)
        masks = self.masking.get("masks")
        if masks is not None and masks.risk_budget is not None and masks.vol_model == "garch":
            raise PaperError(f"{path}: the GARCH risk budget is not supported by paper trading: its backtest fits the "
                             "GARCH(1,1) on the training range of the bars it runs on, which a feed has not delivered "
                             "yet; train with --vol-model ewma")
        self.anchor: str | None = getattr(self.args.env, "anchor", None)
        """The benchmark an anchored model tilts around (None: unanchored; its actions are then levels)."""
        if self.anchor == "vol_target":
            raise PaperError(f"{path}: the vol_target anchor is not supported by paper trading: its benchmark scales "
                             "by the volatility of the training range of the bars it runs on, which a feed has not "
                             "delivered yet; anchor on buy_and_hold, sma_crossover or momentum")
        if getattr(self.args, "token_timeframes", ()):
            raise PaperError(f"{path}: models with token timeframes are not supported by paper trading (their token "
                             "normaliser is fitted on the training rows of the bars it runs on, rows a feed has not "
                             "delivered yet; a frozen token normaliser in the checkpoint would lift this)")
        self.window = int(self.args.features.window)
        self.positions = tuple(float(p) for p in self.args.env.positions)
        self.costs: CostModel = self.variant.cost_model(self.args)
        self.fill_price: str = self.args.data.fill_price
        self.feature_state: dict = self.bundle["feature_state"]
        self.feature_config = dataclasses.replace(self.variant.feature_config(self.args), cache_dir=None)
        self.agent: torch.nn.Module | None = None
        self._options: dict[str, Any] = {}

    def market(self, frame: pd.DataFrame, name: str) -> PreparedMarket:
        """The history ``frame`` (canonical OHLCV, oldest first) as a market with the model's fitted features.

        It has no ranges: its ``train_segments`` is the whole history, read only by what fits on a training range
        (the GARCH risk budget, the ``vol_target`` anchor, token timeframes), which this decider refuses."""
        data = self._data(frame, name)
        config = effective_feature_config(self.feature_config, data, self.feature_state)
        features = build_observation_features(frame, len(frame), config, state=self.feature_state)
        arrays = MarketArrays.from_frame(frame, features.values, features.first_valid, "quantity", self.fill_price)
        return PreparedMarket(data=data, splits={}, features=features, arrays=arrays, feature_config=config,
                              train_segments=((0, len(frame)),))

    def warmup(self, frame: pd.DataFrame) -> int:
        """The first bar of ``frame`` with a complete observation: the features' warm-up plus the window (a lower
        bound while ``frame`` is shorter than the warm-up)."""
        config = effective_feature_config(self.feature_config, self._data(frame, ""), self.feature_state)
        return warmup_rows(frame, len(frame), config) + self.window - 1

    def _data(self, frame: pd.DataFrame, name: str) -> MarketData:
        return MarketData(frame=frame, name=name, bar_freq=pd.Timedelta(int(self.feature_state["base_freq_ns"])),
                          fingerprint="", session_close=self.feature_state["config"].get("session_close"))

    def _agent(self, market: PreparedMarket) -> torch.nn.Module:
        if self.agent is None:
            options = env_options(self.args, market)
            agent = self.variant.build_agent(self.args, agent_obs_dim(self.args, market), num_actions(self.args))
            agent.load_state_dict(selected_weights(self.bundle))  # the weights load_trained (the backtest) uses
            self.agent = agent.eval()
            self._options = options
        return self.agent

    def observation(self, market: PreparedMarket, held: Mark) -> torch.Tensor:
        """The ``(1, obs_dim)`` float32 observation at the newest bar of ``market`` holding ``held`` (the env's layout
        and dtypes: the window, the position -- the level's weight, or an anchored model's weight held --, the
        benchmark weight ``b_t`` of an anchored model, the drawdown state)."""
        self._agent(market)  # built on the first market: the observation options come with it
        t = len(market.arrays.close) - 1
        features = market.arrays.features
        position = held.weight if self.anchor else self.positions[held.level]
        parts = [torch.from_numpy(np.ascontiguousarray(features[t - self.window + 1 : t + 1]).reshape(-1)),
                 torch.tensor([position], dtype=torch.float64).to(torch.float32)]
        if self.anchor:  # the benchmark block, as the env appends it (float32 b_t of this history)
            parts.append(torch.from_numpy(self.anchor_config(market).token_block().table[t]))
        if self._options.get("drawdown_obs"):  # (D_t, M_t) in float64 as the env computes them, then float32
            parts.append(torch.tensor([1.0 - held.equity / held.peak, held.max_drawdown],
                                      dtype=torch.float64).to(torch.float32))
        return torch.cat(parts)[None]

    def anchor_config(self, market: PreparedMarket) -> Any:
        """An anchored model's :class:`~sentio_lab.env.anchor.AnchorConfig` on the history ``market`` (the benchmark
        weights of its bars, by the env's own :func:`~sentio_lab.agents.variants.env_options`)."""
        return env_options(self.args, market)["anchor"]

    def masker(self, market: PreparedMarket) -> Masker | None:
        """A fresh :class:`~sentio_lab.env.masks.Masker` of a masked model on the history ``market`` (numpy, one
        episode; its inputs -- EWMA volatility, regime probability -- by the env's own code), None unmasked."""
        if not self.masking:
            return None
        config = self.masking["masks"]
        return make_masker(market.arrays.close, market.arrays.features, np.asarray(self.positions), config,
                           market_mask_inputs(config, market), 1, self.masking["invalid_action"], None)

    def decide(self, market: PreparedMarket, held: Mark, masker: Masker | None = None) -> Order:
        """The order the greedy policy gives at the newest bar of ``market`` holding ``held``: a masked model's
        valid levels come from ``masker`` (holding the mask state at that bar, :class:`MaskReplay`); an anchored
        model's target is ``clip(b_t + tilt, lo, hi)`` (the weight held inside the no-trade band)."""
        obs = self.observation(market, held)
        mask = None
        if self.masking:
            if masker is None:
                raise ValueError("a masked model decides with its mask state (masker=)")
            t = len(market.arrays.close) - 1
            valid = masker.action_masks(np.array([t]), np.array([held.level]), np.array([held.equity]))
            mask = torch.from_numpy(valid)
        with torch.no_grad():  # one row through act_greedy: the call evaluate_policy makes at every bar
            agent = self._agent(market)
            level = int((agent.act_greedy(obs) if mask is None else agent.act_greedy(obs, mask))[0])
        if not self.anchor:
            return Order(bar=held.bar, time=held.time, level=level, target_weight=self.positions[level])
        anchor = self.anchor_config(market)
        lo, hi = anchor.bounds(self.positions)
        t = len(market.arrays.close) - 1
        target, _, _ = anchored_targets(anchor.benchmark[t : t + 1], np.array([anchor.tilts[level]]),
                                        np.array([held.weight]), lo, hi, anchor.no_trade_band)
        return Order(bar=held.bar, time=held.time, level=level, target_weight=float(target[0]))


class MaskReplay:
    """The mask state of a masked model's account at its newest bar, replayed from the ledger.

    The env's :class:`~sentio_lab.env.masks.Masker` carries its state (peak, drawdown guard, decisions since the last
    level change, trades in the current ``period_bars`` window) from step to step; here it is rebuilt from what the
    ledger recorded: starting fresh at the account's first bar (as ``evaluate_policy`` resets its episode), then
    ``Masker.update(changed, equity, steps)`` for every later bar with ``changed`` = its level differs from the bar
    before, ``equity`` its mark and ``steps`` the bars since the first. After a restart the replay starts again
    from the ledger (nothing of it survives a process); while running, the state of the last bar is kept so each
    bar costs one update, and it is only ever advanced by a bar the ledger holds or is about to hold."""

    def __init__(self) -> None:
        """Nothing replayed yet."""
        self._state: dict[str, Any] | None = None
        self._bar: int | None = None
        self._level: int | None = None

    def advance(self, masker: Masker, ledger: Ledger, account: str, first_bar: int, mark: Mark) -> Masker:
        """``masker`` holding the mask state at ``mark.bar`` (the account marked there, not necessarily written):
        from the kept state of the bar before, else replayed over the ledger's bars ``first_bar .. mark.bar - 1``."""
        if mark.bar == first_bar:
            masker.reset()
        elif self._bar == mark.bar - 1 and self._state is not None:
            masker.load_state_dict(self._state)
            self._step(masker, self._level, mark, first_bar)
        else:  # a restart (or a first call): the whole account from its ledger rows
            positions = ledger.table("positions", account)
            positions = positions[positions["bar"] < mark.bar]
            equity = ledger.table("equity", account).set_index("bar")["equity"]
            bars, levels = positions["bar"].to_numpy(), positions["level"].to_numpy()
            if not np.array_equal(bars, np.arange(first_bar, mark.bar)):
                raise PaperError(f"account {account!r}: the ledger holds bars {bars[:1].tolist()}..., not every bar "
                                 f"from {first_bar} to {mark.bar - 1}; the mask state cannot be replayed")
            marks = equity.reindex(bars).to_numpy()  # a bar is one transaction: its equity row is there too
            masker.reset()
            for k in range(1, len(bars)):
                self._update(masker, levels[k] != levels[k - 1], marks[k], int(bars[k]) - first_bar)
            self._step(masker, int(levels[-1]), mark, first_bar)
        self._state, self._bar, self._level = masker.state_dict(), mark.bar, mark.level
        return masker

    def _step(self, masker: Masker, level_before: int | None, mark: Mark, first_bar: int) -> None:
        self._update(masker, mark.level != level_before, mark.equity, mark.bar - first_bar)

    @staticmethod
    def _update(masker: Masker, changed: bool, equity: float, steps: int) -> None:
        masker.update(np.array([bool(changed)]), np.array([float(equity)]), np.array([int(steps)]))
