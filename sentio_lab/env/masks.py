"""Action-mask rules over env state, computed in batch for :class:`~sentio_lab.env.TradingEnv` (torch) and
:class:`~sentio_lab.env.NumpyTradingEnv` (numpy) by the same code.

A mask row holds, for one episode, which position levels the *next* decision may choose. It depends on bars
``<= t`` (the decision bar) and on the episode's own state only. Notation: ``w_a`` is the weight of action
``a``, ``w`` the level currently held, ``E_t`` the equity marked at bar t's close, ``P_t = max_{s<=t} E_s``
its peak within the episode. "No increase" means ``w_a == 0`` or (``sign(w_a) == sign(w)`` and
``|w_a| <= |w|``): reduce or keep the exposure on the same side; a sign flip counts as an increase.

Rules (a field at None / 0 / False is off), applied in this order:

* ``max_abs_level``: valid iff ``|w_a| <= max_abs_level``.
* ``long_only``: valid iff ``w_a >= 0``.
* ``risk_budget``: valid iff ``sigma_t * |w_a| <= risk_budget``, where ``sigma_t`` is the forecast of the
  next bar's log-return volatility made at bar t's close (per bar, not annualised):
  EWMA (``vol_model="ewma"``): ``s2_1 = r_1^2``, ``s2_t = lam s2_{t-1} + (1 - lam) r_t^2``, ``r_t = log(C_t /
  C_{t-1})``, ``sigma_t = sqrt(s2_t)`` (RiskMetrics, ``lam = ewma_lambda``);
  GARCH(1,1) (``vol_model="garch"``): ``arch_model(100 r, mean="Constant", vol="GARCH", p=1, q=1)`` fitted on
  the returns inside ``fit_range`` only, then ``h_1 = omega / (1 - alpha - beta)``,
  ``h_{t+1} = omega + alpha (100 r_t - mu)^2 + beta h_t`` over all bars with the fitted parameters,
  ``sigma_t = sqrt(h_{t+1}) / 100``. Bar 0 has no return: ``sigma_0 = 0``. A CPCV / walk-forward fold's
  training env runs either recursion from each training segment's first bar (:func:`restarted_per_segment`),
  so no test group between segments reaches a training decision.
* ``drawdown``: with ``D_t = 1 - E_t / P_t`` the guard latches on when ``D_t >= drawdown_threshold`` and off
  when ``D_t <= recover_threshold``: ``G_t = D_t >= thr or (G_{t-1} and D_t > recover)``; while ``G_t`` only
  no-increase actions are valid.
* ``regime``: with ``p_t`` the filtered probability of the highest-volatility HMM state (``regime.py`` orders
  states by volatility, so it is the last regime column), while ``p_t > regime_threshold`` only no-increase
  actions are valid.
* ``cooldown`` (minimum holding period k): with ``h`` the decisions since the last level change (a change at
  decision t gives ``h = 1`` at decision t+1; ``h`` is large at an episode start), while ``h < k`` only the
  held level is valid: a level is held for at least k bars.
* ``max_trades``: trades (level changes) are counted per window of ``period_bars`` steps of the env's step
  counter (``steps // period_bars``; a staggered first episode starts mid-window); once ``max_trades`` trades
  fall in the current window only the held level is valid.

Flat (level 0) is always valid: the first five rules never mask it, and with ``flat_always`` (default) it
overrides the cool-down and the trade limit (an exit is allowed, and counted as a trade). With
``flat_always=False`` those two rules allow only the held level, which the risk budget may forbid: such an
empty row raises :class:`NoValidActionError` naming the rule, the episode and the state, never a silent sample.

Enforcement (``invalid_action``): ``"refuse"`` raises ``ValueError`` naming env, action and rule;
``"nearest"`` maps an invalid action to the valid level nearest in weight, ties towards flat (smaller
``|w|``), then the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from sentio_lab.env.mask_inputs import MaskInputs

#: Rule names in the order they are applied (also the keys of ``mask_counts``).
RULES: tuple[str, ...] = ("max_abs_level", "long_only", "risk_budget", "drawdown", "regime", "cooldown", "max_trades")
#: "Decisions since the last change" at an episode start: larger than any cool-down.
_NEVER = 2**30
#: Mask state carried per episode (saved in the env's state_dict under ``"mask:<name>"``).
STATE_NAMES: tuple[str, ...] = ("peak", "guard", "since_trade", "period_trades", "counts", "binding")
InvalidAction = Literal["refuse", "nearest"]
_TOL = 1e-12
#: Up to this many levels the torch Masker maps "nearest" through a (2^A, A) table (:func:`nearest_table`).
_TABLE_LEVELS = 10


@dataclass(frozen=True)
class MaskConfig:
    """Which mask rules are on and their parameters (None / 0 / False = off); see the module doc for formulas."""

    max_abs_level: float | None = None
    """Largest allowed ``|w_a|``."""
    long_only: bool = False
    """Only ``w_a >= 0``."""
    risk_budget: float | None = None
    """Largest allowed ``sigma_t * |w_a|`` (per-bar log-return volatility times weight)."""
    vol_model: Literal["ewma", "garch"] = "ewma"
    """Volatility forecast of the risk budget."""
    ewma_lambda: float = 0.94
    """EWMA decay ``lam`` in (0, 1)."""
    drawdown_threshold: float | None = None
    """Guard on at ``D_t >= drawdown_threshold`` (a fraction, e.g. 0.1 = 10 % below the episode's peak)."""
    recover_threshold: float = 0.0
    """Guard off at ``D_t <= recover_threshold`` (0 = back at the peak); must be below ``drawdown_threshold``."""
    regime_threshold: float | None = None
    """No increase while the high-volatility state's filtered probability exceeds this."""
    regime_column: int | None = None
    """Feature column of that probability (negative counts from the end, e.g. -1 for the last regime column);
    ignored when ``MaskInputs.regime_prob`` is given."""
    cooldown: int = 0
    """Minimum holding period k in decisions (0 or 1 = off)."""
    max_trades: int = 0
    """Most level changes per ``period_bars`` window (0 = off)."""
    period_bars: int = 0
    """Window length of ``max_trades``, in env steps."""
    flat_always: bool = True
    """Flat overrides the cool-down and the trade limit."""

    def __post_init__(self) -> None:
        """Reject inconsistent parameters, naming the field."""
        for name in ("max_abs_level", "risk_budget"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"MaskConfig.{name} must be > 0 (or None = off), got {value}")
        if self.vol_model not in ("ewma", "garch"):
            raise ValueError(f"MaskConfig.vol_model must be 'ewma' or 'garch', got {self.vol_model!r}")
        if not 0 < self.ewma_lambda < 1:
            raise ValueError(f"MaskConfig.ewma_lambda must be in (0, 1), got {self.ewma_lambda}")
        if self.drawdown_threshold is not None and not (
            0 <= self.recover_threshold < self.drawdown_threshold < 1
        ):
            raise ValueError(
                "MaskConfig needs 0 <= recover_threshold < drawdown_threshold < 1, got "
                f"{self.recover_threshold} and {self.drawdown_threshold}"
            )
        if self.regime_threshold is not None and not 0 <= self.regime_threshold < 1:
            raise ValueError(f"MaskConfig.regime_threshold must be in [0, 1), got {self.regime_threshold}")
        if self.cooldown < 0 or self.max_trades < 0 or self.period_bars < 0:
            raise ValueError("MaskConfig.cooldown, max_trades and period_bars must be >= 0")
        if self.max_trades and not self.period_bars:
            raise ValueError("MaskConfig.max_trades needs period_bars > 0 (the window trades are counted in)")

    def active_rules(self) -> tuple[str, ...]:
        """Names of the rules that are on, in application order."""
        on = {
            "max_abs_level": self.max_abs_level is not None,
            "long_only": self.long_only,
            "risk_budget": self.risk_budget is not None,
            "drawdown": self.drawdown_threshold is not None,
            "regime": self.regime_threshold is not None,
            "cooldown": self.cooldown > 1,
            "max_trades": self.max_trades > 0,
        }
        return tuple(name for name in RULES if on[name])


class NoValidActionError(RuntimeError):
    """A mask row with no valid action: names the rule that emptied it, the episode and its state."""


def _xp(x: Any) -> Any:
    """The array namespace of ``x``: torch for tensors, numpy otherwise."""
    return torch if isinstance(x, torch.Tensor) else np


def _no_increase(w_a: Any, w: Any) -> Any:
    """(N, A): ``w_a == 0`` or (same sign as ``w`` and ``|w_a| <= |w|``)."""
    xp = _xp(w_a)
    w = w[:, None]
    same_side = xp.sign(w_a) == xp.sign(w)
    return (w_a == 0) | (same_side & (xp.abs(w_a) <= xp.abs(w) + _TOL))


class Masker:
    """The rules of one :class:`MaskConfig` over a batch of episodes, with their per-episode state and counters.

    Arrays are torch tensors on ``device`` (batched env) or numpy arrays when ``device`` is None (reference env);
    every formula below is the same code for both.
    """

    def __init__(
        self,
        config: MaskConfig,
        positions: np.ndarray,
        inputs: MaskInputs,
        num_envs: int,
        invalid_action: InvalidAction = "nearest",
        device: torch.device | None = None,
    ) -> None:
        """Prepare the rules for ``num_envs`` episodes over the action levels ``positions``."""
        if invalid_action not in ("refuse", "nearest"):
            raise ValueError(f"invalid_action must be 'refuse' or 'nearest', got {invalid_action!r}")
        self.config, self.invalid_action, self.num_envs, self.device = config, invalid_action, num_envs, device
        self.names = config.active_rules()
        self.flat_index = int(np.argmin(np.abs(positions)))
        self.levels = self._array(np.asarray(positions, dtype=np.float64))
        self.vol = None if inputs.vol is None else self._array(inputs.vol)
        self.regime = None if inputs.regime_prob is None else self._array(inputs.regime_prob)
        if config.risk_budget is not None and self.vol is None:
            raise ValueError("the risk_budget rule needs MaskInputs.vol")
        if config.regime_threshold is not None and self.regime is None:
            raise ValueError("the regime rule needs MaskInputs.regime_prob")
        # Per-step constants, built once: the level index, the flat column, the rows of a full batch, the rules
        # that depend on the levels only (their (A,) row, the flat override included), and for up to
        # _TABLE_LEVELS levels the "nearest" map as a table over (mask row as bits, chosen action).
        self._index = self._array(np.arange(len(positions)))
        self._flat = self.levels == 0
        self._rows = self._array(np.arange(num_envs))
        self._static = {name: self._static_row(name) for name in self.names if name in ("max_abs_level", "long_only")}
        self._needs_weights = any(name in ("risk_budget", "drawdown", "regime") for name in self.names)
        self._bits, self._nearest = (None, None) if device is None or len(positions) > _TABLE_LEVELS else \
            nearest_table(self.levels)
        self.state: dict[str, Any] = {}
        # The masks of the last checked decision, reused by apply() for the same decision (below), and the
        # counter increments of the last apply(), committed by update() once the env's step has gone through.
        self._cached: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._pending_counts: tuple[Any, Any] | None = None
        self.reset()

    def _static_row(self, name: str) -> Any:
        """(A,) bool: a rule that depends on the levels only (``max_abs_level``, ``long_only``), flat included."""
        levels = self.levels
        xp = _xp(levels)
        row = xp.abs(levels) <= self.config.max_abs_level + _TOL if name == "max_abs_level" else levels >= 0
        return row | self._flat

    def _batch_rows(self, n: int) -> Any:
        """The row indices ``0 .. n-1`` (the cached ones for a full batch)."""
        if n == self.num_envs:
            return self._rows
        return np.arange(n) if self.device is None else torch.arange(n, device=self.device)

    def _array(self, values: np.ndarray) -> Any:
        return values if self.device is None else torch.as_tensor(values, device=self.device)

    def _full(self, shape: int | tuple[int, ...], value: float | int | bool, kind: str) -> Any:
        if self.device is None:
            return np.full(shape, value, dtype={"f": np.float64, "i": np.int64, "b": bool}[kind])
        dtype = {"f": torch.float64, "i": torch.long, "b": torch.bool}[kind]
        return torch.full(shape if isinstance(shape, tuple) else (shape,), value, dtype=dtype, device=self.device)

    # -------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Fresh episodes: peak 1, guard off, no trade yet, counters at 0."""
        n, r = self.num_envs, len(self.names)
        self._cached, self._pending_counts = None, None
        self.state = {
            "peak": self._full(n, 1.0, "f"), "guard": self._full(n, False, "b"),
            "since_trade": self._full(n, _NEVER, "i"), "period_trades": self._full(n, 0, "i"),
            "counts": self._full(r, 0, "i"), "binding": self._full(r, 0, "i"),
        }

    def reset_where(self, done: Any) -> None:
        """Restart the episodes where ``done`` (auto-reset); counters keep counting."""
        xp, s = _xp(done), self.state
        self._cached = None
        s["peak"] = xp.where(done, 1.0, s["peak"])
        s["guard"] = s["guard"] & ~done
        s["since_trade"] = xp.where(done, _NEVER, s["since_trade"])
        s["period_trades"] = xp.where(done, 0, s["period_trades"])

    def update(self, changed: Any, equity: Any, steps: Any) -> None:
        """After a step: ``P = max(P, E)``, the guard latch, ``h`` and the trade count of the current window.

        ``changed`` says which episodes changed level, ``equity`` is the new mark and ``steps`` the new step count.
        """
        xp, s, c = _xp(equity), self.state, self.config
        self._cached = None
        if self._pending_counts is not None:  # the counters of the step that just went through
            hits, binds = self._pending_counts
            s["counts"], s["binding"], self._pending_counts = s["counts"] + hits, s["binding"] + binds, None
        s["peak"] = xp.maximum(s["peak"], equity)
        if c.drawdown_threshold is not None:
            d = 1.0 - equity / s["peak"]
            s["guard"] = (d >= c.drawdown_threshold) | (s["guard"] & (d > c.recover_threshold))
        s["since_trade"] = xp.where(changed, 1, (s["since_trade"] + 1).clip(max=_NEVER))
        trades = s["period_trades"] + changed  # a bool adds as 0 / 1
        if c.period_bars:
            trades = xp.where(steps % c.period_bars == 0, 0, trades)
        s["period_trades"] = trades

    def state_dict(self) -> dict[str, Any]:
        """Copies of the mask state and counters."""
        return {name: value.copy() if self.device is None else value.detach().cpu().clone()
                for name, value in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        missing = [name for name in STATE_NAMES if name not in state]
        if missing:
            raise ValueError(f"mask state lacks {missing} (saved without masks?)")
        self._cached, self._pending_counts = None, None
        self.state = {name: (np.array(state[name]) if self.device is None else state[name].to(self.device).clone())
                      for name in STATE_NAMES}

    # -------------------------------------------------------------------------------------------- masks
    def rule_masks(self, t: Any, level: Any) -> dict[str, Any]:
        """(N, A) bool per active rule for decisions at bars ``t`` holding level indices ``level``.

        The flat column is True in every rule's mask (module doc), except the cool-down and the trade limit
        without ``flat_always``. The masks of the rules that depend on the levels only (``max_abs_level``,
        ``long_only``) are read-only broadcast views of one row: copy before editing.
        """
        c, s, levels = self.config, self.state, self.levels
        xp = _xp(levels)
        n, num_levels = len(level), len(levels)
        w_a, w = (levels[None, :], levels[level]) if self._needs_weights else (None, None)  # (1, A), (N,)
        hold = self._index[None, :] == level[:, None] if ("cooldown" in self.names or "max_trades" in self.names) \
            else None
        flat = self._flat[None, :]
        out: dict[str, Any] = {}
        for name in self.names:
            if name in self._static:  # the same row for every episode: a broadcast view, no computation
                row = self._static[name][None, :]
                out[name] = np.broadcast_to(row, (n, num_levels)) if xp is np else row.expand(n, num_levels)
                continue
            if name == "risk_budget":
                m = self.vol[t][:, None] * xp.abs(w_a) <= c.risk_budget + _TOL
            elif name == "drawdown":
                m = _no_increase(w_a, w) | ~s["guard"][:, None]
            elif name == "regime":
                m = _no_increase(w_a, w) | ~(self.regime[t] > c.regime_threshold)[:, None]
            elif name == "cooldown":
                m = hold | (s["since_trade"] >= c.cooldown)[:, None]
            else:  # max_trades
                m = hold | (s["period_trades"] < c.max_trades)[:, None]
            if name not in ("cooldown", "max_trades") or c.flat_always:
                m = m | flat
            out[name] = m
        return out

    def combine(self, masks: dict[str, Any], t: Any, level: Any, equity: Any) -> Any:
        """AND of the rule masks; an empty row raises :class:`NoValidActionError` naming the rule that emptied it,
        the episode (env index) and its state (bar t, level, equity, drawdown)."""
        if not masks:
            return self._full((len(t), len(self.levels)), True, "b")
        combined = None
        for m in masks.values():
            combined = m if combined is None else combined & m
        if len(masks) == 1:  # a rule's own mask (a static rule's is a broadcast view): the caller gets a copy
            combined = combined.copy() if isinstance(combined, np.ndarray) else combined.clone()
        if bool(combined.any(1).all()):  # the one host sync of the common case
            return combined
        combined = None
        for name, m in masks.items():
            before = combined
            combined = m if combined is None else combined & m
            empty = ~combined.any(1)
            if bool(empty.any()):
                i = int(np.flatnonzero(np.asarray(empty.tolist()))[0])
                others = [k for k in masks if k != name and not bool(masks[k][i].all())]
                allowed = "all levels" if before is None else f"levels {np.flatnonzero(np.asarray(before[i].tolist()))}"
                d = 1.0 - float(equity[i]) / float(self.state["peak"][i])
                raise NoValidActionError(
                    f"no valid action: rule {name!r} masks every level left ({allowed}; other binding rules "
                    f"{others}) in episode {i} (env index) at bar t={int(t[i])}, level "
                    f"{float(self.levels[int(level[i])])}, equity {float(equity[i]):.6g}, drawdown {d:.4g}"
                )
        raise AssertionError("unreachable: some row was empty")

    def action_masks(self, t: Any, level: Any, equity: Any) -> Any:
        """(N, A) bool: the valid actions of the decision at bars ``t`` (every row checked non-empty).

        The rule masks and their checked AND are kept for :meth:`apply` of the same decision, so a step pays the
        rules and the empty-row check (one host sync) once, not twice.
        """
        masks = self.rule_masks(t, level)
        combined = self.combine(masks, t, level, equity)
        if self.device is not None:
            # the caller's copy of ``combined`` is the cached one: an in-place edit of it must not reach apply()
            self._cached = (tuple((x, x._version) for x in (t, level, equity, combined)), masks, combined)
        return combined

    def _decision_masks(self, t: Any, level: Any, equity: Any) -> tuple[dict[str, Any], Any]:
        """The rule masks and their checked AND for this decision: :meth:`action_masks`' when it was asked for the
        same decision (the same ``t``, ``level`` and ``equity`` tensors, unchanged since), else computed now."""
        if self._cached is not None and _same_decision(self._cached[0], t, level, equity, self._cached[2]):
            return self._cached[1], self._cached[2]
        masks = self.rule_masks(t, level)
        return masks, self.combine(masks, t, level, equity)

    def apply(self, actions: Any, t: Any, level: Any, equity: Any) -> Any:
        """Enforce the masks on ``actions`` (valid level indices): refuse or map to the nearest valid level, and
        count per rule the chosen actions it masked (``counts``) and the rows where it masked any level
        (``binding``). Returns the actions to fill.

        The counts are committed by the :meth:`update` that follows, so a step that fails after this call (e.g.
        on an out-of-range action) leaves them unchanged. With ``"nearest"`` this costs no host sync (the
        mapping is a ``where``); ``"refuse"`` pays one to know whether to raise.
        """
        masks, combined = self._decision_masks(t, level, equity)
        xp = _xp(combined)
        rows = self._batch_rows(len(t))
        valid = combined[rows, actions]
        if self.invalid_action == "refuse" and not bool(valid.all()):
            i = int(np.flatnonzero(~np.asarray(valid.tolist()))[0])
            a = int(actions[i])
            rules = [k for k, m in masks.items() if not bool(m[i, a])]
            raise ValueError(
                f"step: action {a} (level {float(self.levels[a])}) of env {i} is masked by rule(s) {rules} at "
                f"bar t={int(t[i])}; the env is unchanged"
            )
        if masks:  # per rule (R, N, A): the chosen actions it masked, the rows where it masked any level
            stacked = xp.stack(list(masks.values()))
            self._pending_counts = ((~stacked[:, rows, actions]).sum(1), (~stacked.all(2)).sum(1))
        if self.invalid_action == "nearest":
            if self._nearest is not None:  # the table holds where(valid, a, nearest_valid(a)) for every mask row
                return self._nearest[(combined * self._bits).sum(1), actions]
            actions = xp.where(valid, actions, nearest_valid(actions, combined, self.levels))
        return actions

    def counts(self, key: str = "counts") -> dict[str, int]:
        """``{rule: count}`` of the ``"counts"`` or ``"binding"`` counter."""
        return dict(zip(self.names, (int(v) for v in self.state[key].tolist()), strict=True))


def _same_decision(cached: tuple[Any, ...], *tensors: Any) -> bool:
    """Whether ``tensors`` are the very tensors of ``cached`` (:meth:`Masker.action_masks`' key), unchanged since:
    the env replaces its state tensors at every step, and an in-place change bumps ``_version``."""
    return all(x is old and x._version == version for x, (old, version) in zip(tensors, cached, strict=True))


def nearest_valid(actions: Any, mask: Any, levels: Any) -> Any:
    """Per row the valid level nearest in weight to ``levels[actions]``; ties go to smaller ``|w|``, then the lower
    index: the key is ``(|w_a - w_chosen|, |w_a|, a)`` minimised over valid ``a``."""
    xp = _xp(mask)
    inf = float("inf")
    dist = xp.abs(levels[None, :] - levels[actions][:, None])
    dist = xp.where(mask, dist, inf)
    best = dist.min(1) if xp is np else dist.min(1).values
    candidates = mask & (dist <= best[:, None] + _TOL)
    size = xp.where(candidates, xp.abs(levels)[None, :], inf)
    return xp.argmin(size, 1)


def nearest_table(levels: Any) -> tuple[Any, Any]:
    """The ``"nearest"`` map of :meth:`Masker.apply` as a lookup table over every mask row of ``A`` levels:
    ``(bits, table)`` with ``bits = 2**a`` per level and ``table[sum(row * bits), a]`` = ``a`` where ``row[a]``,
    else :func:`nearest_valid` (``a`` itself on the empty row, which :meth:`Masker.combine` never lets through).
    Built with the same function, so the table and the formula cannot differ; one gather replaces its ~15 ops."""
    num_levels = len(levels)
    bits = 2 ** torch.arange(num_levels, device=levels.device)
    codes = torch.arange(2**num_levels, device=levels.device)
    rows = (codes[:, None] & bits[None, :]) != 0  # (2^A, A): the mask row of each code
    actions = torch.arange(num_levels, device=levels.device)
    grid_rows, grid_actions = rows.repeat_interleave(num_levels, 0), actions.repeat(2**num_levels)
    valid = grid_rows[torch.arange(len(grid_actions)), grid_actions]
    safe_rows = grid_rows | ~grid_rows.any(1, keepdim=True)  # the empty row: every level "valid", a maps to a
    nearest = torch.where(valid, grid_actions, nearest_valid(grid_actions, safe_rows, levels))
    return bits, nearest.reshape(2**num_levels, num_levels)


def make_masker(
    close: np.ndarray, features: np.ndarray, positions: np.ndarray, masks: MaskConfig | None,
    inputs: MaskInputs | None, num_envs: int, invalid_action: InvalidAction, device: torch.device | None,
) -> Masker | None:
    """An env's :class:`Masker` (None without masks); ``inputs`` default to :meth:`MaskInputs.build` on the
    market's closes and features (EWMA volatility, the configured regime column)."""
    if masks is None:
        if inputs is not None:
            raise ValueError("mask_inputs given without masks=MaskConfig(...)")
        return None
    inputs = inputs if inputs is not None else MaskInputs.build(masks, close, features)
    return Masker(masks, positions, inputs, num_envs, invalid_action, device)
