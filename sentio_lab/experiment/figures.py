"""Figures and the HTML page of an experiment's evaluation report (matplotlib PNGs, a plain HTML file)."""

from __future__ import annotations

import base64
import dataclasses
import html
import mimetypes
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written headless (papermill, CI)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sentio_lab.experiment.memorisation import placebo_table  # noqa: E402
from sentio_lab.experiment.summary import Inference, sharpe_distribution  # noqa: E402


def _fmt(value: float) -> str:
    """Four decimals, the report's precision."""
    return f"{value:.4f}"


def plot_path_equity(curves: pd.DataFrame, results: pd.DataFrame, path: str | Path) -> Path:
    """One panel per backtest path: every agent seed (thin) and every baseline (labelled), log scale."""
    kinds = results.drop_duplicates("name").set_index("name")["kind"]
    paths = sorted(curves["path"].unique())
    fig, axes = plt.subplots(len(paths), 1, figsize=(11, 2.6 * len(paths)), sharex=True, squeeze=False)
    # Baselines get distinct colours; every seed of an agent configuration shares one dark shade.
    baseline_colours = dict(zip([n for n in kinds.index if kinds[n] == "baseline"],
                                ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
                                 "tab:olive", "tab:cyan"], strict=False))
    agent_colours = dict(zip([n for n in kinds.index if kinds[n] == "agent"],
                             ["black", "tab:red", "dimgrey", "darkred"], strict=False))
    for ax, p in zip(axes[:, 0], paths, strict=True):
        on_path = curves[curves["path"] == p]
        for (name, seed), curve in on_path.groupby(["name", "seed"], sort=False):
            agent = kinds.get(name) == "agent"
            label = None if agent and seed != on_path[on_path["name"] == name]["seed"].min() else name
            colour = agent_colours.get(name) if agent else baseline_colours.get(name)
            ax.plot(pd.DatetimeIndex(curve["timestamp"]), curve["equity"], lw=0.7 if agent else 1.1,
                    alpha=0.55 if agent else 0.9, color=colour, label=label)
        ax.set(yscale="log", ylabel="equity", title=f"backtest path {p}")
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def plot_sharpe_distribution(results: pd.DataFrame, path: str | Path) -> Path:
    """Box plot of every strategy's annualised Sharpe over paths x seeds."""
    values = sharpe_distribution(results)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.boxplot(list(values.values()), showmeans=True)
    ax.set_xticks(range(1, len(values) + 1), list(values), rotation=20)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(ylabel="annualised Sharpe", title="Sharpe over backtest paths x seeds (out of sample, net of costs)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def plot_generalisation_gap(memo: pd.DataFrame, path: str | Path) -> Path:
    """In-sample against test Sharpe of every run (one point per seed x fold), the diagonal (no gap) and, with a
    placebo control, each configuration's memorisation floor (runs left of it are noise); placebo runs in grey."""
    wide = memo[memo["part"].isin(["in_sample", "test"])].pivot_table(
        index=["kind", "name", "seed", "fold", "placebo"], columns="part", values="sharpe").reset_index()
    floors = placebo_table(memo)["floor"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    placebo = wide[wide["kind"] == "placebo"]
    ax.scatter(placebo["in_sample"], placebo["test"], s=12, color="lightgrey", label="placebo runs")
    for (name, runs), colour in zip(wide[wide["kind"] == "agent"].groupby("name", sort=False),
                                    ["black", "tab:red", "tab:blue", "tab:green"], strict=False):
        ax.scatter(runs["in_sample"], runs["test"], s=16, color=colour, label=name)
        if name in floors.index:
            ax.axvline(floors[name], color=colour, ls="--", lw=0.9, label=f"{name}: placebo floor")
    limits = [wide[["in_sample", "test"]].min().min(), wide[["in_sample", "test"]].max().max()]
    ax.plot(limits, limits, color="grey", lw=0.7, label="no gap")
    ax.set(xlabel="in-sample Sharpe (training segments)", ylabel="test Sharpe",
           title="Generalisation gap per run (annualised, net of costs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def _data_uri(folder: Path, src: str | Path) -> str:
    """The image file ``src`` (relative to ``folder`` unless absolute) as a ``data:`` URI."""
    path = Path(src) if Path(src).is_absolute() else folder / src
    if not path.is_file():
        raise FileNotFoundError(f"write_html: figure {str(src)!r} not found ({path}); write it before the page")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def write_html(
    output: str | Path,
    *,
    title: str,
    verdict: str,
    table: pd.DataFrame,
    inference: Mapping[str, Inference],
    targets: Mapping[str, pd.DataFrame],
    figures: Mapping[str, str],
    meta: Mapping[str, object],
) -> Path:
    """``report.html``: the verdict, the per-strategy table, the tests, the targets and the figures.

    ``figures`` maps a heading to an image file (relative to ``output``, or absolute). The images are embedded
    as base64 data URIs, so the page stands alone: it still shows them when copied or moved without the PNGs.
    """
    tests = pd.DataFrame({name: dataclasses.asdict(found) for name, found in inference.items()})
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p><strong>{html.escape(verdict)}</strong></p>",
             "<h2>Strategies: median [q25, q75] over paths x seeds</h2>", table.to_html(float_format=_fmt),
             "<h2>Statistical tests (ensemble returns)</h2>", tests.to_html(float_format=_fmt)]
    for name, frame in targets.items():
        parts += [f"<h2>Seed-system targets: {html.escape(name)}</h2>", frame.to_html(float_format=_fmt)]
    parts += [f'<h2>{html.escape(label)}</h2><img src="{_data_uri(Path(output), src)}" '
              f'alt="{html.escape(Path(src).name)}" style="max-width:100%">'
              for label, src in figures.items()]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    parts.append(f"<h2>Run</h2><table>{rows}</table>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>" \
           f"<body>{''.join(parts)}</body></html>"
    out = Path(output) / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
