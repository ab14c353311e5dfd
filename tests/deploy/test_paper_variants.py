"""Paper trading of masked and benchmark-anchored models (issue 21 s4): backtest parity on a real file, and the
mask state rebuilt from the ledger after restarts.

* a ``ppo_masked`` model with stateless rules (long-only, EWMA risk budget) and every stateful one (drawdown guard,
  cool-down, trade limit per window; each binds on this feed, checked): at every bar the ledger's equity equals
  ``evaluate_policy`` with the variant's masks on the same bars, to 1e-9, and every order's target equals the
  backtest's weight;
* the same account traded with a restart (a new trader, nothing in memory) every few bars, and with ``kill -9``
  at points inside bars: the ledger equals the uninterrupted run's, row for row (the mask state is replayed from
  the ledger, :class:`~sentio_lab.deploy.paper_decisions.MaskReplay`);
* an anchored ``ppo`` model (``--anchor sma_crossover`` with a no-trade band): the benchmark weight comes from the
  feed's bars by the env's rule, the orders' targets are ``clip(b_t + tilt)``, and the equity equals the backtest's;
* refusals, one line each: the GARCH risk budget, the ``vol_target`` anchor, token timeframes.

The tiny models are trained for 384 steps; the actor's last layer is then redrawn with a fixed seed (the checkpoint
re-saved), so the greedy policy trades often and the rules bind: parity over a policy that never trades would
prove little.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint, save_checkpoint
from sentio_lab.agents.variants import action_masking, env_options, load_trained, load_variant
from sentio_lab.data import load_market
from sentio_lab.deploy import paper_decisions
from sentio_lab.deploy.ledger import TABLES, Ledger, Mark
from sentio_lab.deploy.paper import CRASH_ENV, CheckpointDecider, MaskReplay, PaperError, PaperTrader
from sentio_lab.env.mask_inputs import MaskInputs
from sentio_lab.env.masks import MaskConfig, Masker
from sentio_lab.evaluation.episodes import evaluate_policy

#: Stateless rules and every stateful one: the state (peak, guard, since_trade, period_trades) must come back
#: from the ledger for the decisions to equal the backtest's.
RULES = MaskConfig(long_only=True, risk_budget=0.012, drawdown_threshold=0.04, recover_threshold=0.0, cooldown=4,
                   max_trades=3, period_bars=12)
#: The same with a risk budget that binds on this feed (the drawdown guard then does not): its volatility input
#: read one bar late changes decisions, so parity checks the mask inputs' timing too.
RISK_RULES = dataclasses.replace(RULES, risk_budget=0.011)
#: The rules of each masked account that must bind on the feed (removing one changes the backtest).
BINDING = {"rules": (dict(cooldown=0), dict(max_trades=0, period_bars=0), dict(drawdown_threshold=None),
                     dict(period_bars=13)),
           "risk_rules": (dict(risk_budget=None), dict(cooldown=0), dict(max_trades=0, period_bars=0))}
MASKED_BARS = 160  # real sp500 bars: 27 of warm-up and window, then ~130 decisions
ANCHORED_BARS = 330  # sma_crossover needs 200 closes: b_t is 0 before, then 1, then 0 after the December 2018 cross


def tiny_checkpoint(folder, variant: str, seed: int = 7, **extra) -> str:
    """A tiny run of ``variant`` on sp500 (hidden size 8, window 8, 384 steps), its actor head redrawn with
    ``seed`` (module doc) and saved as ``redrawn.pt``: that checkpoint's path."""
    module = load_variant(variant)
    args = module.Args.from_flat(
        total_timesteps=384, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, hidden_size=8, window=8,
        episode_length=24, track=False, progress=False, run_dir=str(folder), run_name=variant, checkpoint_every=0,
        feature_cache_dir=str(folder / "cache"), **extra)
    bundle = dict(load_checkpoint(module.train(args).checkpoint_path))
    bundle.pop("format_version")
    head = sorted(k for k in bundle["agent"] if k.startswith("actor.") and k.endswith(".weight"))[-1]
    generator = torch.Generator().manual_seed(seed)
    agent = dict(bundle["agent"])
    agent[head] = torch.randn(agent[head].shape, generator=generator) * 2.0
    agent[head.replace(".weight", ".bias")] = torch.zeros(agent[head].shape[0])
    bundle["agent"] = agent
    return str(save_checkpoint(folder / "redrawn.pt", bundle))


def feed_file(folder, bars: int):
    """The last ``bars`` bars of the bundled sp500 dataset, as a CSV feed."""
    path = folder / f"sp500_tail_{bars}.csv"
    load_market("sp500").frame.iloc[-bars:].to_csv(path)
    return path


def backtest(checkpoint, feed_path):
    """evaluate_policy of the checkpoint's agent over every bar of the feed, with the variant's masks and anchor."""
    trained = load_trained(checkpoint, dataset=feed_path)
    variant = load_variant(trained.bundle["variant"])
    return evaluate_policy(trained.agent, trained.market, window=trained.args.features.window,
                           positions=tuple(trained.args.env.positions), costs=variant.cost_model(trained.args),
                           bars=(0, len(trained.market.data.frame)),
                           env_options=env_options(trained.args, trained.market), **action_masking(trained.args))


def trade(checkpoint, feed_path, ledger_path, account="paper"):
    """Run a trader over the whole feed; the ledger's rows of ``account``."""
    trader = PaperTrader(checkpoint, feed_path, ledger_path, account=account)
    try:
        trader.run()
        return trader.ledger.dump(account)
    finally:
        trader.close()


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """A tiny ppo_masked model under RULES (redrawn head) and its feed."""
    folder = tmp_path_factory.mktemp("masked")
    return tiny_checkpoint(folder, "ppo_masked", masks=RULES), feed_file(folder, MASKED_BARS)


@pytest.fixture(scope="module")
def masked_risk(masked):
    """The same weights under RISK_RULES (the checkpoint re-saved with those masks) and the same feed."""
    checkpoint, feed = masked
    bundle = dict(load_checkpoint(checkpoint))
    bundle.pop("format_version")
    bundle["args"] = {**bundle["args"], "masks": dataclasses.asdict(RISK_RULES)}
    return str(save_checkpoint(feed.parent / "risk_rules.pt", bundle)), feed


@pytest.fixture(scope="module")
def masked_reference(masked, tmp_path_factory):
    """The uninterrupted paper run of the masked model: its ledger rows."""
    checkpoint, feed = masked
    return trade(checkpoint, feed, tmp_path_factory.mktemp("reference") / "ledger.db")


def assert_parity(rows, expected, first_bar):
    """The ledger's equity equals the backtest's at every bar (1e-9), and the orders' targets its weights."""
    equity = np.array([row[3] for row in rows["equity"]])
    bars = [row[1] for row in rows["equity"]]
    assert bars[0] == expected.start == first_bar and len(equity) == len(expected.equity)
    np.testing.assert_allclose(equity, expected.equity.to_numpy(), rtol=0, atol=1e-9)
    targets = np.array([row[4] for row in rows["orders"]])[:-1]  # the last order is decided at the last bar
    assert np.array_equal(targets, expected.weights.to_numpy())


@pytest.mark.slow
@pytest.mark.parametrize("rules", ["rules", "risk_rules"])
def test_a_masked_account_equals_the_masked_backtest_at_every_bar(rules, masked, masked_risk, masked_reference,
                                                                    tmp_path):
    checkpoint, feed = masked if rules == "rules" else masked_risk
    config = RULES if rules == "rules" else RISK_RULES
    rows = masked_reference if rules == "rules" else trade(checkpoint, feed, tmp_path / "ledger.db")
    expected = backtest(checkpoint, feed)
    assert_parity(rows, expected, 27)
    weights = expected.weights.to_numpy()
    assert (weights >= 0).all() and len(set(weights.tolist())) >= 2  # long-only held, and the policy trades
    # the stateful rules bound: the unmasked policy over the same bars trades otherwise
    trained = load_trained(checkpoint, dataset=feed)
    variant = load_variant("ppo_masked")
    unmasked = evaluate_policy(trained.agent, trained.market, window=8, positions=tuple(trained.args.env.positions),
                               costs=variant.cost_model(trained.args), bars=(0, len(trained.market.data.frame)))
    assert not np.array_equal(unmasked.weights.to_numpy(), weights)
    # the rules bind (the state read back from the ledger, the inputs of bar t decide): without one the backtest
    # trades otherwise
    for off in BINDING[rules]:
        fewer = evaluate_policy(trained.agent, trained.market, window=8, positions=tuple(trained.args.env.positions),
                                costs=variant.cost_model(trained.args), bars=(0, len(trained.market.data.frame)),
                                masks=dataclasses.replace(config, **off))
        assert not np.array_equal(fewer.weights.to_numpy(), weights), off
    decider = CheckpointDecider(checkpoint)
    market = decider.market(load_market("sp500").frame.iloc[-60:], "bars")
    held = Mark(bar=59, time="t", level=1, shares=0.0, weight=0.0, pending=False, cash=1.0, borrow=0.0, equity=1.0,
                peak=1.0, max_drawdown=0.0)
    with pytest.raises(ValueError, match="decides with its mask state"):
        decider.decide(market, held)  # never without the state replayed from the ledger


@pytest.mark.slow
def test_the_mask_state_is_rebuilt_from_the_ledger_after_every_restart(masked, masked_reference, tmp_path):
    """A new trader (nothing in memory) every 9 bars on a growing feed: the same ledger as the uninterrupted run."""
    checkpoint, _ = masked
    frame = load_market("sp500").frame.iloc[-MASKED_BARS:]
    own, ledger = tmp_path / "growing.csv", tmp_path / "ledger.db"
    for stop in [*range(30, MASKED_BARS, 9), MASKED_BARS]:
        frame.iloc[:stop].to_csv(own)
        trader = PaperTrader(checkpoint, own, ledger)
        try:
            trader.run()
        finally:
            trader.close()
    with Ledger(ledger) as opened:
        got = opened.dump("paper")
    for name in TABLES[1:]:
        assert got[name] == masked_reference[name], name


@pytest.mark.slow
def test_kill_9_inside_bars_of_a_masked_account_and_restart_gives_the_uninterrupted_ledger(masked, masked_reference,
                                                                                              tmp_path):
    checkpoint, feed = masked
    ledger = tmp_path / "crashed.db"
    command = [sys.executable, "-m", "sentio_lab.deploy.paper", "--model", checkpoint, "--feed", str(feed),
               "--account", str(ledger)]
    for point, bar in (("decide", 40), ("write:equity", 41), ("fill", 77), ("commit", 78), ("sent", 120)):
        env = {**os.environ, CRASH_ENV: f"{point}@{bar}"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, (point, bar, done.stderr)
    assert subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == 0
    with Ledger(ledger) as opened:
        got = opened.dump("paper")
    for name in TABLES[1:]:
        assert got[name] == masked_reference[name], name


def test_the_mask_replay_refuses_a_ledger_with_holes(tmp_path):
    class Holes:  # a ledger whose positions skip a bar
        @staticmethod
        def table(name, account):
            return pd.DataFrame({"bar": [5, 7], "level": [1, 2], "equity": [1.0, 1.01]})  # bar 6 missing

    masker = Masker(MaskConfig(cooldown=3), np.array([-1.0, 0.0, 1.0]), MaskInputs(), 1)
    mark = Mark(bar=8, time="t", level=2, shares=0.0, weight=1.0, pending=False, cash=1.0, borrow=0.0, equity=1.0,
                peak=1.0, max_drawdown=0.0)
    with pytest.raises(PaperError, match="not every bar from 5 to 7"):
        MaskReplay().advance(masker, Holes(), "paper", 5, mark)


# ---------------------------------------------------------------------------------------------------- anchored
@pytest.fixture(scope="module")
def anchored(tmp_path_factory):
    """A tiny ppo model anchored on sma_crossover with a no-trade band (redrawn head) and its feed."""
    folder = tmp_path_factory.mktemp("anchored")
    checkpoint = tiny_checkpoint(folder, "ppo", seed=3, anchor="sma_crossover", no_trade_band=0.3,
                                 tilts=(-0.5, -0.25, 0.0, 0.25, 0.5))
    return checkpoint, feed_file(folder, ANCHORED_BARS)


@pytest.mark.slow
def test_an_anchored_account_equals_the_anchored_backtest_at_every_bar(anchored, tmp_path):
    checkpoint, feed = anchored
    rows = trade(checkpoint, feed, tmp_path / "ledger.db")
    expected = backtest(checkpoint, feed)
    assert_parity(rows, expected, 27)
    trained = load_trained(checkpoint, dataset=feed)
    benchmark = env_options(trained.args, trained.market)["anchor"].benchmark
    decided = benchmark[expected.start : expected.start + len(expected.weights)]
    assert set(decided.tolist()) == {0.0, 1.0}  # the benchmark moved inside the feed (its 200-bar warm-up, a cross)
    tilts = expected.weights.to_numpy() - decided
    assert len(set(np.round(tilts, 12).tolist())) >= 3  # tilts, targets held inside the band: not the benchmark
    positions = [row[5] for row in rows["positions"]]
    orders = [row[4] for row in rows["orders"]]
    assert positions[1:] == orders[:-1]  # the weight held is the last order's target, read back from the ledger


@pytest.mark.slow
def test_an_anchored_account_restarted_every_few_bars_equals_the_uninterrupted_one(anchored, tmp_path):
    checkpoint, _ = anchored
    frame = load_market("sp500").frame.iloc[-ANCHORED_BARS:]
    own = tmp_path / "growing.csv"
    frame.to_csv(own)
    whole = trade(checkpoint, own, tmp_path / "whole.db")
    ledger = tmp_path / "restarted.db"
    for stop in (200, 230, 260, 261, 300, ANCHORED_BARS):
        frame.iloc[:stop].to_csv(own)
        trade(checkpoint, own, ledger)
    with Ledger(ledger) as opened:
        assert opened.dump("paper") == whole


def test_models_paper_trading_cannot_match_are_refused_in_one_line(tmp_path, monkeypatch):
    """GARCH risk budget, vol_target anchor, token timeframes: each fits on bars a feed has not delivered yet."""
    # the refusals come before anything is built from the bundle: a bundle of the arguments alone suffices
    cases = (
        ({"variant": "ppo_masked", "masks": MaskConfig(risk_budget=0.01, vol_model="garch")}, "GARCH risk budget"),
        ({"variant": "ppo", "anchor": "vol_target"}, "vol_target anchor"),
        ({"variant": "ppo_transformer", "token_timeframes": ("W-FRI",), "token_counts": (3,)}, "token timeframes"),
    )
    for flat, refusal in cases:
        variant = load_variant(flat["variant"])
        args = variant.Args.from_flat(**{k: v for k, v in flat.items() if k != "variant"})
        bundle = {"variant": flat["variant"], "args": dataclasses.asdict(args), "feature_state": {}}
        monkeypatch.setattr(paper_decisions, "load_checkpoint", lambda path, bundle=bundle: bundle)
        with pytest.raises(PaperError, match=refusal) as error:
            CheckpointDecider(tmp_path / "model.pt")
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_trader_loads_the_selected_weights_as_the_backtest_does(masked):
    """A run that selected on validation stands for its selected state (load_trained): the trader trades that."""
    checkpoint, feed = masked
    bundle = dict(load_checkpoint(checkpoint))
    bundle.pop("format_version")
    best = {name: value + 0.5 if value.is_floating_point() else value for name, value in bundle["agent"].items()}
    bundle["selection"] = {**(bundle.get("selection") or {}), "best_state": best}
    selected = save_checkpoint(feed.parent / "selected.pt", bundle)
    decider = CheckpointDecider(selected)
    agent = decider._agent(decider.market(load_market("sp500").frame.iloc[-60:], "bars"))
    for name, value in agent.state_dict().items():
        assert torch.equal(value, best[name]), name
    assert all(torch.equal(value, load_trained(selected, dataset=feed).agent.state_dict()[name])
               for name, value in agent.state_dict().items())
