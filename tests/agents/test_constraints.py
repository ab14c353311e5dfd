"""PID Lagrangian and adaptive KL controllers: each term against hand-worked numbers, holds, checkpoint round trips."""

import math

import pytest

from sentio_lab.agents.constraints import AdaptiveKL, PIDLagrangian


def test_proportional_term_alone_follows_the_error_and_is_floored_at_zero():
    pid = PIDLagrangian(limit=0.1, kp=2.0, ki=0.0, kd=0.0)
    assert pid.update(0.25) == pytest.approx(2.0 * 0.15)
    assert pid.error == pytest.approx(0.15) and pid.p_term == pytest.approx(0.3)
    assert pid.update(0.05) == 0.0  # under the limit: Kp e < 0, lambda floored at 0
    assert pid.p_term == pytest.approx(-0.1)


def test_integral_accumulates_errors_and_never_goes_negative():
    pid = PIDLagrangian(limit=0.1, kp=0.0, ki=1.0, kd=0.0)
    for measured, integral in [(0.3, 0.2), (0.2, 0.3), (0.0, 0.2), (-1.0, 0.0), (0.15, 0.05)]:
        pid.update(measured)
        assert pid.integral == pytest.approx(integral)  # max(0, I + e): the paper's anti-windup
        assert pid.multiplier == pytest.approx(integral)


def test_derivative_acts_on_a_rise_of_the_cost_only():
    pid = PIDLagrangian(limit=1.0, kp=0.0, ki=0.0, kd=3.0)
    assert pid.update(0.5) == 0.0 and pid.d_term == 0.0  # no previous measurement: no derivative
    assert pid.update(0.7) == pytest.approx(3.0 * 0.2)
    assert pid.update(0.6) == 0.0 and pid.d_term == 0.0  # falling cost: nothing


def test_full_pid_is_the_floored_sum_of_its_terms():
    pid = PIDLagrangian(limit=0.1, kp=1.0, ki=0.5, kd=2.0)
    pid.update(0.2)
    lam = pid.update(0.3)  # e = 0.2, I = 0.1 + 0.2 = 0.3, rise 0.1
    assert lam == pytest.approx(1.0 * 0.2 + 0.5 * 0.3 + 2.0 * 0.1)
    assert lam == pytest.approx(pid.p_term + pid.i_term + pid.d_term)
    assert pid.updates == 2 and pid.previous == 0.3


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_no_measurement_holds_the_multiplier_and_the_state(missing):
    pid = PIDLagrangian(limit=0.1, kp=1.0, ki=1.0, kd=1.0)
    pid.update(0.3)
    before = pid.state_dict()
    assert pid.update(missing) == before["multiplier"]
    after = pid.state_dict()
    assert after.pop("skipped") == 1 and {k: v for k, v in before.items() if k != "skipped"} == after


def test_pid_state_round_trip_continues_identically():
    a = PIDLagrangian(limit=0.05, kp=3.0, ki=2.0, kd=1.0)
    for x in (0.1, 0.02, 0.08):
        a.update(x)
    b = PIDLagrangian(limit=0.0)
    b.load_state_dict(a.state_dict())
    assert b == a
    assert [a.update(x) for x in (0.2, 0.01)] == [b.update(x) for x in (0.2, 0.01)]


def test_adaptive_kl_doubles_above_and_halves_below_the_band():
    kl = AdaptiveKL(coef=1.0, target=0.01)
    assert kl.update(0.02) == 2.0  # 0.02 > 1.5 * 0.01
    assert kl.update(0.016) == 4.0
    assert kl.update(0.012) == 4.0  # inside [target / 1.5, 1.5 target]: unchanged
    assert kl.update(0.007) == 4.0
    assert kl.update(0.006) == 2.0  # 0.006 < 0.01 / 1.5
    assert kl.update(0.0) == 1.0
    assert kl.last_kl == 0.0


def test_adaptive_kl_state_round_trip():
    a = AdaptiveKL(coef=0.3, target=0.02)
    a.update(1.0)
    b = AdaptiveKL()
    b.load_state_dict(a.state_dict())
    assert b.coef == 0.6 and b.target == 0.02 and b.last_kl == 1.0
    assert math.isnan(AdaptiveKL().last_kl)
