"""In-sample vs validation Sharpe of default PPO trained on one instrument vs pooled over the 20 sp500_20 stocks.

CI-sized (a few seeds, a few iterations): it shows the gap's direction on this budget, nothing more. Both runs use
the same instrument markets (the pooled market's members: each instrument prepared as it would be alone), close-only
next-close fills, the slow feature bank and the default PPO hyperparameters; only ``--total-timesteps`` is small.

    python experiments/pooled_sharpe.py --steps 32768 --seeds 1 2 3 --single sp500_20:AAPL

Prints one markdown table row per (run, seed) and writes ``reports/pooled_sharpe.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from sentio_lab import ppo
from sentio_lab.agents.training import cost_model_from, feature_config_from
from sentio_lab.data import Split
from sentio_lab.env.pool import prepare_pool, stack_members
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.evaluation.metrics import periods_per_year, sharpe_ratio
from sentio_lab.evaluation.pooled import pooled_returns


def with_instrument_ranges(pool, window: int, ranges) -> tuple[object, dict[str, dict[str, str]]]:
    """The stacked pool with one named range per (range, instrument) on its stacked rows, so a single batched
    :func:`evaluate_policies` env runs every instrument (each range starts at the instrument's first observable
    bar: the decision bar :func:`evaluate_policy` starts the member at)."""
    frame = pool.data.frame
    splits, names = dict(pool.splits), {r: {} for r in ranges}
    for offset, (name, member) in zip(pool.offsets, pool.members.items(), strict=True):
        for r in ranges:
            start, stop = member.range(r)
            a, b = offset + max(start, member.arrays.first_valid + window - 1), offset + stop
            key = f"{r}@{name}"
            splits[key] = Split(key, a, b, frame.index[a], frame.index[b - 1])
            names[r][name] = key
    return dataclasses.replace(pool, splits=splits), names


def sharpes(agent, args, pool, ranges=("train", "validation")) -> dict[str, dict[str, float]]:
    """Per range: the mean per-instrument Sharpe, the equal-weight book's Sharpe and each instrument's."""
    market, names = with_instrument_ranges(pool, args.features.window, ranges)
    keys = [key for r in ranges for key in names[r].values()]
    results = evaluate_policies([agent], market, window=args.features.window, positions=tuple(args.env.positions),
                                costs=cost_model_from(args), range_names=keys)[0]
    by_key = dict(zip(keys, results, strict=True))
    out = {}
    for r in ranges:
        per = {name: by_key[key] for name, key in names[r].items()}
        values = [float(ev.summary["sharpe"]) for ev in per.values()]
        book = pooled_returns(per)
        periods = periods_per_year(next(iter(per.values())).equity.index)
        out[r] = {"mean": float(np.nanmean(values)), "book": sharpe_ratio(book.to_numpy(), periods),
                  **{name: float(ev.summary["sharpe"]) for name, ev in per.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32768)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--single", default="sp500_20:AAPL")
    parser.add_argument("--start", default="2008-01-01")
    parser.add_argument("--output", default="reports/pooled_sharpe.csv")
    options = parser.parse_args()
    base = ppo.Args.from_flat(pool=("sp500_20",), fill_price="next_close", feature_bank="slow",
                              data_start=options.start, total_timesteps=options.steps, track=False, progress=False,
                              checkpoint_every=0, run_dir="/tmp/pooled_sharpe_runs", feature_cache_dir=None)
    pool = prepare_pool(base.data.pool, feature_config_from(base), start=options.start, fill_price="next_close",
                        window=base.features.window, episode_length=base.env.episode_length)
    single = stack_members({options.single: pool.members[options.single]}, calendar_note=pool.calendar_note)
    print(pool.calendar_note, {k: (s.first_timestamp.date(), s.last_timestamp.date())
                               for k, s in pool.members[options.single].splits.items()})
    rows = []
    for seed in options.seeds:
        runs = (("one instrument", single, (options.single,)), ("pooled 20", pool, ("sp500_20",)))
        for label, market, pool_arg in runs:
            args = base.replace(seed=seed, pool=pool_arg, run_name=f"{label.replace(' ', '_')}_{seed}")
            result = ppo.train(args, market=market)
            figures = sharpes(result.agent, result.args, pool)
            row = {"run": label, "seed": seed, "steps": result.global_step}
            for r in ("train", "validation"):
                row[f"{r}_single"] = figures[r][options.single]
                row[f"{r}_mean20"] = figures[r]["mean"]
                row[f"{r}_book20"] = figures[r]["book"]
            rows.append(row)
            print(" | ".join(f"{k}={v:+.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    table = pd.DataFrame(rows)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(options.output, index=False)
    print(table.groupby("run").mean(numeric_only=True).round(2).to_markdown())


if __name__ == "__main__":
    main()
