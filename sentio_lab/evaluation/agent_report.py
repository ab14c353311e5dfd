"""A trained agent's greedy run over one range next to buy-and-hold: the summary a variant prints when training
ends, and the demo-style report that ``python -m sentio_lab.evaluate CHECKPOINT`` writes.

Both go through :func:`compare_with_buy_and_hold`: the agent's deterministic episode
(:func:`sentio_lab.evaluation.episodes.evaluate_policy`, net of the run's costs, under its masks) and buy-and-hold over
the
same bars with the same costs (always fully long, :class:`sentio_lab.evaluation.baselines.BuyAndHold`, whatever levels
the
agent may choose), tabled by :func:`sentio_lab.evaluation.metrics.stats_table` as the reports do. The report
(:func:`write_checkpoint_report`) is the demo notebook's (``notebooks/train_and_report.ipynb``): the same
:func:`sentio_lab.evaluation.report.write_report` files and ``data_quality.md``, the same vectorbt replay of the
agent's and
buy-and-hold's positions, which must reproduce the env's equity (to 1e-9, as the demo asserts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from sentio_lab.agents.training import cost_model_from
from sentio_lab.agents.variants import action_masking, env_options, load_trained
from sentio_lab.env.market import PreparedMarket
from sentio_lab.env.pool import PooledMarket
from sentio_lab.evaluation.baselines import BuyAndHold, evaluate_baseline
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policy
from sentio_lab.evaluation.metrics import stats_table
from sentio_lab.evaluation.pooled import evaluate_pool

#: The ranges :func:`compare_with_buy_and_hold` takes: a named range of the chronological split, or every bar.
RANGES: tuple[str, ...] = ("validation", "test", "all")
#: Column of the benchmark in :attr:`Comparison.stats`.
BUY_AND_HOLD = "buy and hold"
#: Rows of :meth:`Comparison.describe` (keys of :func:`sentio_lab.evaluation.metrics.summary_stats`).
SUMMARY_ROWS: tuple[str, ...] = ("total_return", "sharpe", "max_drawdown", "turnover_per_year", "n_trades")
#: Largest relative difference allowed between the env's equity and its vectorbt replay (the demo's bound).
REPLAY_TOLERANCE = 1e-9


@dataclass
class Comparison:
    """The agent and buy-and-hold over the same bars, and their statistics side by side."""

    range_name: str
    agent_name: str
    agent: Evaluation
    benchmark: Evaluation
    stats: pd.DataFrame
    """:func:`sentio_lab.evaluation.metrics.stats_table` of both (columns ``agent_name`` and :data:`BUY_AND_HOLD`)."""

    @property
    def equities(self) -> dict[str, pd.Series]:
        """Equity curves by column name."""
        return {self.agent_name: self.agent.equity, BUY_AND_HOLD: self.benchmark.equity}

    @property
    def weights(self) -> dict[str, pd.Series]:
        """Target weights by column name."""
        return {self.agent_name: self.agent.weights, BUY_AND_HOLD: self.benchmark.weights}

    def describe(self) -> str:
        """A few printable lines: the range, then :data:`SUMMARY_ROWS` of the agent and of buy-and-hold."""
        first, last = self.agent.equity.index[0], self.agent.equity.index[-1]
        head = (f"{self.range_name} summary, {_day(first)} .. {_day(last)} ({len(self.agent.weights)} decisions), "
                "greedy policy, net of costs:")
        if self.agent.ruined:
            head += " (the agent's equity hit 0: the episode stopped there)"
        table = self.stats.loc[list(SUMMARY_ROWS)].T.astype(float)
        text = table.apply(lambda column: column.map(("{:.0f}" if column.name == "n_trades" else "{:.4f}").format))
        return head + "\n" + text.to_string()


def _day(stamp: Any) -> str:
    return f"{stamp:%Y-%m-%d %H:%M}" if isinstance(stamp, pd.Timestamp) and stamp != stamp.normalize() else (
        f"{stamp:%Y-%m-%d}" if isinstance(stamp, pd.Timestamp) else str(stamp))


def range_bars(market: PreparedMarket, range_name: str) -> tuple[int, int]:
    """``(start, stop)`` bar positions of a :data:`RANGES` name ("all": from the first training bar to the end)."""
    if range_name not in RANGES:
        raise ValueError(f"range {range_name!r}; choose from {list(RANGES)}")
    if range_name == "all":
        return market.range("train")[0], market.range("test")[1]
    return market.range(range_name)


def compare_with_buy_and_hold(
    agent: nn.Module, args: Any, market: PreparedMarket, range_name: str = "validation", *, agent_name: str = "agent"
) -> Comparison:
    """The agent's greedy episode over ``range_name`` (a :data:`RANGES` name) and buy-and-hold over the same bars,
    both with the costs of ``args`` (a variant's arguments), tabled as the reports table them."""
    bars = range_bars(market, range_name)
    costs = cost_model_from(args)
    was_training = agent.training
    agent.eval()  # the greedy policy, no dropout (the transformer's)
    try:
        evaluation = evaluate_policy(agent, market, window=args.features.window, positions=tuple(args.env.positions),
                                     costs=costs,
                                     range_name=range_name, bars=bars, **action_masking(args),
                                     env_options=env_options(args, market))
    finally:
        agent.train(was_training)
    benchmark = evaluate_baseline(BuyAndHold(), market, window=args.features.window, positions=(0.0, 1.0), costs=costs,
                                  bars=bars)
    benchmark.range_name = range_name
    equities = {agent_name: evaluation.equity, BUY_AND_HOLD: benchmark.equity}
    weights = {agent_name: evaluation.weights, BUY_AND_HOLD: benchmark.weights}
    return Comparison(range_name=range_name, agent_name=agent_name, agent=evaluation, benchmark=benchmark,
                      stats=stats_table(equities, weights))


def training_summary(result: Any, range_name: str = "validation") -> str:
    """What a variant prints when training ends: :meth:`Comparison.describe` of its agent over the validation
    range (``result`` is a :class:`sentio_lab.agents.training.TrainResult`). Never the test range: a selection made
    from this
    printout must not read test (the W&B run summary does record test figures, labelled as such, as issue 17
    asked). When there is nothing to evaluate on (an env was passed in, a fold market without a validation range,
    a range too short for the window) it says so in one line instead of failing the finished run.
    """
    market = result.market
    if isinstance(market, PooledMarket):  # per instrument and pooled (sentio_lab.evaluation.pooled)
        return pooled_summary(result, range_name)
    if market is None or range_name not in market.splits:
        return f"{range_name} summary: not available (no {range_name} range in this run's market)"
    try:
        comparison = compare_with_buy_and_hold(result.agent, result.args, market, range_name,
                                               agent_name=str(result.args.run.exp_name))
    except ValueError as err:
        return f"{range_name} summary: not available ({err})"
    return comparison.describe()


def pooled_summary(result: Any, range_name: str = "validation") -> str:
    """:meth:`~sentio_lab.evaluation.pooled.PooledEvaluation.describe` of a pooled run's greedy agent over
    ``range_name`` of every instrument, net of the run's costs."""
    args, agent = result.args, result.agent
    was_training = agent.training
    agent.eval()
    try:
        evaluation = evaluate_pool(agent, result.market, window=args.features.window,
                                   positions=tuple(args.env.positions), costs=cost_model_from(args),
                                   range_name=range_name, env_options=env_options(args, result.market))
    except (KeyError, ValueError) as err:
        return f"{range_name} summary: not available ({err})"
    finally:
        agent.train(was_training)
    return evaluation.describe()


def default_output(checkpoint: str | Path, range_name: str, dataset: str | Path | None = None) -> Path:
    """Where :func:`write_checkpoint_report` writes without ``output``: ``report_<range>[_<dataset stem>]`` next to
    the checkpoint (another dataset gets its own folder, so it never overwrites the report on the run's data)."""
    name = f"report_{range_name}" + ("" if dataset is None else f"_{Path(str(dataset)).stem}")
    return Path(checkpoint).parent / name


def _replay_error(frame: pd.DataFrame, evaluation: Evaluation, costs: Any) -> float:
    """Largest relative difference between the env's equity and the vectorbt replay of its weights."""
    from sentio_lab.evaluation import backtest  # vectorbt: slow to import, needed only for the report's cross-check

    replayed = backtest.equity(backtest.replay(frame, evaluation.start, evaluation.weights.to_numpy(), costs,
                                                fill_price=evaluation.fill_price))
    return float(np.max(np.abs(replayed.to_numpy() / evaluation.equity.to_numpy() - 1)))


def write_checkpoint_report(
    checkpoint: str | Path,
    *,
    dataset: str | Path | None = None,
    range_name: str = "test",
    output: str | Path | None = None,
) -> tuple[Comparison, dict[str, Path]]:
    """Evaluate a checkpoint against buy-and-hold and write the demo-style report; return the comparison and the
    paths (:data:`sentio_lab.evaluation.report.REPORT_FILES` keys and ``data_quality``).

    ``dataset`` applies the model to another file (:func:`sentio_lab.agents.variants.load_trained`); ``output``
    defaults to
    :func:`default_output`. Raises :class:`~sentio_lab.agents.checkpoint.CheckpointError` for a missing or damaged
    checkpoint, ``ValueError`` for data that does not fit it, and ``RuntimeError`` when the vectorbt replay does not
    reproduce the env's equity (the accounting would disagree with itself).
    """
    from sentio_lab.evaluation.report import (
        write_report,  # plotly and matplotlib: not imported by the variants' summary
    )

    if range_name not in RANGES:
        raise ValueError(f"range {range_name!r}; choose from {list(RANGES)}")
    trained = load_trained(checkpoint, dataset=dataset)
    variant = str(trained.bundle["variant"])
    if variant == "ppo_portfolio":  # a panel, not one instrument: its evaluation is the portfolio runner's
        raise ValueError(f"{checkpoint}: a ppo_portfolio checkpoint; this report is single-asset. Evaluate portfolios "
                         "through an experiment file with kind = \"portfolio\" (docs/portfolio.md)")
    comparison = compare_with_buy_and_hold(trained.agent, trained.args, trained.market, range_name,
                                           agent_name=variant)
    market, costs = trained.market, cost_model_from(trained.args)
    replay = {name: _replay_error(market.data.frame, evaluation, costs)
              for name, evaluation in ((variant, comparison.agent), (BUY_AND_HOLD, comparison.benchmark))}
    worst = max(replay.values())
    if not worst < REPLAY_TOLERANCE:
        raise RuntimeError(f"{checkpoint}: the vectorbt replay differs from the env's equity by {worst:.2e} "
                           f"(allowed {REPLAY_TOLERANCE:.0e}): {replay}")
    first, last = comparison.agent.equity.index[0], comparison.agent.equity.index[-1]
    train = market.splits["train"]
    scope = ("every bar, the training range included (in sample)" if range_name == "all"
             else f"{range_name} range (out of sample)")
    meta = {
        "label": (f"{scope}: {_day(first)} .. {_day(last)}, net of costs, greedy policy of {variant} at step "
                  f"{trained.bundle['global_step']}; trained on {_day(train.first_timestamp)} .. "
                  f"{_day(train.last_timestamp)} only"),
        "checkpoint": str(Path(checkpoint).resolve()),
        "variant": variant,
        "global_step": int(trained.bundle["global_step"]),
        "dataset": market.data.name,
        "fingerprint": market.data.fingerprint,
        "trained_on_fingerprint": trained.bundle["data_fingerprint"],
        "range": f"{range_name}: {_day(first)} .. {_day(last)}",
        "costs": repr(costs),
        "benchmark": "buy and hold: fully long from the first decision, same bars and costs",
        "replay_max_rel_error": replay,
        "data_quality": None if market.data.quality is None else market.data.quality.to_dict(),
    }
    out = Path(output) if output is not None else default_output(checkpoint, range_name, dataset)
    paths = write_report(out, comparison.equities, comparison.weights, comparison.stats,
                         title=f"{variant} on {market.data.name}: {range_name}, net of costs, against buy and hold",
                         meta=meta)
    if market.data.quality is not None:
        paths["data_quality"] = out / "data_quality.md"
        paths["data_quality"].write_text(market.data.quality.to_markdown())
    return comparison, paths
