"""A trained model as a decision function: OHLCV history in, the decision for the newest bar out.

:meth:`Policy.from_checkpoint` (a checkpoint file) or :meth:`Policy.load` (a path or a registry URI such as
``models:/<name>@champion``, resolved by ``sentio_lab.deploy.registry.resolve``) rebuild the agent with
:func:`sentio_lab.agents.variants.load_trained`; :meth:`Policy.decide` then takes the bar history of one instrument
(a DataFrame of OHLCV bars, oldest first, up to and including the newest closed bar) or of many (a dict
name -> DataFrame) and returns, per instrument, the :class:`Decision` for the newest bar: the level index the
greedy policy picks and its target weight (filled at the next bar, as in the backtest).

What a decision reads (the timing convention of :mod:`sentio_lab.env.trading`, bar t = the newest bar):

* the features of the bars ``t - window + 1 .. t``, computed from the history with the model's *fitted* feature
  state (normaliser, pruning, HMM: nothing is refit; :func:`sentio_lab.features.build_observation_features`);
* the account (:class:`Account`): the level held (``position``; flat when not given), and where the model
  observes or masks on it, the equity, its peak and maximum drawdown (``ppo_risk`` observes ``D_t, M_t``) and the
  mask rules' state (drawdown guard, decisions since the last trade, trades in the current window);
* token blocks of higher timeframes (``ppo_transformer``), built from the history as the backtest builds them.

History (what a caller must pass for the backtest's decision, bit for bit): the bars **from the model's first bar**
(:attr:`Policy.first_bar`: the first bar of the data it was trained and backtested on) up to the newest bar. Some
features depend on where the series starts (TA-Lib's Wilder smoothing and EMAs, the HMM's forward filter,
rolling sums): with that history they equal the backtest's bit for bit (tests/deploy/test_policy.py replays a
real file bar by bar). A history starting elsewhere is accepted when it holds at least :attr:`Policy.min_bars`
bars (the warm-up of every feature plus the window): its features are then causal and complete but may differ
in the last digits from the backtest's. Models that fit something on the training bars of the history, as the
backtest does (:attr:`Policy.fitted_on_history`: the transformer's token standardisation, the risk budget's
GARCH forecast), need the history from :attr:`Policy.first_bar` through at least the training range. Fewer bars,
another start where it matters, bars out of order or duplicated, and malformed OHLCV are refused with
:class:`BarsError` (a ``ValueError``) saying so.

Supported: ``ppo``, ``ppo_risk`` (pass the account's equity, peak and maximum drawdown), ``ppo_transformer``,
``ppo_masked``: every mask rule, from the account's mask state (the stateless rules -- level cap,
long-only, risk budget, regime -- need only the position; the EWMA / GARCH volatility of the risk budget runs
over the history, GARCH fitted on the model's training range, which the history must then cover), and
benchmark-anchored models (``--anchor``, :mod:`sentio_lab.env.anchor`): the benchmark weight ``b_t`` is computed
from the history by the env's own rule (:func:`sentio_lab.env.benchmarks.benchmark_weights`, through the same
:func:`~sentio_lab.agents.variants.env_options` the backtest builds its env with), the account gives the weight
held (:attr:`Account.weight`, not a level: an anchored weight moves with ``b_t``), the action is a tilt index and
:attr:`Decision.weight` the target ``clip(b_t + tilt, lo, hi)`` (the weight held inside the no-trade band), by
:func:`sentio_lab.env.anchor.anchored_targets`. ``vol_target`` scales by the training range's volatility, so its
history must cover the training range (:attr:`Policy.fitted_on_history`).

:meth:`Policy.act` is the batched path for observations that are ready (a ``(B, D)`` array): one forward pass;
for MLP agents near-ties of the logits are recomputed row by row, so each action equals the one-row decision.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sentio_lab.agents.nets import MLPActorCritic
from sentio_lab.agents.nets.quantile import QuantileActorCritic
from sentio_lab.agents.variants import TrainedAgent, action_masking, agent_obs_dim, env_options, load_trained
from sentio_lab.data import DataValidationError, MarketData, canonicalize
from sentio_lab.env import MarketArrays
from sentio_lab.env.anchor import AnchorConfig, anchored_targets
from sentio_lab.env.market import PreparedMarket
from sentio_lab.env.mask_inputs import market_mask_inputs
from sentio_lab.env.masks import make_masker
from sentio_lab.evaluation.episodes import TIE_ATOL, TIE_RTOL
from sentio_lab.features import build_observation_features
from sentio_lab.features.registry import bank_optional_columns

#: A registry URI names a model in the registry (``models:/<name>@<alias>`` or ``models:/<name>/<version>``).
REGISTRY_SCHEME = "models:/"
#: "Decisions since the last level change" of an account that has not traded (the mask rules' start value).
NEVER_TRADED = 2**30


class BarsError(ValueError):
    """A bar history the policy cannot decide on: malformed, out of order, duplicated or too short."""


@dataclass(frozen=True)
class Account:
    """What a decision reads from the account besides the bars (the env state of :mod:`sentio_lab.env.trading`).

    The defaults are a fresh account: flat, equity 1 at its peak, no drawdown, never traded. Equity is in any
    unit consistent with ``peak`` (the env's start at 1.0; only ``equity / peak`` is read)."""

    position: int | None = None
    """Index of the level held now (into :attr:`Policy.levels`); None: flat. Not read by anchored models."""
    weight: float | None = None
    """Anchored models only: the weight held now (the target filled last, :attr:`Decision.weight`); None: flat."""
    equity: float = 1.0
    """Equity marked at the newest bar's close."""
    peak: float = 1.0
    """Highest equity marked so far (the env's ``P_t``, from its start)."""
    max_drawdown: float = 0.0
    """The largest ``1 - equity / peak`` so far (the env's ``M_t``)."""
    guard: bool = False
    """The drawdown mask rule's latch (:mod:`sentio_lab.env.masks`)."""
    since_trade: int = NEVER_TRADED
    """Decisions since the last level change (1 right after a change)."""
    period_trades: int = 0
    """Level changes in the current ``period_bars`` window of the trade-limit rule."""

    def __post_init__(self) -> None:
        """Refuse an account no env could hold, naming the field."""
        for name in ("equity", "peak", "max_drawdown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"account.{name} must be a finite number, got {value!r}")
        if self.peak <= 0 or not 0 <= self.max_drawdown <= 1:
            raise ValueError(f"account.peak must be > 0 and account.max_drawdown in [0, 1], got {self.peak}, "
                             f"{self.max_drawdown}")
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not np.isfinite(self.weight)):
            raise ValueError(f"account.weight must be a finite number (the weight held), got {self.weight!r}")
        if self.since_trade < 0 or self.period_trades < 0:
            raise ValueError(f"account.since_trade and account.period_trades must be >= 0, got {self.since_trade}, "
                             f"{self.period_trades}")


@dataclass(frozen=True)
class Decision:
    """The greedy decision at the newest bar's close: fill it at the next bar (open or close, as the model's)."""

    action: int
    """Index of the chosen level (into :attr:`Policy.levels`; anchored models: of the tilt, :attr:`Policy.tilts`)."""
    weight: float
    """Target weight (fraction of equity; negative: short): the chosen level's, or an anchored model's
    ``clip(b_t + tilt, lo, hi)`` (the weight held when that is inside the no-trade band)."""
    time: pd.Timestamp
    """Timestamp of the bar the decision was made at (the newest bar of the history)."""


def _resolve(uri: str | Path, registry_uri: str | None = None) -> Path:
    """A local path for ``uri``: registry URIs through ``sentio_lab.deploy.registry.resolve`` (at ``registry_uri``,
    default: the registry's own default), paths as given."""
    text = str(uri)
    if text.startswith(REGISTRY_SCHEME):
        try:
            from sentio_lab.deploy import registry  # the registry module (issue 21 s2) may be absent in a build
        except ImportError as err:  # pragma: no cover - present once the registry lands
            raise ValueError(f"{text}: registry URIs need sentio_lab.deploy.registry ({err})") from err
        path = registry.resolve(text) if registry_uri is None else registry.resolve(text, registry_uri=registry_uri)
        return Path(path)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such checkpoint (give a checkpoint file or models:/<name>@<alias>)")
    return path


def _checkpoint_file(path: Path) -> Path:
    """The checkpoint inside ``path``: the file itself, or a folder's single ``*.pt`` (an exported bundle's)."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one checkpoint (*.pt) in the folder, found {len(found)}")
    return found[0]


class Policy:
    """A trained agent with what its decisions need: feature state, levels, masks and observation options.

    Thread-safe: decisions read the agent and the fitted state only (``torch.no_grad``, eval mode); nothing is
    cached between calls, so concurrent callers get the answers serial ones would."""

    def __init__(self, trained: TrainedAgent, *, source: str = "") -> None:
        """Wrap a restored agent (:func:`~sentio_lab.agents.variants.load_trained`); ``source`` names where it came
        from (a path or a registry URI)."""
        self.trained, self.source = trained, source
        self.registry_uri: str | None = None
        """The registry :meth:`load` resolved a ``models:/`` URI in (None: the default, or not from a registry)."""
        self.agent, self.args, self.market = trained.agent, trained.args, trained.market
        self.variant: str = trained.bundle["variant"]
        self.window: int = int(self.args.features.window)
        self.levels = np.asarray(self.args.env.positions, dtype=np.float64)
        self.feature_state: dict = trained.bundle["feature_state"]
        # the features of a decision are recomputed from the caller's bars: never through the raw-feature cache
        self.feature_config = dataclasses.replace(self.market.feature_config, cache_dir=None)
        self.masking: dict[str, Any] = action_masking(self.args)
        options = env_options(self.args, self.market)
        self.anchor: AnchorConfig | None = options.get("anchor")
        """The model's anchor on its own market (None: unanchored); a decision rebuilds it on the history."""
        self.tilts: tuple[float, ...] | None = None if self.anchor is None else self.anchor.tilts
        """Anchored models: the tilt each action adds to the benchmark weight (None: unanchored)."""
        self.drawdown_obs = bool(options.get("drawdown_obs", False))
        self.token_timeframes = bool(options.get("token_blocks"))
        self.first_bar: pd.Timestamp = self.market.data.frame.index[0]
        """The first bar of the model's data: histories from here give the backtest's decisions bit for bit."""
        masks = self.masking.get("masks")
        garch = masks is not None and masks.risk_budget is not None and masks.vol_model == "garch"
        vol_anchor = self.anchor is not None and self.anchor.name == "vol_target"
        self.fitted_on_history: str | None = (
            "token standardisation" if self.token_timeframes else "GARCH volatility forecast" if garch
            else "benchmark's training volatility (vol_target anchor)" if vol_anchor else None)
        """What this model fits on the training bars *of the history* (as the backtest does: the transformer's token
        standardisation, the risk budget's GARCH), None when nothing is: such a history must start at
        :attr:`first_bar` and cover the training range."""
        self.min_bars: int = int(self.market.arrays.first_valid) + self.window
        """The fewest bars a history may hold: every feature's warm-up plus the window (and the training range
        when :attr:`fitted_on_history`)."""
        if self.fitted_on_history:
            self.min_bars = max(self.min_bars, self.market.range("train")[1])
        self.fill_price: str = self.market.arrays.fill_price
        self.obs_dim: int = agent_obs_dim(self.args, self.market)
        self._flat = int(np.argmin(np.abs(self.levels)))
        self._tie_scale = _tie_scale(self.agent)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, dataset: str | Path | None = None) -> Policy:
        """The policy of a checkpoint file (or a folder holding one); ``dataset`` as in
        :func:`~sentio_lab.agents.variants.load_trained` (default: the checkpoint's own data, fingerprint checked)."""
        file = _checkpoint_file(Path(path))
        return cls(load_trained(file, dataset=dataset), source=str(path))

    @classmethod
    def load(cls, uri: str | Path, *, dataset: str | Path | None = None, registry_uri: str | None = None) -> Policy:
        """The policy at ``uri``: a checkpoint path (or a folder holding one, like an exported bundle), or
        ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` resolved by the model registry at ``registry_uri``
        (``sentio_lab.deploy.registry.resolve``; None: the registry's default)."""
        policy = cls.from_checkpoint(_resolve(uri, registry_uri), dataset=dataset)
        policy.source, policy.registry_uri = str(uri), registry_uri
        return policy

    def describe(self) -> dict[str, Any]:
        """What the service's ``GET /model`` shows: source, variant, levels, window, history rules, data."""
        return {
            "source": self.source,
            "variant": self.variant,
            "levels": self.levels.tolist(),
            "window": self.window,
            "obs_dim": self.obs_dim,
            "min_bars": self.min_bars,
            "first_bar": self.first_bar.isoformat(),
            "fill_price": self.fill_price,
            "data_fingerprint": self.trained.bundle["data_fingerprint"],
            "masks": sorted(self.masking["masks"].active_rules()) if self.masking else [],
            "anchor": None if self.anchor is None else {"benchmark": self.anchor.name, "tilts": list(self.tilts)},
        }

    # ------------------------------------------------------------------------------------ observations
    def _history(self, bars: pd.DataFrame, name: str) -> PreparedMarket:
        """The caller's bars as a prepared market with the model's fitted features (nothing refit)."""
        if not isinstance(bars, pd.DataFrame):
            raise BarsError(f"{name}: bars must be a pandas DataFrame of OHLCV rows, got {type(bars).__name__}")
        try:
            optional = bank_optional_columns(self.feature_config.bank)
            frame = canonicalize(bars, source=name, min_rows=1, optional=optional)
        except DataValidationError as err:
            raise BarsError(str(err)) from err
        if self.fitted_on_history and frame.index[0] != self.first_bar:
            raise BarsError(f"{name}: this model fits its {self.fitted_on_history} on its training bars, as the "
                            f"backtest did: pass the history from its first bar {self.first_bar} (got "
                            f"{frame.index[0]})")
        if len(frame) < self.min_bars:
            why = (f"{self.min_bars - self.window} warm-up + a {self.window}-bar window" if not self.fitted_on_history
                   else f"the training range, on which its {self.fitted_on_history} is fitted")
            raise BarsError(f"{name}: too few bars for the feature lookback: {len(frame)} given, at least "
                            f"{self.min_bars} needed ({why})")
        try:
            features = build_observation_features(frame, len(frame), self.feature_config, state=self.feature_state)
        except ValueError as err:  # a timeframe warm-up longer than the bars, or data the features cannot use
            raise BarsError(f"{name}: {err}") from err
        if len(frame) < features.first_valid + self.window:
            raise BarsError(f"{name}: too few bars for the feature lookback: {len(frame)} given, at least "
                            f"{features.first_valid + self.window} needed")
        data = MarketData(frame=frame, name=name, bar_freq=self.market.data.bar_freq, fingerprint="",
                          session_close=self.market.data.session_close)
        # what observations, token blocks and mask rules read (MarketArrays.from_frame's cost inputs are not needed)
        arrays = MarketArrays(open=frame["open"].to_numpy(dtype=np.float64),
                              close=frame["close"].to_numpy(dtype=np.float64), features=features.values,
                              first_valid=features.first_valid, fill_price=self.fill_price)
        return PreparedMarket(data=data, splits=self.market.splits, features=features, arrays=arrays,
                              feature_config=self.feature_config)

    def _options(self, market: PreparedMarket) -> dict[str, Any]:
        """The env keywords of the history (token blocks, the anchor on its bars), as the backtest builds them."""
        if not self.token_timeframes and self.anchor is None:
            return {}
        try:
            return env_options(self.args, market)
        except ValueError as err:  # bars the token timeframes (or the benchmark) cannot be built from
            raise BarsError(f"{market.data.name}: {err}") from err

    def _observe(self, market: PreparedMarket, account: Account, options: dict[str, Any] | None = None
                 ) -> np.ndarray:
        """The env's observation at the newest bar (:class:`~sentio_lab.env.TradingEnv`'s, in the same order)."""
        features, t = market.arrays.features, len(market.arrays.close) - 1
        options = self._options(market) if options is None else options
        if self.anchor is None:
            held = self.levels[self._position(account)]
        else:  # the env's position slot of an anchored model: the weight held (float64 -> float32)
            held = self._held_weight(account)
        parts = [features[t - self.window + 1 : t + 1].reshape(-1),
                 np.asarray([held], dtype=np.float64).astype(np.float32)]
        blocks = list(options.get("token_blocks", ()))
        if self.anchor is not None:  # the benchmark block (b_t) after the token blocks, as the env appends it
            blocks.append(options["anchor"].token_block())
        for block in blocks:
            parts.append(block.table[block.index[t]].reshape(-1))
        if self.drawdown_obs:  # (D_t, M_t) in float64 as the env computes them, then float32
            state = np.asarray([1.0 - account.equity / account.peak, account.max_drawdown], dtype=np.float64)
            parts.append(state.astype(np.float32))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _held_weight(self, account: Account) -> float:
        """The weight an anchored model's account holds (flat when None); a level index is refused, naming why."""
        if account.position is not None:
            raise ValueError("account.position: an anchored model holds a weight that moves with its benchmark, "
                             "not a level; give account.weight (the last decision's weight) instead")
        return 0.0 if account.weight is None else float(account.weight)

    def _position(self, account: Account) -> int:
        """The held level index of ``account`` (flat when None), checked."""
        if account.weight is not None:
            raise ValueError("account.weight is read by anchored models only; give account.position (a level index)")
        if account.position is None:
            return int(np.argmin(np.abs(self.levels)))
        level = account.position
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(self.levels):
            raise ValueError(f"account.position must be a level index in [0, {len(self.levels)}) of levels "
                             f"{self.levels.tolist()}, got {level!r}")
        return int(level)

    def observation(self, bars: pd.DataFrame, account: Account | None = None, *, name: str = "bars") -> np.ndarray:
        """The float32 observation the agent sees at the newest bar of ``bars`` holding ``account``."""
        return self._observe(self._history(bars, name), account or Account())

    def _mask(self, market: PreparedMarket, account: Account) -> torch.Tensor | None:
        """The valid levels at the newest bar (None without masks), from the account's mask state."""
        if not self.masking:
            return None
        config = self.masking["masks"]
        inputs = market_mask_inputs(config, market) if config.vol_model == "garch" or config.regime_threshold \
            is not None else None
        arrays = market.arrays
        masker = make_masker(arrays.close, arrays.features, self.levels, config, inputs, 1,
                             self.masking["invalid_action"], torch.device("cpu"))
        f64, i64 = torch.float64, torch.long
        masker.state.update(peak=torch.tensor([account.peak], dtype=f64), guard=torch.tensor([bool(account.guard)]),
                            since_trade=torch.tensor([int(account.since_trade)], dtype=i64),
                            period_trades=torch.tensor([int(account.period_trades)], dtype=i64))
        t = torch.tensor([len(arrays.close) - 1])
        level = torch.tensor([self._position(account)])
        return masker.action_masks(t, level, torch.tensor([account.equity], dtype=f64))

    # --------------------------------------------------------------------------------------- decisions
    def _decide_one(self, bars: pd.DataFrame, account: Account | None, name: str) -> Decision:
        account = account or Account()
        market = self._history(bars, name)
        options = self._options(market)
        obs = torch.from_numpy(self._observe(market, account, options))[None]
        mask = self._mask(market, account)
        with torch.no_grad():  # one row through act_greedy: the call evaluate_policy makes at every bar
            action = int(self.agent.act_greedy(obs) if mask is None else self.agent.act_greedy(obs, mask))
        time = market.data.frame.index[-1]
        if self.anchor is None:
            return Decision(action=action, weight=float(self.levels[action]), time=time)
        anchor: AnchorConfig = options["anchor"]
        lo, hi = anchor.bounds(self.levels)
        target, _, _ = anchored_targets(anchor.benchmark[len(market.arrays.close) - 1 : len(market.arrays.close)],
                                        np.asarray([anchor.tilts[action]]),
                                        np.asarray([self._held_weight(account)]), lo, hi, anchor.no_trade_band)
        return Decision(action=action, weight=float(target[0]), time=time)

    def decide(
        self,
        bars: pd.DataFrame | dict[str, pd.DataFrame],
        account: Account | dict[str, Account] | None = None,
        *,
        name: str = "bars",
    ) -> Decision | dict[str, Decision]:
        """The decision at the newest bar of ``bars`` (one instrument, called ``name`` in errors) or of each
        instrument (a dict name -> bars, with ``account`` None, one :class:`Account` for all, or a dict name ->
        Account).

        Raises :class:`BarsError` for bars it cannot decide on (module doc: history rules) and ``ValueError``
        for an invalid account."""
        if isinstance(bars, dict):
            accounts = account if isinstance(account, dict) else {name: account for name in bars}
            unknown = sorted(set(accounts) - set(bars))
            if unknown:
                raise ValueError(f"accounts given for instruments without bars: {unknown}")
            return {name: self._decide_one(frame, accounts.get(name), name) for name, frame in bars.items()}
        if isinstance(account, dict):
            raise ValueError("one instrument's bars take one Account, not a dict")
        return self._decide_one(bars, account, name)

    def act(self, observations: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor | None = None
            ) -> np.ndarray:
        """Greedy level indices for ready observations ``(B, obs_dim)`` (``masks``: bool ``(B, levels)``), one
        forward pass. MLP agents recompute near-ties of the logits (within
        :data:`~sentio_lab.evaluation.episodes.TIE_ATOL` + ``TIE_RTOL`` x scale) one row at a time, so every
        action equals the one-row decision; other agents (the transformer) run their ``act_greedy`` on the batch."""
        obs = torch.as_tensor(observations, dtype=torch.float32)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"observations must be (B, {self.obs_dim}), got {tuple(obs.shape)}")
        mask = None if masks is None else torch.as_tensor(masks, dtype=torch.bool)
        with torch.no_grad():
            if self._tie_scale is None:
                actions = self.agent.act_greedy(obs) if mask is None else self.agent.act_greedy(obs, mask)
                return actions.numpy().astype(np.int64)
            logits = self.agent.actor(self.agent.normalise(obs))
            if mask is not None:
                logits = torch.where(mask, logits, -torch.inf)
            actions = logits.argmax(-1)
            if logits.shape[-1] > 1 and len(obs) > 1:
                top = logits.topk(2, dim=-1).values
                for row in torch.nonzero(top[:, 0] - top[:, 1] <= TIE_ATOL + TIE_RTOL * self._tie_scale).flatten():
                    r = int(row)
                    one = obs[r : r + 1]
                    actions[r] = (self.agent.act_greedy(one) if mask is None
                                  else self.agent.act_greedy(one, mask[r : r + 1]))[0]
            return actions.numpy().astype(np.int64)


def _tie_scale(agent: Any) -> float | None:
    """The tie guard's scale of an MLP actor ending tanh -> linear (as :mod:`sentio_lab.evaluation.episodes`'s),
    None for other agents."""
    if not isinstance(agent, (MLPActorCritic, QuantileActorCritic)):
        return None
    actor = getattr(agent, "actor", None)
    if not (isinstance(actor, torch.nn.Sequential) and len(actor) >= 2 and type(actor[-1]) is torch.nn.Linear
            and type(actor[-2]) is torch.nn.Tanh):
        return None
    with torch.no_grad():
        return float((actor[-1].weight.abs().sum(-1) + actor[-1].bias.abs()).max())


__all__ = ["Account", "BarsError", "Decision", "Policy", "REGISTRY_SCHEME"]
