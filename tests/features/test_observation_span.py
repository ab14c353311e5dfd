"""The experiment runner's embargo covers the token blocks' reach (ppo_transformer's observation_span)."""

from __future__ import annotations

import dataclasses

import pytest

from sentio_lab import ppo_transformer
from sentio_lab.experiment.config import load_config
from sentio_lab.experiment.runner import plan_experiment
from sentio_lab.features.tokens import token_span

CONFIG = "experiments/configs/eurusd_1h_transformer_wf.toml"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """CPCV plans of the committed eurusd_1h config: both agents, and the MLP agent alone."""
    both = load_config(CONFIG, split="cpcv", n_groups=4, n_test_groups=2)
    mlp_only = dataclasses.replace(both, agents=tuple(a for a in both.agents if a.variant == "ppo"))
    return plan_experiment(both), plan_experiment(mlp_only)


def test_the_embargo_covers_the_token_reach(plans):
    both, mlp_only = plans
    transformer = next(a for a in both.config.agents if a.variant == "ppo_transformer")
    from sentio_lab.experiment.cells import parse_variant_args
    from sentio_lab.experiment.runner import agent_argv

    args = parse_variant_args("ppo_transformer", agent_argv(both.config, transformer.args))
    market = ppo_transformer.market_for(args)
    span = ppo_transformer.observation_span(args, market)
    # 10 daily tokens + the bank's lookback of daily bars reach further back than the MLP's 1D feature columns
    assert span > mlp_only.gaps.reach
    assert both.gaps.reach >= span and both.gaps.embargo > mlp_only.gaps.embargo
    assert both.gaps.reach >= mlp_only.gaps.reach  # the audit of every agent's training bars is no weaker
    assert both.gaps.purge == mlp_only.gaps.purge


def test_token_span_grows_by_a_day_of_bars_per_daily_token(plans):
    both, _ = plans
    transformer = next(a for a in both.config.agents if a.variant == "ppo_transformer")
    from sentio_lab.experiment.cells import parse_variant_args
    from sentio_lab.experiment.runner import agent_argv

    args = parse_variant_args("ppo_transformer", agent_argv(both.config, transformer.args))
    market = ppo_transformer.market_for(args)
    five, ten = (token_span(market, ("1D",), (k,)) for k in (5, 10))
    assert 5 * 20 <= ten - five <= 5 * 24 + 72  # hourly FX: ~24 bars a day (a weekend inside adds no bars)
    assert ppo_transformer.observation_span(args.replace(token_timeframes=(), token_counts=()),
                                            market) == 0
    with pytest.raises(ValueError, match="token timeframes but"):
        token_span(market, ("1D", "4h"), (3,))
