"""How much of a result is memorisation: in-sample vs validation vs test per run, policy confidence, placebo floor.

Per trained cell (configuration x seed x fold) :func:`diagnose_agent` runs the greedy policy, with the same
evaluation code as the test groups (:func:`sentio_lab.evaluation.episodes.evaluate_policies`), over three parts of the
fold:

* ``in_sample``: each training segment of the fold (less the validation slice) as one episode,
* ``validation``: the inner validation slice, when the fold market has one,
* ``test``: each test group of the fold,

and chains the episodes of a part into one curve (each episode starts flat at the previous one's level). Per
part it records the Sharpe ratio (annualised, as in ``results.parquet``), the maximum drawdown, the turnover per
year (counted from flat in every episode, as the runner's paths do), the mean entropy of the policy's action
distribution over the decisions, and the share of decisions whose greedy action has probability below 0.5.

The placebo runs (:mod:`sentio_lab.experiment.placebo`) are diagnosed the same way; the 95th percentile of their
in-sample Sharpe ratios is the configuration's memorisation floor (:func:`placebo_table`), and an in-sample
result at or below it is indistinguishable from what the same configuration reaches where nothing is
predictable (:func:`gap_table` marks it ``noise``).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentio_lab.data import Split
from sentio_lab.env.market import PreparedMarket, prepare_fold_market
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policies
from sentio_lab.evaluation.metrics import periods_per_year, summary_stats
from sentio_lab.experiment.cells import Cell, write_json_atomic
from sentio_lab.experiment.config import ExperimentConfig
from sentio_lab.experiment.placebo import placebo_floor, placebo_market_data

#: Parts of a fold a run is diagnosed on, in reading order.
PARTS: tuple[str, ...] = ("in_sample", "validation", "test")
#: Statistics recorded per part (``memorisation.parquet`` columns besides the run's identity).
PART_STATS: tuple[str, ...] = ("sharpe", "max_drawdown", "turnover_per_year", "entropy", "low_confidence_share",
                               "decisions")
#: A greedy action less probable than this counts as a low-confidence decision.
LOW_CONFIDENCE = 0.5
#: Placebo in-sample Sharpe quantile that is the memorisation floor.
FLOOR_QUANTILE = 0.95


class RecordingPolicy(nn.Module):
    """Wraps an agent: the same greedy action as its ``act_greedy``, recording per decision the entropy of the
    policy's action distribution and the greedy action's probability (under the mask, when there is one)."""

    def __init__(self, agent: nn.Module) -> None:
        """Record nothing yet; ``agent`` needs ``act_greedy``, ``normalise`` and ``get_action_and_value``."""
        super().__init__()
        self.agent = agent
        self.entropy: list[torch.Tensor] = []
        self.greedy_probability: list[torch.Tensor] = []

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The agent's greedy action; records its probability and the distribution's entropy."""
        action = self.agent.act_greedy(obs, mask)
        _, log_prob, entropy, _ = self.agent.get_action_and_value(self.agent.normalise(obs), action, mask)
        self.entropy.append(entropy.detach().float().cpu())
        self.greedy_probability.append(log_prob.detach().float().exp().cpu())
        return action


def with_training_ranges(market: PreparedMarket) -> tuple[PreparedMarket, list[str]]:
    """A view of ``market`` whose ranges also name each training segment (``"train:<i>"``), and those names."""
    index = market.data.frame.index
    splits = dict(market.splits)
    names = []
    for i, (start, stop) in enumerate(market.training_segments()):
        names.append(f"train:{i}")
        splits[names[-1]] = Split(names[-1], start, stop, index[start], index[stop - 1])
    return dataclasses.replace(market, splits=splits), names


def part_ranges(market: PreparedMarket) -> tuple[PreparedMarket, dict[str, list[str]]]:
    """The market view of :func:`with_training_ranges` and the range names of each part in :data:`PARTS`."""
    view, train = with_training_ranges(market)
    parts = {"in_sample": train,
             "validation": ["validation"] if "validation" in market.splits else [],
             "test": [name for name in market.splits if name.startswith("test:")]}
    return view, parts


def chain(evaluations: Sequence[Evaluation]) -> tuple[pd.Series, list[np.ndarray]]:
    """One equity curve from episodes in time order (each starts at 1.0, scaled to the previous one's last value;
    its first mark is dropped) and the weights of each episode."""
    pieces, level = [], 1.0
    for k, evaluation in enumerate(sorted(evaluations, key=lambda e: e.start)):
        curve = evaluation.equity * level
        pieces.append(curve if k == 0 else curve.iloc[1:])
        level = float(curve.iloc[-1])
    return pd.concat(pieces), [e.weights.to_numpy() for e in sorted(evaluations, key=lambda e: e.start)]


def part_stats(evaluations: Sequence[Evaluation], entropy: np.ndarray, greedy_probability: np.ndarray,
               ppy: float) -> dict[str, float]:
    """:data:`PART_STATS` of one part's episodes and the recorded decisions' entropies and greedy probabilities."""
    if not evaluations:
        return {stat: float("nan") for stat in PART_STATS}
    equity, weights = chain(evaluations)
    stats = summary_stats(equity, periods=ppy)
    moves = np.concatenate([np.abs(np.diff(w, prepend=0.0)) for w in weights])
    return {"sharpe": float(stats["sharpe"]), "max_drawdown": float(stats["max_drawdown"]),
            "turnover_per_year": float(moves.mean() * ppy) if len(moves) else float("nan"),
            "entropy": float(entropy.mean()) if len(entropy) else float("nan"),
            "low_confidence_share": float(np.mean(greedy_probability < LOW_CONFIDENCE)) if len(entropy) else
            float("nan"),
            "decisions": float(len(moves))}


def diagnose_agent(agent: nn.Module, market: PreparedMarket, *, window: int, positions: tuple[float, ...],
                   costs: Any, parts: Sequence[str] = PARTS, **evaluate_kwargs: Any) -> dict[str, dict[str, float]]:
    """Per part in ``parts`` (:data:`PARTS`): :data:`PART_STATS` of the greedy ``agent`` (module docstring).

    Each range is evaluated alone so that exactly its own decisions are recorded (a batched run steps some envs
    past their range's end). ``evaluate_kwargs`` go to :func:`evaluate_policies` (masks, env options).
    """
    view, ranges = part_ranges(market)
    ppy = periods_per_year(market.data.frame.index)
    out = {}
    for part in parts:
        evaluations, entropy, probability = [], [], []
        for name in ranges[part]:
            recorder = RecordingPolicy(agent)
            (result,), = evaluate_policies([recorder], view, [name], window=window, positions=positions,
                                           costs=costs, **evaluate_kwargs)
            evaluations.append(result)
            if recorder.entropy:
                entropy.append(torch.cat(recorder.entropy).numpy())
                probability.append(torch.cat(recorder.greedy_probability).numpy())
        out[part] = part_stats(evaluations, np.concatenate(entropy) if entropy else np.empty(0),
                               np.concatenate(probability) if probability else np.empty(0), ppy)
    return out


def diagnosis_rows(record: dict[str, dict[str, float]], **identity: Any) -> list[dict[str, Any]]:
    """Long rows (one per part) of a :func:`diagnose_agent` record, each carrying ``identity``."""
    return [{**identity, "part": part, **stats} for part, stats in record.items()]


# ================================================================================================= report
def gap_table(memo: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (real runs): the median over seeds x folds of every part's statistics, the
    generalisation gap (in-sample minus test Sharpe), and, with placebo runs, the floor and the share of runs
    whose in-sample Sharpe lies inside it (at or below the floor: noise)."""
    real = memo[memo["kind"] == "agent"]
    wide = real.pivot_table(index=["name", "seed", "fold"], columns="part", values=list(PART_STATS[:-1]),
                            dropna=False)
    rows = []
    floors = placebo_table(memo)
    for name, runs in wide.groupby(level="name", sort=False):
        row: dict[str, Any] = {"name": name, "runs": len(runs)}
        for stat in ("sharpe", "max_drawdown", "turnover_per_year"):
            for part in PARTS:
                if (stat, part) in runs.columns:
                    row[f"{stat}:{part}"] = float(runs[(stat, part)].median())
        gap = runs[("sharpe", "in_sample")] - runs[("sharpe", "test")]
        row["sharpe_gap"] = float(gap.median())
        for stat in ("entropy", "low_confidence_share"):
            for part in ("in_sample", "test"):
                row[f"{stat}:{part}"] = float(runs[(stat, part)].median())
        if name in floors.index:
            floor = float(floors.loc[name, "floor"])
            row["placebo_floor"] = floor
            row["noise_share"] = float(np.mean(runs[("sharpe", "in_sample")].to_numpy() <= floor))
        rows.append(row)
    return pd.DataFrame(rows).set_index("name")


def placebo_table(memo: pd.DataFrame, quantile: float = FLOOR_QUANTILE) -> pd.DataFrame:
    """Per configuration with placebo runs: their number, the median and the ``quantile`` (the floor) of their
    in-sample Sharpe ratios, pooled over folds and placebo replicates."""
    placebo = memo[(memo["kind"] == "placebo") & (memo["part"] == "in_sample")]
    rows = [{"name": name, "placebo_runs": len(runs), "median": float(runs["sharpe"].median()),
             "floor": placebo_floor(runs["sharpe"].to_numpy(), quantile)}
            for name, runs in placebo.groupby("name", sort=False)]
    return pd.DataFrame(rows, columns=["name", "placebo_runs", "median", "floor"]).set_index("name")


def mark_noise(memo: pd.DataFrame, quantile: float = FLOOR_QUANTILE) -> pd.DataFrame:
    """The real runs' in-sample rows with their configuration's floor and ``noise`` (in-sample Sharpe at or below
    the floor); without placebo runs the floor is NaN and ``noise`` is False."""
    floors = placebo_table(memo, quantile)["floor"]
    rows = memo[(memo["kind"] == "agent") & (memo["part"] == "in_sample")].copy()
    rows["placebo_floor"] = rows["name"].map(floors).astype(float)
    rows["noise"] = rows["sharpe"] <= rows["placebo_floor"]
    return rows


def memorisation_summary(memo: pd.DataFrame) -> str:
    """One plain line per configuration: in-sample, validation and test Sharpe (medians over runs), the gap, and
    the placebo floor with the share of runs inside it (or how to switch the placebo on)."""
    table, lines = gap_table(memo), []
    for name, row in table.iterrows():
        validation = row.get("sharpe:validation", float("nan"))
        validation_text = f"validation {validation:.2f}" if np.isfinite(validation) else "no validation slice"
        line = (f"{name}: median annualised Sharpe in sample {row['sharpe:in_sample']:.2f}, {validation_text}, "
                f"test {row['sharpe:test']:.2f} (gap {row['sharpe_gap']:.2f}); ")
        if "placebo_floor" in row and np.isfinite(row["placebo_floor"]):
            line += (f"placebo floor {row['placebo_floor']:.2f} (95th percentile of the placebo runs' in-sample "
                     f"Sharpe): {row['noise_share']:.0%} of runs are inside it (noise)")
        else:
            line += "no placebo control (set placebo = \"stationary_bootstrap\" in the experiment file)"
        lines.append(line)
    return "\n".join(lines)


# ============================================================================================ runner side
#: File of a cell's diagnosis (``<output>/diagnostics/<cell_id>.json``) and of the assembled table.
DIAGNOSTICS_DIR = "diagnostics"
MEMORISATION_FILE = "memorisation.parquet"
#: Where placebo cells train: ``<output>/placebo/<cell_id>/``.
PLACEBO_DIR = "placebo"


def placebo_cells(config: ExperimentConfig, cells: Sequence[Cell]) -> tuple[Cell, ...]:
    """The placebo-control cells of a plan: per configuration and fold, ``config.placebo_seeds`` replicates
    (replicate j: bootstrap seed j, policy seed ``config.seeds[j % len(seeds)]``); none when the placebo is off."""
    if config.placebo is None:
        return ()
    firsts = {(c.agent, c.fold): c for c in reversed(cells)}  # the configuration's command line on that fold
    return tuple(dataclasses.replace(cell, seed=config.seeds[j % len(config.seeds)], placebo=j)
                 for cell in firsts.values() for j in range(config.placebo_seeds))


def placebo_market(market: PreparedMarket, config: ExperimentConfig, replicate: int) -> PreparedMarket:
    """The fold market ``market`` rebuilt on placebo bars: its training segments bootstrapped with seed
    ``replicate`` (validation slice and test groups untouched), features refitted on them as for any fold."""
    if market.fold is None:
        raise ValueError("placebo_market: a fold market (prepare_fold_market) is needed")
    data = placebo_market_data(market.data, market.training_segments(), block_mean=config.placebo_block_mean,
                               seed=replicate)
    return prepare_fold_market(data, market.fold, feature_config=market.feature_config,
                               validation_bars=config.validation_bars, fill_price=market.arrays.fill_price)


def diagnosis_path(output: Path, cell: Cell) -> Path:
    """Where the diagnosis of ``cell`` is written."""
    return output / DIAGNOSTICS_DIR / f"{cell.cell_id}.json"


def diagnosis_done(output: Path, cell: Cell) -> dict[str, Any] | None:
    """The diagnosis record of ``cell`` when it was made for the cell's current command line, else None."""
    path = diagnosis_path(output, cell)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("command") == shlex.join(cell.args) else None


def write_diagnosis(output: Path, cell: Cell, agent: nn.Module, market: PreparedMarket, accounting: dict[str, Any],
                    **evaluate_kwargs: Any) -> dict[str, Any]:
    """Diagnose ``agent`` (:func:`diagnose_agent`) and write the record of ``cell``; returns it."""
    parts = diagnose_agent(agent, market, window=accounting["window"], positions=accounting["positions"],
                           costs=accounting["costs"], **evaluate_kwargs)
    record = {"cell": dataclasses.asdict(cell), "command": shlex.join(cell.args), "parts": parts}
    diagnosis_path(output, cell).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(diagnosis_path(output, cell), record)
    return record


def assemble_memorisation(cells: Sequence[Cell], output: Path) -> pd.DataFrame:
    """``memorisation.parquet``: one row per diagnosed cell (real and placebo) and part; cells without a diagnosis
    are an error naming the file."""
    rows = []
    for cell in cells:
        record = diagnosis_done(output, cell)
        if record is None:
            raise FileNotFoundError(f"{diagnosis_path(output, cell)}: diagnosis not finished; run the experiment")
        rows += diagnosis_rows(record["parts"], kind="agent" if cell.placebo is None else "placebo", name=cell.agent,
                               seed=cell.seed, fold=cell.fold,
                               placebo=-1 if cell.placebo is None else cell.placebo)
    memo = pd.DataFrame(rows, columns=["kind", "name", "seed", "fold", "placebo", "part", *PART_STATS])
    memo.to_parquet(output / MEMORISATION_FILE)
    return memo
