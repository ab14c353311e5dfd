"""Validation-gated deviation (issue 19 s3): a cell keeps its tilt only where it beat the benchmark on the fold's
validation slice by the declared margin; otherwise it is the benchmark on the test groups, bit for bit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.training import num_actions
from sentio_lab.agents.variants import agent_obs_dim, env_options, load_variant, parse_variant_args
from sentio_lab.data import load_market, to_market
from sentio_lab.env import splits as splitting
from sentio_lab.env.anchor import AnchorConfig
from sentio_lab.env.benchmarks import benchmark_weights
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import prepare_fold_market
from sentio_lab.evaluation.baselines import evaluate_baseline
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig, load_config
from sentio_lab.experiment.gate import (
    GATES_FILE,
    ZeroTiltPolicy,
    gate_keeps,
    gate_summary,
    gate_table,
    gated_name,
    gated_policy,
    validation_gate,
)
from sentio_lab.experiment.runner import EQUITY_FILE, plan_experiment, run_experiment
from sentio_lab.experiment.summary import infer
from tests.evaluation.test_baselines import prepared

COSTS = CostModel(fee_bps=5.0, slippage_bps=5.0)
POSITIONS = (-1.0, 0.0, 1.0)
TILTS = (-2.0, 0.0)  # around buy-and-hold (weight 1): -2 is short, clipped to -1; 0 is the benchmark
ACC = {"window": 4, "positions": POSITIONS, "costs": COSTS}


class ConstantAction(torch.nn.Module):
    """Always the same action: a planted policy."""

    def __init__(self, action: int) -> None:
        super().__init__()
        self.action = action

    def act_greedy(self, obs, mask=None):
        return torch.full((obs.shape[0],), self.action, dtype=torch.long)


def planted(validation_drift: float, n: int = 600, seed: int = 0):
    """A market (train 40%, validation 20%, test 40%) whose validation bars drift by ``validation_drift`` per bar;
    elsewhere a plain random walk. Anchored on buy-and-hold with tilts (-2, 0): action 0 is short."""
    rng = np.random.default_rng(seed)
    returns = rng.normal(0.0, 0.01, n)
    returns[int(0.4 * n):int(0.6 * n)] += validation_drift
    close = 100 * np.exp(np.cumsum(returns))
    opens = np.concatenate([[100.0], close[:-1]])
    frame = pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.001,
                          "low": np.minimum(opens, close) * 0.999, "close": close, "volume": 1e6},
                         index=pd.bdate_range("2010-01-04", periods=n, name="timestamp"))
    market = prepared(frame)
    anchor = AnchorConfig(benchmark_weights("buy_and_hold", market), tilts=TILTS)
    return market, {"anchor": anchor}


def gate(market, options, margin, agent=None):
    agent = agent or ConstantAction(0)
    return validation_gate(agent, market, margin=margin, zero_action=options["anchor"].zero_action,
                           env_options=options, **ACC)


def test_the_margin_is_strict_and_undefined_sharpe_counts_as_cash():
    assert not gate_keeps(1.5, 1.0, 0.5)  # exactly the margin: falls back
    assert gate_keeps(1.5, 1.0, 0.4999)
    assert not gate_keeps(1.0, 1.0, 0.0)  # a tie falls back
    assert gate_keeps(1.0, 1.5, -0.6)  # a negative margin keeps a tilt that lost by less than it
    assert gate_keeps(float("nan"), -0.25, 0.2) and not gate_keeps(float("nan"), -0.25, 0.25)
    assert not gate_keeps(0.1, float("nan"), 0.1)


def test_validation_favouring_the_benchmark_falls_back_and_the_test_groups_are_the_benchmark():
    market, options = planted(+0.004)  # a rising validation slice: long (the benchmark) beats short
    decision = gate(market, options, margin=0.1)
    assert decision.benchmark_sharpe > 3 and decision.agent_sharpe < -3 and decision.fallback
    policy = gated_policy(ConstantAction(0), decision, options["anchor"].zero_action)
    (test,), = evaluate_policies([policy], market, ["test"], env_options=options, **ACC)
    baseline = evaluate_baseline("buy_and_hold", market, range_name="test", **ACC)
    pd.testing.assert_series_equal(test.equity, baseline.equity, check_exact=True)
    pd.testing.assert_series_equal(test.weights, baseline.weights, check_exact=True)


def test_validation_favouring_the_agent_keeps_its_tilt_on_the_test_groups():
    market, options = planted(-0.004)  # a falling validation slice: short beats long
    decision = gate(market, options, margin=0.1)
    assert decision.agent_sharpe > 3 and decision.benchmark_sharpe < -3 and decision.keep
    agent = ConstantAction(0)
    (gated, alone), = zip(*evaluate_policies([gated_policy(agent, decision, 1), agent], market, ["test"],
                                             env_options=options, **ACC), strict=True)
    pd.testing.assert_series_equal(gated.equity, alone.equity, check_exact=True)
    assert (gated.weights == -1.0).all()  # short: not the benchmark


def test_the_measured_difference_is_the_boundary():
    market, options = planted(-0.004)
    first = gate(market, options, margin=0.0)
    difference = first.agent_sharpe - first.benchmark_sharpe
    assert gate(market, options, margin=difference).fallback  # at the margin: falls back
    assert gate(market, options, margin=math.nextafter(difference, -math.inf)).keep  # just below it: kept


def test_the_gate_refuses_what_it_cannot_decide():
    market, options = planted(0.0)
    with pytest.raises(ValueError, match="not anchored"):
        validation_gate(ConstantAction(0), market, margin=0.1, zero_action=1, env_options={}, **ACC)
    with pytest.raises(ValueError, match="must be finite"):
        gate(market, options, margin=float("inf"))
    no_validation = dataclasses.replace(market, splits={k: v for k, v in market.splits.items() if k != "validation"})
    with pytest.raises(ValueError, match="set validation_bars"):
        gate(no_validation, options, margin=0.1)
    assert ZeroTiltPolicy(3).act_greedy(torch.zeros(2, 5)).tolist() == [3, 3]


# ------------------------------------------------------------------------------------------- leakage
ANCHORED = ("--anchor", "buy_and_hold", "--tilts", "-0.5", "0", "0.5", "--window", "4", "--hidden-size", "8")


def test_perturbing_test_group_bars_never_changes_the_gate():
    """CPCV fold whose test group lies before the validation slice (and one after): scaling every price of the
    test-group bars changes the agent's test episodes, and leaves both validation Sharpe ratios bit for bit."""
    frame = load_market("nasdaq", end="2004-12-31").frame.iloc[:900]
    args = parse_variant_args("ppo", ANCHORED)
    module = load_variant("ppo")
    config = module.feature_config(args)
    gaps = splitting.PurgeEmbargo.for_features(4, config, frame)
    folds = splitting.combinatorial_purged(len(frame), gaps, n_groups=4, n_test_groups=2, first_valid=60)
    fold = next(f for f in folds if f.test[0][1] < f.train[-1][0] and f.groups[-1] != 3)
    rng = np.random.default_rng(1)
    test_rows = np.concatenate([np.arange(a, b) for a, b in fold.test])
    perturbed = frame.copy()
    for column in ("open", "high", "low", "close"):
        perturbed.iloc[test_rows, perturbed.columns.get_loc(column)] *= rng.uniform(0.8, 1.25, len(test_rows))
    perturbed["high"] = perturbed[["open", "high", "low", "close"]].max(axis=1)
    perturbed["low"] = perturbed[["open", "high", "low", "close"]].min(axis=1)
    decisions, tests, tilted = [], [], []
    for data in (frame, perturbed):
        market = prepare_fold_market(to_market(data, name="n"), fold, feature_config=config, validation_bars=60)
        torch.manual_seed(0)
        agent = module.build_agent(args, agent_obs_dim(args, market), num_actions(args)).eval()
        head = [m for m in agent.actor.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():  # an untrained anchored agent always takes the zero tilt: redraw its head so its
            torch.nn.init.normal_(head.weight, std=2.0)  # decisions read the observations (else a leak into them
            head.bias.zero_()  # could not move the gate)
        options = env_options(args, market)
        kwargs = {"window": 4, "positions": tuple(args.env.positions), "costs": module.cost_model(args)}
        decisions.append(validation_gate(agent, market, margin=0.1, zero_action=options["anchor"].zero_action,
                                         env_options=options, **kwargs))
        (validation,), = evaluate_policies([agent], market, ["validation"], env_options=options, **kwargs)
        tilted.append(validation.weights)
        (test,), = evaluate_policies([agent], market, [f"test:{fold.groups[0]}"], env_options=options, **kwargs)
        tests.append(test.equity)
    assert decisions[0] == decisions[1]
    assert decisions[0].agent_sharpe != decisions[0].benchmark_sharpe  # the agent's own decisions were judged
    assert tilted[0].nunique() > 1  # it deviates from buy-and-hold on the validation slice
    assert not tests[0].equals(tests[1])  # the perturbation reached the test episodes


# ---------------------------------------------------------------------------------------------- runner
TINY = ("--total-timesteps", "512", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "2", "--hidden-size", "8", "--learning-rate", "0.02", "--anchor", "buy_and_hold",
        "--tilts", "-1", "0", "1")


def config_for(folder, margin):
    return ExperimentConfig(
        name="gate", dataset=str(folder / "nasdaq.csv"), split="walk_forward", n_groups=2, seeds=(1, 2),
        baselines=("buy_and_hold",), random_seeds=1, validation_bars=40,
        common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", str(folder / "cache")),
        agents=(AgentSpec("anch", "ppo", TINY, gate_margin=margin),),
    )


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One run gated at a margin no cell clears, then the same run (cells reused) at a margin every cell clears."""
    folder = tmp_path_factory.mktemp("gate")
    load_market("nasdaq", end="2004-12-31").frame.iloc[:1000].to_csv(folder / "nasdaq.csv")
    output = folder / "run"
    out = {}
    for margin in (1e9, -1e9):
        plan = plan_experiment(config_for(folder, margin))
        results = run_experiment(plan, output, progress=False)
        out[margin] = (plan, results, pd.read_parquet(output / EQUITY_FILE), pd.read_parquet(output / GATES_FILE))
    return out


def curves_of(curves, name, seed):
    rows = curves[(curves["name"] == name) & (curves["seed"] == seed)]
    return rows.sort_values(["path", "timestamp"])["equity"].to_numpy()


def test_every_cell_falls_back_when_no_tilt_clears_the_margin(ran):
    plan, results, curves, gates = ran[1e9]
    assert gates["fallback"].all() and len(gates) == len(plan.cells)  # one decision per seed x fold
    assert set(gates["name"]) == {"anch"} and (gates["margin"] == 1e9).all()
    benchmark = curves_of(curves, "buy_and_hold", -1)
    for seed in plan.config.seeds:
        assert np.array_equal(curves_of(curves, gated_name("anch"), seed), benchmark)  # bit for bit
    assert gate_table(gates).loc["anch", "fallback_rate"] == 1.0
    assert "fell back to the benchmark in 100% of 4 cells" in gate_summary(gates)


def test_every_cell_keeps_its_tilt_when_the_margin_lets_it(ran):
    plan, results, curves, gates = ran[-1e9]
    assert not gates["fallback"].any() and gate_table(gates).loc["anch", "fallback_rate"] == 0.0
    deviates = False
    for seed in plan.config.seeds:
        mine = curves_of(curves, "anch", seed)
        assert np.array_equal(curves_of(curves, gated_name("anch"), seed), mine)
        deviates |= not np.array_equal(mine, curves_of(curves, "buy_and_hold", -1))
    assert deviates  # the trained agent tilts somewhere, so keeping and falling back differ
    # the decisions' Sharpe ratios do not depend on the margin: only the verdict does
    before = ran[1e9][3]
    pd.testing.assert_frame_equal(before[["agent_sharpe", "benchmark_sharpe"]], gates[["agent_sharpe",
                                                                                        "benchmark_sharpe"]])


def test_the_gated_strategy_is_one_more_trial(ran):
    plan, results, curves, _ = ran[-1e9]
    assert plan.config.n_trials == 2 and (results["n_trials"] == 2).all()
    assert set(results["name"]) == {"anch", gated_name("anch"), "buy_and_hold"}
    found = infer(results, curves, gated_name("anch"), reps=100)
    assert found.n_trials == 2 and found.runs == 2


def test_the_command_line_reports_the_fallback_rate(ran, capsys):
    """The same experiment as a TOML file through ``python -m sentio_lab.experiment`` (every cell reused)."""
    from sentio_lab.experiment.__main__ import main

    plan = ran[-1e9][0]
    config = plan.config
    folder = Path(config.dataset).parent
    quoted = ", ".join(f'"{a}"' for a in config.agents[0].args)
    common = ", ".join(f'"{a}"' for a in config.common_args)
    (folder / "run.toml").write_text(
        f'name = "run"\ndataset = "{config.dataset}"\nsplit = "walk_forward"\nn_groups = 2\nseeds = [1, 2]\n'
        f'baselines = ["buy_and_hold"]\nrandom_seeds = 1\nvalidation_bars = 40\ncommon_args = [{common}]\n'
        f'[agents.anch]\nvariant = "ppo"\nargs = [{quoted}]\ngate_margin = 1e9\n')
    main(["--config", str(folder / "run.toml"), "--output-root", str(folder), "--no-progress", "--no-track"])
    assert "anch_gated: fell back to the benchmark in 100% of 4 cells" in capsys.readouterr().out


def test_config_and_plan_refuse_a_gate_they_cannot_run(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('name = "e"\nvalidation_bars = 20\n[agents.a]\nargs = []\ngate_margin = 0.1\n')
    assert load_config(path).agents[0].gate_margin == 0.1 and load_config(path).n_trials == 2
    with pytest.raises(ValueError, match="gate_margin needs a validation slice"):
        ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo", gate_margin=0.1),))
    with pytest.raises(ValueError, match="must be a finite number"):
        ExperimentConfig(name="x", validation_bars=20, agents=(AgentSpec("a", "ppo", gate_margin=float("nan")),))
    with pytest.raises(ValueError, match=r"\['a_gated'\] are taken by gated strategies"):
        ExperimentConfig(name="x", validation_bars=20,
                         agents=(AgentSpec("a", "ppo", gate_margin=0.1), AgentSpec("a_gated", "ppo")))
    folder = tmp_path
    load_market("nasdaq", end="2004-12-31").frame.iloc[:600].to_csv(folder / "nasdaq.csv")
    config = config_for(folder, 0.1)
    unanchored = dataclasses.replace(config.agents[0], args=TINY[:-6])
    with pytest.raises(ValueError, match="has gate_margin but no --anchor"):
        plan_experiment(dataclasses.replace(config, agents=(unanchored,)))
