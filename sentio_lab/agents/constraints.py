"""Controllers that set loss coefficients between PPO iterations: the PID Lagrangian and the adaptive KL penalty.

Both are small state machines fed one measurement per iteration; their state is plain floats, saved in a
checkpoint by :meth:`state_dict` and restored by :meth:`load_state_dict`, so a resumed run continues with
exactly the multiplier and coefficient it stopped with.

* :class:`PIDLagrangian` (Stooke, Achiam and Abbeel, 2020, "Responsive Safety in Reinforcement Learning by PID
  Lagrangian Methods", Algorithm 2): for a constraint ``J_c <= limit`` with error ``e = J_c - limit``,
  ``I <- max(0, I + e)`` and ``lambda = max(0, Kp e + Ki I + Kd max(0, J_c - J_c_prev))``. The integral is
  kept non-negative (the paper's anti-windup: a long stretch under the limit must not bank credit that lets
  the policy overshoot later); the derivative term acts only on rising cost, as in the paper, so it damps
  overshoot without pulling lambda up while the cost falls. With ``Kp = Kd = 0`` it is the classic
  gradient-ascent Lagrangian with step ``Ki``.
* :class:`AdaptiveKL` (Schulman et al., 2017, PPO paper section 4): after each policy update with measured
  ``d = KL(old || new)``, the penalty coefficient is doubled when ``d > 1.5 target`` and halved when
  ``d < target / 1.5``.

Hand-written: the formulas are one line each and the safety libraries that have them (OmniSafe, safety-gym's
starter agents) are whole frameworks with their own trainers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class PIDLagrangian:
    """PID-controlled Lagrange multiplier for ``J_c <= limit`` (module doc); one :meth:`update` per iteration."""

    limit: float
    """the constraint's threshold d"""
    kp: float = 1.0
    """proportional gain"""
    ki: float = 1.0
    """integral gain"""
    kd: float = 0.0
    """derivative gain (on the rise of the measured cost)"""
    integral: float = 0.0
    """I: running sum of the errors, clamped at 0"""
    previous: float | None = None
    """the last measurement J_c (None before the first)"""
    error: float = 0.0
    """the last error e = J_c - limit"""
    p_term: float = 0.0
    """Kp e of the last update"""
    i_term: float = 0.0
    """Ki I of the last update"""
    d_term: float = 0.0
    """Kd max(0, J_c - J_c_prev) of the last update"""
    multiplier: float = 0.0
    """lambda = max(0, P + I + D) of the last update (0 before the first)"""
    updates: int = 0
    """measurements taken so far"""
    skipped: int = 0
    """iterations without a measurement (no episode finished): the state was held, see :meth:`update`"""

    def update(self, measured: float | None) -> float:
        """Take one measurement ``J_c`` and return the new multiplier.

        ``None`` (or NaN) means no episode finished in the iteration, so there is nothing to measure: the
        multiplier and the PID state are held as they are (integrating a guess would be worse than waiting:
        the error of unmeasured episodes is unknown), and ``skipped`` counts it.
        """
        if measured is None or not math.isfinite(measured):
            self.skipped += 1
            return self.multiplier
        self.error = measured - self.limit
        self.integral = max(0.0, self.integral + self.error)
        rise = 0.0 if self.previous is None else max(0.0, measured - self.previous)
        self.p_term, self.i_term, self.d_term = self.kp * self.error, self.ki * self.integral, self.kd * rise
        self.multiplier = max(0.0, self.p_term + self.i_term + self.d_term)
        self.previous = measured
        self.updates += 1
        return self.multiplier

    def state_dict(self) -> dict[str, float | int | None]:
        """All fields as plain python values (gains included, so a checkpoint says how lambda was made)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        """Restore :meth:`state_dict` output (the gains and the limit too)."""
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class AdaptiveKL:
    """Adaptive KL penalty coefficient (module doc); one :meth:`update` per policy update."""

    coef: float = 0.2
    """the current penalty coefficient beta (the initial one until the first update)"""
    target: float = 0.01
    """the KL the coefficient steers towards"""
    last_kl: float = float("nan")
    """the last measured KL"""

    def update(self, kl: float) -> float:
        """Double beta when ``kl > 1.5 target``, halve it when ``kl < target / 1.5``; return the new beta."""
        self.last_kl = float(kl)
        if kl > 1.5 * self.target:
            self.coef *= 2.0
        elif kl < self.target / 1.5:
            self.coef /= 2.0
        return self.coef

    def state_dict(self) -> dict[str, float]:
        """All fields as plain python floats."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` output."""
        for name, value in state.items():
            setattr(self, name, value)
