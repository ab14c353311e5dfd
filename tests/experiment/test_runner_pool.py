"""The experiment runner on a pool of instruments (``pool = [...]``): a pool of one is the plain runner, test-group
bars of any instrument never reach a training cell, the book and each instrument's numbers by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.experiment.__main__ import main
from sentio_lab.experiment.assembly import GROUPS_FILE, RESULTS_FILE, _path_stats, evaluation_folder
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig, load_config
from sentio_lab.experiment.groups import BOOK_FILL, BOOK_TURNOVER, book_trade_stats
from sentio_lab.experiment.memorisation import MEMORISATION_FILE
from sentio_lab.experiment.placebo import bootstrap_training_bars
from sentio_lab.experiment.pool_runs import (
    INSTRUMENT_RESULTS_FILE,
    INSTRUMENTS_FILE,
    book_frame,
    instrument_table,
)
from sentio_lab.experiment.runner import plan_experiment, run_cell, run_experiment

BARS = 420
TINY = ("--total-timesteps", "256", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8")
COMMON = ("--window", "4", "--episode-length", "16", "--feature-bank", "close", "--fee-bps", "1")


def write_walk(folder, name: str, seed: int, bars: int = BARS) -> str:
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2005-01-03", periods=bars, name="date")
    close = 40 * np.exp(np.cumsum(rng.normal(0.0002, 0.012, bars)))
    opens = close * np.exp(rng.normal(0, 0.004, bars))
    frame = pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.003,
                          "low": np.minimum(opens, close) * 0.997, "close": close,
                          "volume": rng.uniform(1e5, 1e6, bars)}, index=dates)
    path = folder / f"{name}.csv"
    frame.to_csv(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool-data")
    return {name: write_walk(folder, name, seed) for seed, name in enumerate(("x", "y"))}


def make_config(name: str, common=COMMON, **fields) -> ExperimentConfig:
    defaults = {"split": "cpcv", "n_groups": 4, "n_test_groups": 2, "seeds": (1,), "random_seeds": 2,
                "baselines": ("buy_and_hold", "random"), "common_args": common,
                "agents": (AgentSpec("tiny", "ppo", TINY),)}
    return ExperimentConfig(name=name, **{**defaults, **fields})


def test_a_pool_of_one_is_the_plain_runner_bit_for_bit(files, tmp_path):
    extra = {"placebo": "stationary_bootstrap", "placebo_seeds": 1}
    plain = plan_experiment(make_config("one", dataset=files["x"], **extra))
    pooled = plan_experiment(make_config("one", pool=(files["x"],), **extra))
    assert pooled.folds == plain.folds and pooled.gaps == plain.gaps and pooled.n_bars == plain.n_bars
    assert pooled.cells[0].args[:2] == ("--pool", files["x"])
    a = run_experiment(plain, tmp_path / "plain", progress=False)
    b = run_experiment(pooled, tmp_path / "pooled", progress=False)
    pd.testing.assert_frame_equal(a, b)  # the book of one account is that account
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "plain" / MEMORISATION_FILE),
                                  pd.read_parquet(tmp_path / "pooled" / MEMORISATION_FILE))
    cell = plain.cells[0].cell_id
    weights = [load_checkpoint(tmp_path / run / "cells" / cell / "checkpoint.pt", data_fingerprint=None)["agent"]
               for run in ("plain", "pooled")]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    per = pd.read_parquet(tmp_path / "pooled" / INSTRUMENT_RESULTS_FILE)
    assert set(per["instrument"]) == {files["x"]}
    rows = per.set_index(["name", "seed", "path"]).sort_index()
    book = a.set_index(["name", "seed", "path"]).sort_index()
    np.testing.assert_array_equal(rows["sharpe"].to_numpy(), book.loc[rows.index, "sharpe"].to_numpy())


@pytest.fixture(scope="module")
def pooled_run(files, tmp_path_factory):
    common = (*COMMON[:-2], "--fee-bps", "0", "--slippage-bps", "0", "--fill-price", "next_close")
    config = make_config("pair", pool=(files["x"], files["y"]), common=common,
                         agents=(AgentSpec("tiny", "ppo", TINY, ensemble=True),))
    plan = plan_experiment(config)
    output = tmp_path_factory.mktemp("runs") / config.name
    return plan, output, run_experiment(plan, output, progress=False)


def test_buy_and_hold_per_instrument_is_its_close_ratio_and_the_book_their_mean(pooled_run, files):
    plan, output, results = pooled_run
    fold = plan.folds[0]
    folder = output / "baselines" / f"buy_and_hold__fold{fold.fold:03d}"
    per = pd.read_parquet(folder / INSTRUMENTS_FILE)
    for name, path in files.items():
        close = pd.read_csv(path, index_col="date", parse_dates=True)["close"]
        for group, (a, stop) in zip(fold.groups, fold.test, strict=True):
            rows = per[(per["instrument"] == path) & (per["group"] == group)]
            # decided at the close of bar a, filled at the close of a + 1 with no costs: equity_t = close_t/close_a+1
            expected = np.r_[1.0, close.iloc[a + 1 : stop].to_numpy() / close.iloc[a + 1]]
            np.testing.assert_allclose(rows["equity"].to_numpy(), expected, rtol=1e-12, err_msg=name)
    book = pd.read_parquet(folder / GROUPS_FILE)
    mean = per.groupby(["group", "timestamp"], sort=False)["equity"].mean().to_numpy()
    np.testing.assert_allclose(book["equity"].to_numpy(), mean, rtol=0, atol=1e-15)


def test_per_instrument_results_and_the_book_are_in_the_outputs(pooled_run, files):
    plan, output, results = pooled_run
    per = pd.read_parquet(output / INSTRUMENT_RESULTS_FILE)
    assert set(per["instrument"]) == set(files.values())
    assert set(per["name"]) == {"tiny", "tiny_ensemble", "buy_and_hold", "random"}
    assert set(results["name"]) == set(per["name"])
    table = instrument_table(per)
    assert table.shape == (8, 2) and np.isfinite(table.to_numpy()).all()
    bh_x = per[(per["name"] == "buy_and_hold") & (per["instrument"] == files["x"])]["sharpe"].median()
    assert table.loc[("buy_and_hold", files["x"]), "sharpe"] == bh_x
    # a book path's total return is the chain of its groups' mean-of-accounts returns, not a per-instrument one
    bh = results[(results["name"] == "buy_and_hold")].set_index("path")["total_return"]
    per_bh = per[per["name"] == "buy_and_hold"].pivot(index="path", columns="instrument", values="total_return")
    assert ((bh > per_bh.min(axis=1) - 1e-12) & (bh < per_bh.max(axis=1) + 1e-12)).all()
    evaluation = evaluation_folder(output, "tiny", 0)
    assert set(pd.read_parquet(evaluation / INSTRUMENTS_FILE)["instrument"]) == set(files.values())
    diagnosis = json.loads(next((output / "diagnostics").glob("tiny__seed1__fold000.json")).read_text())
    assert set(diagnosis["instruments"]) == set(files.values())
    means = np.mean([d["in_sample"]["sharpe"] for d in diagnosis["instruments"].values()])
    assert diagnosis["parts"]["in_sample"]["sharpe"] == pytest.approx(means, abs=1e-12)
    assert (output / RESULTS_FILE).exists()
    # the book's trades are the instruments' own: round trips add up, a book fill is a bar where either fills
    for name in ("tiny", "buy_and_hold"):
        book = results[results["name"] == name].set_index("path")
        own = per[per["name"] == name].groupby("path")
        assert (book["round_trips"] == own["round_trips"].sum()).all()
        assert ((book["n_trades"] >= own["n_trades"].max()) & (book["n_trades"] <= own["n_trades"].sum())).all()
    assert (results[results["name"] == "tiny"]["round_trips"] > 0).all()


def test_book_frame_by_hand():
    keys = {"seed": [1, 1, 1], "group": [0, 0, 0], "path": [0, 0, 0],
            "timestamp": pd.date_range("2020-01-01", periods=3)}
    a = pd.DataFrame({**keys, "equity": [1.0, 1.1, 1.21], "weight": [1.0, 1.0, np.nan], "cost": [0.01, 0.0, 0.0],
                      "ruined": False})
    b = pd.DataFrame({**keys, "equity": [1.0, 0.9, 0.5], "weight": [0.0, -1.0, np.nan], "cost": [0.0, 0.02, 0.0],
                      "ruined": [False, False, True]})
    book = book_frame({"a": a, "b": b})
    np.testing.assert_allclose(book["equity"], [1.0, 1.0, 0.855])
    np.testing.assert_allclose(book["weight"][:2], [0.5, (1.1 - 0.9) / 2.0])  # equity-weighted net exposure
    assert np.isnan(book["weight"].iloc[2])
    np.testing.assert_allclose(book["cost"], [0.005, 0.01, 0.0])
    assert book["ruined"].tolist() == [False, False, False]  # one ruined account is not a ruined book
    assert book_frame({"a": b, "b": b.assign(equity=[1.0, 0.8, 0.4])})["ruined"].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="other episode rows"):
        book_frame({"a": a, "b": b.iloc[:2]})
    pd.testing.assert_frame_equal(book_frame({"a": a}), a)


def _trained_weights(config: ExperimentConfig, output) -> dict[str, torch.Tensor]:
    plan = plan_experiment(config)
    cell = plan.cells[0]  # fold 0
    run_cell(plan, cell, output)
    bundle = load_checkpoint(output / "cells" / cell.cell_id / "checkpoint.pt", data_fingerprint=None)
    return bundle["agent"]


@pytest.mark.parametrize("instrument", ["x", "y"])
def test_test_group_bars_of_any_instrument_never_move_a_training_cell(files, tmp_path, instrument):
    config = make_config("perturb", pool=(files["x"], files["y"]))
    plan = plan_experiment(config)
    fold = plan.folds[0]
    base = _trained_weights(config, tmp_path / "base")

    def perturbed(rows: np.ndarray, label: str) -> dict[str, torch.Tensor]:
        frame = pd.read_csv(files[instrument], index_col="date", parse_dates=True)
        frame.iloc[rows, :4] *= 1.0 + 0.3 * np.sin(np.arange(len(rows)))[:, None]  # every price of those bars
        frame.loc[:, "high"] = frame[["open", "high", "close"]].max(axis=1)
        frame.loc[:, "low"] = frame[["open", "low", "close"]].min(axis=1)
        path = tmp_path / label / f"{instrument}.csv"
        path.parent.mkdir()
        frame.to_csv(path)
        pool = tuple(str(path) if k == instrument else f for k, f in files.items())
        other = make_config("perturb", pool=pool)
        assert plan_experiment(other).folds == plan.folds
        return _trained_weights(other, tmp_path / label / "run")

    test_rows = np.concatenate([np.arange(a, stop) for a, stop in fold.test])
    moved = perturbed(test_rows, "test")
    for key, value in base.items():
        assert torch.equal(value, moved[key]), key
    a, stop = fold.train[0]
    control = perturbed(np.arange(a + 20, stop), "train")  # training bars do move the weights: the check can fail
    assert any(not torch.equal(value, control[key]) for key, value in base.items())


def test_pool_config_fields(tmp_path, files):
    path = tmp_path / "p.toml"
    path.write_text('pool = "sp500_20"\n[agents.a]\nvariant = "ppo"\n')
    assert load_config(path).pool == ("sp500_20",) and load_config(path).dataset == "pool:sp500_20"
    path.write_text('dataset = "sp500"\npool = ["a.csv"]\n[agents.a]\nvariant = "ppo"\n')
    with pytest.raises(ValueError, match="dataset or pool"):
        load_config(path)
    with pytest.raises(ValueError, match="augment_paths"):
        make_config("x", pool=("a",), augment_paths=1)
    with pytest.raises(ValueError, match="gate_margin"):
        make_config("x", pool=("a",), validation_bars=20,
                    agents=(AgentSpec("g", "ppo", ("--anchor", "buy_and_hold"), gate_margin=0.1),))


def test_command_line_reuses_the_pooled_run_and_prints_each_instrument(pooled_run, files, capsys):
    plan, output, results = pooled_run
    config = plan.config
    path = output.parent / "pair.toml"
    quoted = lambda items: "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"  # noqa: E731
    path.write_text(
        f'name = "pair"\npool = {quoted(config.pool)}\nn_groups = 4\nn_test_groups = 2\nseeds = [1]\n'
        f'random_seeds = 2\nbaselines = {quoted(config.baselines)}\ncommon_args = {quoted(config.common_args)}\n'
        f'[agents.tiny]\nvariant = "ppo"\nargs = {quoted(TINY)}\nensemble = true\n')
    before = {p: p.stat().st_mtime_ns for p in (output / "cells").rglob("checkpoint.pt")}
    main(["--config", str(path), "--output-root", str(output.parent), "--no-track", "--no-progress"])
    assert {p: p.stat().st_mtime_ns for p in (output / "cells").rglob("checkpoint.pt")} == before  # nothing retrained
    printed = capsys.readouterr().out
    assert all(f in printed for f in files.values()) and "tiny_ensemble" in printed
    pd.testing.assert_frame_equal(pd.read_parquet(output / RESULTS_FILE), results)


def test_placebo_bootstraps_a_close_only_frame_and_keeps_its_absent_prices_absent():
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2010-01-01", periods=60)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, 60)))
    frame = pd.DataFrame({"open": np.nan, "high": np.nan, "low": np.nan, "close": close, "volume": np.nan},
                         index=dates)
    out, sources = bootstrap_training_bars(frame, [(5, 40)], block_mean=3, seed=1)
    assert out[["open", "high", "low", "volume"]].isna().all().all()
    np.testing.assert_array_equal(out["close"].to_numpy()[:6], close[:6])  # the anchor bar and before: untouched
    np.testing.assert_array_equal(out["close"].to_numpy()[40:], close[40:])
    source = sources[5]
    np.testing.assert_allclose(out["close"].to_numpy()[6:40] / out["close"].to_numpy()[5:39],
                               close[source] / close[source - 1], rtol=1e-12)
    assert not np.array_equal(out["close"].to_numpy()[6:40], close[6:40])
    with pytest.raises(ValueError, match="row 3"):
        bootstrap_training_bars(frame.assign(close=np.where(np.arange(60) == 3, np.nan, close)), [(5, 40)],
                                block_mean=3, seed=1)


def _episode(equity, weights, seed=1, group=0):
    n = len(equity)
    return pd.DataFrame({"seed": seed, "group": group, "path": 0,
                         "timestamp": pd.date_range("2020-01-01", periods=n), "equity": equity,
                         "weight": [*weights, np.nan], "cost": 0.0, "ruined": False})


def test_book_trades_of_constant_weights_are_one_fill_not_exposure_drift():
    """The reviewer's example: two accounts holding constant weights 1 and 0 (each entering once, at the start)
    whose equities diverge: the book's net exposure moves every bar, but it trades once; turnover is that entry."""
    a = _episode([1.0, 1.1, 1.2, 1.1, 1.3], [1.0] * 4)
    b = _episode([1.0] * 5, [0.0] * 4)
    book = book_frame({"a": a, "b": b})
    exposure = pd.Series(book["weight"].to_numpy()[:-1], index=book["timestamp"][:-1])
    equity = pd.Series(book["equity"].to_numpy(), index=book["timestamp"])
    pieces = [(equity, exposure, book["cost"])]
    assert _path_stats(equity, exposure, pieces)["n_trades"] == 4  # what differencing the exposure counted
    stats = book_trade_stats([book], 252.0)
    assert stats["n_trades"] == 1
    assert stats["turnover_per_year"] == pytest.approx((1.0 * 1.0 + 1.0 * 0.0) / 2.0 / 4 * 252.0, rel=1e-14)
    assert stats["round_trips"] == 1 and stats["trade_win_rate"] == 1.0  # a's long, marked to 1.3; b never trades
    half = book_frame({"a": a, "b": b.assign(weight=[0.5] * 4 + [np.nan])})
    assert book_trade_stats([half], 252.0)["n_trades"] == 1  # both enter on bar 0: one book fill
    assert book_trade_stats([half], 252.0)["round_trips"] == 2
    flat = book_trade_stats([book_frame({"a": b, "b": b})], 252.0)
    assert flat["n_trades"] == 0 and flat["round_trips"] == 0 and np.isnan(flat["trade_win_rate"])


def test_book_trades_when_the_instruments_trade_by_hand():
    """A: long, flat, short, short; B: flat, flat, long half, long half. Book turnover per bar is
    sum E_k |dw_k| / sum E_k; a fill on bars 0-2 (bar 3 holds); round trips: A's long (won) and short (lost), B's
    long (won); a second episode of another seed is counted on its own (from flat)."""
    ea, eb = [1.0, 1.1, 1.05, 1.0, 0.98], [1.0, 1.0, 1.0, 1.02, 1.03]
    a = _episode(ea, [1.0, 0.0, -1.0, -1.0])
    b = _episode(eb, [0.0, 0.0, 0.5, 0.5])
    book = book_frame({"a": a, "b": b})
    hand = [1.0 / 2.0, 1.1 / 2.1, (1.05 * 1.0 + 1.0 * 0.5) / 2.05, 0.0]
    np.testing.assert_allclose(book[BOOK_TURNOVER].to_numpy()[:-1], hand, rtol=1e-14)
    assert np.isnan(book[BOOK_TURNOVER].iloc[-1])
    assert book[BOOK_FILL].tolist() == [True, True, True, False, False]
    stats = book_trade_stats([book], 252.0)
    assert stats["n_trades"] == 3 and stats["round_trips"] == 3
    assert stats["trade_win_rate"] == pytest.approx(2 / 3)
    assert stats["turnover_per_year"] == pytest.approx(np.mean(hand) * 252.0, rel=1e-14)
    two = book_frame({"a": pd.concat([a, a.assign(seed=2)], ignore_index=True),
                      "b": pd.concat([b, b.assign(seed=2)], ignore_index=True)})
    np.testing.assert_allclose(two[BOOK_TURNOVER].to_numpy()[5:9], hand, rtol=1e-14)  # seed 2 starts flat again
    random = book_frame({"a": a.assign(weight=np.nan), "b": b})
    assert np.isnan(random[BOOK_TURNOVER]).all() and not random[BOOK_FILL].any()
