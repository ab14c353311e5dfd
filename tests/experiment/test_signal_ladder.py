"""Slow, CI-sized: can default PPO learn a planted signal (sentio_lab.data.synthetic)?

Default ``sentio_lab.ppo.Args`` except the dataset (an 8,000-bar synthetic market), ``total_timesteps`` (CI-sized:
16,384, two iterations, against 200,000 by default) and tracking. Out of sample: trained on the first 60 % of the
bars, judged greedily on the last 20 % (1,600 bars), where the oracle runs through the same env on the same bars.
The figures at larger budgets and more seeds are in ``reports/signal_ladder`` (``experiments/signal_ladder.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sentio_lab import ppo
from sentio_lab.data.synthetic import BARS_PER_YEAR, OracleRule, ar1_for_sharpe
from sentio_lab.evaluation.baselines import PriceHistory, WeightPolicy, run_policy
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policy
from sentio_lab.evaluation.metrics import sharpe_ratio

pytestmark = pytest.mark.slow
STEPS = 16_384
N_BARS = 8000


def sharpe(evaluation: Evaluation) -> float:
    """Annualised Sharpe of the daily equity returns."""
    return sharpe_ratio(evaluation.equity.pct_change().dropna(), BARS_PER_YEAR)


def trained_and_oracle(rung: float, tmp_path: Path, seed: int = 1) -> tuple[float, float, int]:
    """(agent's test Sharpe, oracle's test Sharpe on the same bars, test bars) for default PPO at ``rung``."""
    market = ar1_for_sharpe(rung)
    csv = tmp_path / f"ar1_{rung:g}.csv"
    market.simulate(N_BARS, seed=0).frame.to_csv(csv)
    args = ppo.Args.from_flat(dataset=str(csv), seed=seed, total_timesteps=STEPS, track=False, progress=False,
                    feature_cache_dir=None, run_dir=str(tmp_path / "runs"))
    prepared = ppo.market_for(args)
    costs = ppo.cost_model(args)
    agent = ppo.train(args, market=prepared).agent
    test = evaluate_policy(agent, prepared, window=args.features.window, positions=args.env.positions, costs=costs)
    policy = WeightPolicy(OracleRule(market), PriceHistory.from_market(prepared), args.env.positions)
    (oracle,) = run_policy(policy, prepared, window=args.features.window, positions=args.env.positions, costs=costs)
    return sharpe(test), sharpe(oracle), len(test.weights)


def test_default_ppo_out_of_sample_sharpe_without_signal_is_indistinguishable_from_zero(tmp_path) -> None:
    agent, oracle, bars = trained_and_oracle(0.0, tmp_path)
    assert math.isnan(oracle) or oracle == 0  # the oracle of a market without signal is flat
    standard_error = math.sqrt((1 + agent**2 / (2 * BARS_PER_YEAR)) * BARS_PER_YEAR / bars)  # about 0.4
    assert abs(agent) < 1.96 * standard_error, f"test Sharpe {agent:.2f} on a market without signal"


@pytest.mark.xfail(strict=True, reason=(
    "goal not met: measured (reports/signal_ladder, 16,384 steps, seeds 1-3, 8,000 bars) default PPO earns "
    "-0.08, -0.15, 0.49 out of sample where the oracle earns 1.48 on the same bars (-5 %, -10 %, 33 %); "
    "an outside measurement at 200k steps, 5 seeds found ~24 %"))
def test_default_ppo_captures_half_the_oracle_at_sharpe_2(tmp_path) -> None:
    agent, oracle, _ = trained_and_oracle(2.0, tmp_path)
    assert oracle > 1.0  # the signal is there on these test bars
    assert agent >= 0.5 * oracle, f"captured {agent / oracle:.0%} of the oracle's {oracle:.2f}"
