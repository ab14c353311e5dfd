"""Write an evaluation report: statistics tables, a self-contained HTML page and static figures.

Nothing here computes or relabels a number. The page states what the numbers are (range, costs, seeds)
only through ``meta``: a ``label`` entry is shown as the headline description, and every entry of
``meta`` is printed verbatim. Without a label the page says so instead of guessing.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, PercentFormatter
from plotly.subplots import make_subplots

from sentio_lab.evaluation.metrics import NOT_AVAILABLE, check_equity, drawdown

#: File names written by :func:`write_report`, by key of the returned dict.
REPORT_FILES: dict[str, str] = {
    "stats_csv": "stats.csv",
    "stats_md": "stats.md",
    "html": "report.html",
    "equity_png": "equity.png",
    "drawdown_png": "drawdown.png",
    "meta_json": "meta.json",
}


# ------------------------------------------------------------------------------------- validation
def _check_inputs(
    equities: Mapping[str, pd.Series],
    weights: Mapping[str, pd.Series] | None,
    stats: pd.DataFrame,
    title: str,
    meta: Mapping[str, object],
) -> None:
    if not isinstance(equities, Mapping) or not equities:
        raise ValueError("write_report: equities must be a non-empty dict of name -> equity Series")
    for name, curve in equities.items():
        if not isinstance(curve, pd.Series):
            raise TypeError(f"write_report: equity {name!r} is a {type(curve).__name__}, not a pandas Series")
        check_equity(curve, f"write_report: equity {name!r}")
    for name, w in (weights or {}).items():
        if name not in equities:
            raise ValueError(f"write_report: weights for {name!r}, which has no equity curve")
        if not isinstance(w, pd.Series):
            raise TypeError(f"write_report: weights {name!r} is a {type(w).__name__}, not a pandas Series")
    if not isinstance(stats, pd.DataFrame):
        raise TypeError(f"write_report: stats must be a DataFrame (metrics.stats_table), got {type(stats).__name__}")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("write_report: title must be a non-empty string")
    if not isinstance(meta, Mapping):
        raise TypeError(f"write_report: meta must be a dict, got {type(meta).__name__}")


# ------------------------------------------------------------------------------------- formatting
def _json_default(value: object) -> object:
    """Make common non-JSON values (numpy numbers, timestamps, paths, dataclasses) serialisable."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _cell(value: object) -> str:
    """One table cell: floats with 4 significant decimals, NaN / None empty, timestamps as dates."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, pd.Timestamp):
        return str(value.date()) if value == value.normalize() else str(value)
    return str(value)


def _notes(stats: pd.DataFrame) -> tuple[dict[tuple[str, str], int], list[str]]:
    """Numbered reasons for the table's NaN entries (``stats.attrs[NOT_AVAILABLE]``, see
    :func:`sentio_lab.evaluation.metrics.stats_table`): ``({(row, column): number}, ["row (columns): reason",
    ...])``."""
    given = stats.attrs.get(NOT_AVAILABLE) or {}
    numbers: dict[tuple[str, str], int] = {}
    texts: list[str] = []
    grouped: dict[tuple[str, str], list[str]] = {}
    for row in stats.index:
        for column, reason in (given.get(row) or {}).items():
            if column in stats.columns and _cell(stats.at[row, column]) == "":
                grouped.setdefault((str(row), reason), []).append(str(column))
    merged: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # rows sharing a reason and columns: one note
    for (row, reason), columns in grouped.items():
        merged.setdefault((reason, tuple(columns)), []).append(row)
    for (reason, columns), rows in merged.items():
        texts.append(f"{', '.join(rows)} ({', '.join(columns)}): {reason}")
        numbers.update({(row, column): len(texts) for row in rows for column in columns})
    return numbers, texts


def _cells(stats: pd.DataFrame, numbers: dict[tuple[str, str], int]) -> list[tuple[str, list[str]]]:
    """Each row's label and cell texts; an entry with a recorded reason reads ``n/a (k)``."""
    out = []
    for label, row in zip(stats.index, stats.to_numpy(dtype=object), strict=True):
        cells = [_cell(v) for v in row]
        for j, column in enumerate(stats.columns):
            if (str(label), str(column)) in numbers:
                cells[j] = f"n/a ({numbers[str(label), str(column)]})"
        out.append((str(label), cells))
    return out


def markdown_table(stats: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``stats``: its index as the first column; entries that are NaN for
    a recorded reason read ``n/a (k)``, with the numbered reasons under the table."""
    numbers, notes = _notes(stats)
    header = ["", *(str(c).replace("|", "\\|") for c in stats.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(stats.columns)) + "|"]
    for label, cells in _cells(stats, numbers):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [label, *cells]) + " |")
    if notes:
        lines += ["", *(f"({k}) {text}  " for k, text in enumerate(notes, start=1))]
    return "\n".join(lines) + "\n"


def _html_table(stats: pd.DataFrame) -> str:
    numbers, notes = _notes(stats)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in stats.columns)
    body = "".join(
        f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for label, cells in _cells(stats, numbers)
    )
    listed = "".join(f"<li>{html.escape(text)}</li>" for text in notes)
    footer = f'<ol class="notes">{listed}</ol>' if notes else ""
    return f'<table class="stats"><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>{footer}'


def _meta_html(meta: Mapping[str, object]) -> str:
    if not meta:
        return "<p><em>No metadata was given.</em></p>"
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>"
        f"{html.escape(v if isinstance(v, str) else json.dumps(v, default=_json_default))}</code></td></tr>"
        for k, v in meta.items()
    )
    return f'<table class="meta">{rows}</table>'


def _spans(equities: Mapping[str, pd.Series]) -> str:
    """What the plotted curves cover, read off their indexes (a fact about the data, not a label)."""
    parts = [
        f"{html.escape(name)}: {html.escape(_cell(curve.index[0]))} to {html.escape(_cell(curve.index[-1]))} "
        f"({len(curve) - 1} bars)"
        for name, curve in equities.items()
    ]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------- figures
def equity_figure(
    equities: Mapping[str, pd.Series],
    weights: Mapping[str, pd.Series] | None = None,
    *,
    log_scale: bool = True,
    title: str = "",
) -> go.Figure:
    """Plotly figure: equity curves on top, drawdowns below, target weights in a third row if given."""
    weights = dict(weights or {})
    rows = 3 if weights else 2
    titles = ["Equity (log scale)" if log_scale else "Equity", "Drawdown", "Target weight"][:rows]
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[0.5, 0.25, 0.25] if rows == 3 else [0.65, 0.35],
        subplot_titles=titles,
    )
    palette = pio.templates["plotly"].layout.colorway
    for i, (name, curve) in enumerate(equities.items()):
        color = palette[i % len(palette)]
        group = dict(legendgroup=name, line=dict(color=color))
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), name=name, **group), row=1, col=1)
        dd = drawdown(curve)
        fig.add_trace(go.Scatter(x=dd.index, y=dd.to_numpy(), name=name, showlegend=False, **group), row=2, col=1)
        if name in weights:
            w = weights[name]
            fig.add_trace(
                go.Scatter(x=w.index, y=w.to_numpy(), name=name, showlegend=False, line_shape="hv", **group),
                row=3,
                col=1,
            )
    if log_scale:
        fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(tickformat=".0%", row=2, col=1)
    fig.update_layout(title=title or None, height=300 * rows + 100, hovermode="x unified", template="plotly")
    return fig


def png_figure(equities: Mapping[str, pd.Series], *, kind: str, log_scale: bool = True) -> Figure:
    """The static figure behind ``equity.png`` (``kind="equity"``) or ``drawdown.png`` (``kind="drawdown"``)."""
    if kind not in ("equity", "drawdown"):
        raise ValueError(f"png_figure: kind must be 'equity' or 'drawdown', got {kind!r}")
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, curve in equities.items():
        series = curve if kind == "equity" else drawdown(curve)
        ax.plot(series.index, series.to_numpy(), label=name, linewidth=1.2)
    if kind == "equity":
        if log_scale:
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            if high / low < 10:  # under a decade the default log ticks label one or two values only
                ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("equity")
        ax.set_title("Equity")
    else:
        # Decimals as the axis span needs them (ticks every 2.5% read -2.5%, not -2%); matplotlib's own rule.
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
        ax.set_ylabel("drawdown from running peak")
        ax.set_title("Drawdown")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


def _save_png(path: Path, equities: Mapping[str, pd.Series], *, kind: str, log_scale: bool) -> None:
    png_figure(equities, kind=kind, log_scale=log_scale).savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------- writer
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
table.stats td { text-align: right; font-variant-numeric: tabular-nums; }
table.meta th, table.stats tbody th { text-align: left; background: #f6f6f6; }
p.label { font-size: 1.1em; background: #eef5ff; padding: 0.5em 0.8em; border-left: 4px solid #4a7bd0; }
p.nolabel { background: #fff4e5; padding: 0.5em 0.8em; border-left: 4px solid #d08a2a; }
"""


def write_report(
    output_dir: str | Path,
    equities: Mapping[str, pd.Series],
    weights: Mapping[str, pd.Series] | None,
    stats: pd.DataFrame,
    title: str,
    meta: Mapping[str, object],
    *,
    log_scale: bool = True,
) -> dict[str, Path]:
    """Write stats.csv, stats.md, report.html, equity.png, drawdown.png and meta.json; return their paths.

    ``equities``: name -> equity curve (DatetimeIndex); ``weights``: name -> target weights (optional, a
    subset of the names); ``stats``: a table such as :func:`sentio_lab.evaluation.metrics.stats_table` returns;
    ``meta``: what the run must record (dataset, fingerprint, seeds, costs, range...). A ``meta["label"]``
    string, e.g. "out-of-sample test range 2015-01-02 to 2018-12-31, net of costs, 5 seeds", becomes the
    headline under the title; it is the caller's statement, shown as given. The HTML embeds plotly.js and
    opens offline.
    """
    _check_inputs(equities, weights, stats, title, meta)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in REPORT_FILES.items()}

    stats.to_csv(paths["stats_csv"])
    paths["stats_md"].write_text(f"# {title}\n\n{markdown_table(stats)}", encoding="utf-8")
    paths["meta_json"].write_text(json.dumps(dict(meta), indent=2, default=_json_default) + "\n", encoding="utf-8")
    _save_png(paths["equity_png"], equities, kind="equity", log_scale=log_scale)
    _save_png(paths["drawdown_png"], equities, kind="drawdown", log_scale=log_scale)

    label = meta.get("label")
    headline = (
        f'<p class="label">{html.escape(str(label))}</p>'
        if label
        else '<p class="nolabel">No description of these numbers was recorded (no <code>label</code> in '
        "the metadata): the range, costs and seeds behind them are only what the metadata below says.</p>"
    )
    figure = pio.to_html(equity_figure(equities, weights, log_scale=log_scale), include_plotlyjs=True, full_html=False)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{headline}
<p>Curves shown: {_spans(equities)}.</p>
<h2>Equity and drawdown</h2>
{figure}
<h2>Statistics</h2>
{_html_table(stats)}
<h2>Run metadata</h2>
{_meta_html(meta)}
</body>
</html>
"""
    paths["html"].write_text(page, encoding="utf-8")
    return paths
