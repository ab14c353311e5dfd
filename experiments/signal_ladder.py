"""Planted-signal ladder: how much of a known, weak signal does default PPO learn, against training steps?

For each family (AR(1), hidden regime) and rung (oracle Sharpe per year net of default costs, see
:mod:`sentio_lab.data.synthetic`) one synthetic market is written to CSV and default PPO (``sentio_lab.ppo``'s
``Args``, only the dataset, seed and budget changed) is trained on its training range (the first 60 % of the
bars) for each seed. The learning curve comes from one run per seed resumed budget by budget (resuming gives the
same weights as an uninterrupted run), each checkpoint evaluated greedily out of sample on the test range (the
last 20 %). The oracle runs through the same env on the same test bars, so ``share = agent / oracle`` compares
like with like (paired), and the exact oracle Sharpe is reported beside it.

    python experiments/signal_ladder.py --out reports/signal_ladder --seeds 1 2 3 --budgets 8192 16384

Writes ``results.csv`` (one row per family, rung, seed, budget), ``learning_curve.png`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from sentio_lab import ppo
from sentio_lab.data.synthetic import RUNGS, OracleRule, write_ladder
from sentio_lab.evaluation.baselines import PriceHistory, WeightPolicy, run_policy
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policy
from sentio_lab.evaluation.metrics import sharpe_ratio

BARS_PER_YEAR = 252


def sharpe(evaluation: Evaluation) -> float:
    """Annualised Sharpe of an evaluation's daily equity returns."""
    return sharpe_ratio(evaluation.equity.pct_change().dropna(), BARS_PER_YEAR)


@dataclass
class Options:
    """What to run."""

    out: Path
    seeds: list[int]
    budgets: list[int]
    rungs: list[float]
    regime_rungs: list[float]
    """Rungs of the regime family (at rung 0 it is the same i.i.d. market as AR(1) at rung 0)."""
    families: list[str]
    n_bars: int
    data_seed: int


def run(opts: Options) -> pd.DataFrame:
    """Train and evaluate every (family, rung, seed) at every budget; one row each."""
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="signal_ladder_"))
    rows = []
    try:
        ladder = []
        for family in opts.families:
            rungs = opts.regime_rungs if family == "regime" else opts.rungs
            ladder += write_ladder(work / "data", n_bars=opts.n_bars, seed=opts.data_seed, rungs=tuple(rungs),
                                   families=(family,))
        for entry in ladder:
            base = ppo.Args.from_flat(dataset=str(entry.path), track=False, progress=False, feature_cache_dir=None,
                            run_dir=str(work / "runs"), total_timesteps=max(opts.budgets))
            market = ppo.market_for(base)
            costs = ppo.cost_model(base)
            oracle = OracleRule(entry.market)
            (oracle_test,) = run_policy(WeightPolicy(oracle, PriceHistory.from_market(market), base.env.positions),
                                        market, window=base.features.window, positions=base.env.positions, costs=costs)
            oracle_sr = sharpe(oracle_test) if entry.rung > 0 else 0.0
            exact = entry.market.oracle_sharpe()
            for seed in opts.seeds:
                ckpt = work / "runs" / f"{entry.path.stem}_s{seed}.pt"
                done_iterations = 0
                for budget in sorted(opts.budgets):
                    iterations = budget // (base.ppo.num_envs * base.ppo.num_steps)
                    args = ppo.Args.from_flat(dataset=str(entry.path), track=False, progress=False,
                                              feature_cache_dir=None,
                                    run_dir=str(work / "runs"), total_timesteps=max(opts.budgets), seed=seed,
                                    checkpoint_path=str(ckpt), max_iterations=iterations - done_iterations,
                                    resume=str(ckpt) if done_iterations else None)
                    started = time.time()
                    result = ppo.train(args, market=market)
                    done_iterations = iterations
                    test = evaluate_policy(result.agent, market, window=base.features.window,
                                           positions=base.env.positions,
                                           costs=costs, range_name="test")
                    train = evaluate_policy(result.agent, market, window=base.features.window,
                                            positions=base.env.positions,
                                            costs=costs, range_name="train")
                    agent_sr = sharpe(test)
                    rows.append({
                        "family": entry.family, "rung": entry.rung, "parameter": _parameter(entry.market),
                        "seed": seed, "steps": result.global_step, "sharpe_test": agent_sr,
                        "sharpe_train": sharpe(train), "oracle_test": oracle_sr, "oracle_exact": exact,
                        "share": agent_sr / oracle_sr if entry.rung > 0 else math.nan,
                        "mean_weight_test": float(test.weights.mean()),
                        "turnover_test": float(test.weights.diff().abs().mean()),
                        "oracle_turnover_test": float(oracle_test.weights.diff().abs().mean()),
                        "seconds": time.time() - started,
                    })
                    print(pd.Series(rows[-1]).to_dict(), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return pd.DataFrame(rows)


def _parameter(market: object) -> str:
    return f"phi={market.phi:.4f}" if hasattr(market, "phi") else f"mu={market.mu:.5f}"


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Share of the oracle captured (rungs > 0) and test Sharpe (all rungs) against steps."""
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(frame["family"]))
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 3.6 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        sub = frame[frame["family"] == family]
        for k, (rung, group) in enumerate(sub.groupby("rung")):
            color = f"C{k}"  # one colour per rung in both panels (mean line, seed dots, oracle line)
            mean = group.groupby("steps")[["share", "sharpe_test"]].mean()
            if rung > 0:
                axes[row, 0].plot(mean.index, mean["share"], marker="o", color=color, label=f"oracle {rung:g}")
                axes[row, 0].scatter(group["steps"], group["share"], s=8, alpha=0.4, color=color)
            axes[row, 1].plot(mean.index, mean["sharpe_test"], marker="o", color=color, label=f"oracle {rung:g}")
            axes[row, 1].scatter(group["steps"], group["sharpe_test"], s=8, alpha=0.4, color=color)
            axes[row, 1].axhline(group["oracle_test"].iloc[0], color=color, ls=":", lw=1)
        axes[row, 0].axhline(0.5, color="grey", ls="--", lw=1)
        axes[row, 0].set(title=f"{family}: share of the oracle's test Sharpe", xlabel="training steps",
                         ylabel="agent / oracle (test)")
        axes[row, 1].set(title=f"{family}: test Sharpe (dotted: oracle on the same bars)", xlabel="training steps",
                         ylabel="Sharpe per year, net")
        axes[row, 0].legend(fontsize=8)
        axes[row, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and seed range per family, rung and budget."""
    grouped = frame.groupby(["family", "rung", "steps"])
    return pd.DataFrame({
        "parameter": grouped["parameter"].first(),
        "oracle_exact": grouped["oracle_exact"].first(),
        "oracle_test": grouped["oracle_test"].first(),
        "sharpe_test_mean": grouped["sharpe_test"].mean(),
        "sharpe_test_min": grouped["sharpe_test"].min(),
        "sharpe_test_max": grouped["sharpe_test"].max(),
        "share_mean": grouped["share"].mean(),
        "share_exact_mean": grouped["sharpe_test"].mean() / grouped["oracle_exact"].first().replace(0.0, math.nan),
        "sharpe_train_mean": grouped["sharpe_train"].mean(),
        "turnover_test_mean": grouped["turnover_test"].mean(),
        "oracle_turnover_test": grouped["oracle_turnover_test"].first(),
    }).reset_index()


def readme(opts: Options, frame: pd.DataFrame, command: str, minutes: float) -> str:
    """The report's README: the command, the range, the steps, the seeds and the summary table."""
    table = summary(frame).round(3).to_markdown(index=False)
    return f"""# Planted-signal ladder

Default PPO (`sentio_lab.ppo` defaults; only dataset, seed and budget set) on synthetic daily markets with a known
signal (`sentio_lab.data.synthetic`, see docs/evaluation.md "Planted-signal ladder"). **CI-sized budget**: at most
{max(opts.budgets):,} training steps per run, far below the 200k default; read it as the start of the learning curve.

- Command: `{command}` ({minutes:.0f} min on the shared 2-core machine)
- Markets: {opts.n_bars:,} business-day bars each (data seed {opts.data_seed}), families {", ".join(opts.families)},
  rungs (oracle Sharpe per year net of fee 1 bp + slippage 1 bp): ar1 {", ".join(f"{r:g}" for r in opts.rungs)};
  regime {", ".join(f"{r:g}" for r in opts.regime_rungs)} (at rung 0 both families are the same i.i.d. market)
- Ranges: training = first 60 % of the bars, validation = next 20 % (unused), **test = last 20 %**
  ({opts.n_bars - int(opts.n_bars * 0.8):,} bars; Sharpe standard error about
  {math.sqrt(BARS_PER_YEAR / (opts.n_bars * 0.2)):.2f} per year on one path)
- Steps (budgets, one resumed run per seed): {", ".join(f"{b:,}" for b in opts.budgets)}; seeds {opts.seeds}.
  Each budget is a point of ONE run scheduled for the largest budget (the learning rate anneals over that
  schedule), not a separately finished run of that length
- `share` = agent's test Sharpe / the oracle's test Sharpe on the same bars through the same env (net of costs);
  `oracle_exact` = the oracle's Sharpe from the process parameters (AR(1): closed form; regime: simulated filter),
  `share_exact_mean` = mean agent test Sharpe / `oracle_exact`. On one test path the oracle's own Sharpe is noisy
  (standard error above): at low rungs the paired `share` divides by a small or even negative number and means little

{table}

Files: `results.csv` (one row per family, rung, seed, budget), `learning_curve.png`.
"""


def main(argv: list[str] | None = None) -> None:
    """Command line: run the ladder and write the report folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/signal_ladder"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budgets", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rungs", type=float, nargs="+", default=list(RUNGS))
    parser.add_argument("--regime-rungs", type=float, nargs="+", default=[2.0])
    parser.add_argument("--families", nargs="+", default=["ar1", "regime"])
    parser.add_argument("--n-bars", type=int, default=8000)
    parser.add_argument("--data-seed", type=int, default=0)
    ns = parser.parse_args(argv)
    opts = Options(ns.out, ns.seeds, ns.budgets, ns.rungs, ns.regime_rungs, ns.families, ns.n_bars, ns.data_seed)
    started = time.time()
    frame = run(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(opts.out / "results.csv", index=False)
    plot(frame, opts.out / "learning_curve.png")
    command = "python experiments/signal_ladder.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (opts.out / "README.md").write_text(readme(opts, frame, command, (time.time() - started) / 60))
    print(summary(frame).round(3).to_string())


if __name__ == "__main__":
    main()
