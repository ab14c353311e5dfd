import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest

from sentio_lab.env.costs import CostModel
from sentio_lab.evaluation import metrics as mt
from sentio_lab.evaluation.report import REPORT_FILES, equity_figure, markdown_table, png_figure, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def inputs():
    rng = np.random.default_rng(1)
    index = pd.bdate_range("2017-01-02", periods=260)
    agent = pd.Series(np.cumprod(1 + rng.normal(0.0005, 0.01, 260)), index=index)
    hold = pd.Series(np.cumprod(1 + rng.normal(0.0003, 0.008, 260)), index=index)
    weights = pd.Series(rng.choice([-1.0, 0.0, 1.0], 259), index=index[:-1])
    equities = {"agent": agent, "buy_and_hold": hold}
    stats = mt.stats_table(equities, {"agent": weights})
    meta = {
        "label": "out-of-sample test range 2017-01-03 to 2017-12-29, net of costs, 1 seed",
        "dataset": "sp500",
        "fingerprint": "4cd6be963cddfa0b",
        "seed": 7,
        "costs": CostModel(10, 5, borrow_bps=25),
        "generated": pd.Timestamp("2024-01-01"),
        "seeds": np.array([1, 2]),
        "n": np.int64(3),
    }
    return equities, {"agent": weights}, stats, meta


def test_write_report_writes_every_file(tmp_path, inputs):
    equities, weights, stats, meta = inputs
    paths = write_report(tmp_path / "run", equities, weights, stats, "PPO vs buy and hold", meta)
    assert set(paths) == set(REPORT_FILES)
    for key, path in paths.items():
        assert path == tmp_path / "run" / REPORT_FILES[key] and path.stat().st_size > 0

    csv = pd.read_csv(paths["stats_csv"], index_col=0)
    assert list(csv.columns) == ["agent", "buy_and_hold"]
    assert float(csv.loc["sharpe", "agent"]) == pytest.approx(stats.loc["sharpe", "agent"])

    md = paths["stats_md"].read_text().splitlines()
    assert md[0] == "# PPO vs buy and hold"
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + len(stats)  # header, rule, one line per statistic
    assert table[0] == "|  | agent | buy_and_hold |"
    sharpe_line = next(line for line in table if line.startswith("| sharpe |"))
    assert f"{stats.loc['sharpe', 'agent']:.4f}" in sharpe_line

    saved = json.loads(paths["meta_json"].read_text())
    # every cost field is recorded (short borrow and the microstructure options included)
    assert saved["costs"] == dataclasses.asdict(CostModel(10, 5, borrow_bps=25))
    assert {"fee_bps": 10, "slippage_bps": 5, "borrow_bps": 25, "impact": "none"}.items() <= saved["costs"].items()
    assert saved["seed"] == 7 and saved["seeds"] == [1, 2] and saved["n"] == 3
    assert saved["generated"] == "2024-01-01 00:00:00"

    for key in ("equity_png", "drawdown_png"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC


def test_html_is_offline_and_labels_only_what_meta_says(tmp_path, inputs):
    equities, weights, stats, meta = inputs
    page = write_report(tmp_path, equities, weights, stats, "Run <1>", meta)["html"].read_text()
    assert "<title>Run &lt;1&gt;</title>" in page  # escaped
    assert meta["label"] in page and "4cd6be963cddfa0b" in page and "fee_bps" in page and "borrow_bps" in page
    assert "Plotly.newPlot" in page and "<script src=" not in page  # no external script to fetch
    assert len(page) > 1_000_000  # plotly.js itself is embedded
    assert "2017-01-02 to 2017-12-29 (259 bars)" in page  # span read off the curves
    assert f"<td>{stats.loc['max_drawdown', 'agent']:.4f}</td>" in page
    assert "No description" not in page

    unlabelled = {k: v for k, v in meta.items() if k != "label"}
    page = write_report(tmp_path / "b", equities, None, stats, "t", unlabelled, log_scale=False)["html"].read_text()
    assert "No description of these numbers was recorded" in page
    assert "out-of-sample" not in page  # nothing invented
    empty = write_report(tmp_path / "c", equities, None, stats, "t", {})["html"].read_text()
    assert "No metadata was given" in empty


def test_equity_figure_rows_and_scale(inputs):
    equities, weights, _, _ = inputs
    fig = equity_figure(equities, weights)
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == 2 * len(equities) + 1  # equity and drawdown each, one weight trace
    assert fig.layout.yaxis3 is not None and fig.layout.yaxis3.domain is not None
    drawdowns = [t for t in fig.data if t.yaxis == "y2"]
    np.testing.assert_allclose(drawdowns[0].y, mt.drawdown(equities["agent"]).to_numpy())
    plain = equity_figure(equities, log_scale=False)
    assert plain.layout.yaxis.type != "log" and len(plain.data) == 2 * len(equities)


def test_markdown_table_formats_cells():
    stats = pd.DataFrame(
        {
            "a|b": [
                1.23456789,
                np.nan,
                None,
                pd.Timestamp("2020-01-02"),
                3,
                1.5e7,
                pd.Timestamp("2020-01-02 10:00"),
            ]
        },
        index=["x", "y", "z", "d", "n", "big", "t"],
    )
    lines = markdown_table(stats).splitlines()
    assert lines[0] == "|  | a\\|b |"
    assert lines[2:] == [
        "| x | 1.2346 |",
        "| y |  |",
        "| z |  |",
        "| d | 2020-01-02 |",
        "| n | 3 |",
        "| big | 1.5e+07 |",
        "| t | 2020-01-02 10:00:00 |",
    ]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(equities={}), ValueError, "non-empty"),
        (lambda a: a.update(equities={"x": [1.0, 2.0]}), TypeError, "not a pandas Series"),
        (lambda a: a.update(equities={"x": pd.Series([1.0])}), ValueError, "at least 2"),
        (lambda a: a.update(equities={"x": pd.Series([1.0, np.nan])}), ValueError, "finite"),
        (lambda a: a.update(equities={"x": pd.Series([1.0, -1.0])}), ValueError, "> 0"),
        (lambda a: a.update(weights={"ghost": pd.Series([1.0])}), ValueError, "ghost"),
        (lambda a: a.update(weights={"agent": [1.0]}), TypeError, "not a pandas Series"),
        (lambda a: a.update(stats={"sharpe": 1.0}), TypeError, "DataFrame"),
        (lambda a: a.update(title="  "), ValueError, "title"),
        (lambda a: a.update(meta=[("seed", 1)]), TypeError, "meta"),
    ],
)
def test_write_report_rejects_bad_input(tmp_path, inputs, change, error, match):
    equities, weights, stats, meta = inputs
    args = {"equities": equities, "weights": weights, "stats": stats, "title": "t", "meta": meta}
    change(args)
    with pytest.raises(error, match=match):
        write_report(tmp_path, **args)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_report_leaves_the_dsr_of_baselines_blank(tmp_path, inputs):
    equities, weights, _, meta = inputs
    rng = np.random.default_rng(4)
    seed_2 = pd.Series(np.cumprod(1 + rng.normal(0.0004, 0.01, 260)), index=equities["agent"].index)
    curves = {"agent": equities["agent"], "agent_seed_2": seed_2, "buy_and_hold": equities["buy_and_hold"]}
    stats = mt.stats_table(curves, weights, trial_family=["agent", "agent_seed_2"])
    md = write_report(tmp_path, curves, weights, stats, "t", meta)["stats_md"].read_text()
    dsr_line = next(line for line in md.splitlines() if line.startswith("| dsr |"))
    cells = [c.strip() for c in dsr_line.strip("|").split("|")]
    assert cells[0] == "dsr" and cells[3] == "n/a (1)"  # buy and hold: no DSR, and the page says why
    assert cells[1] == f"{stats.loc['dsr', 'agent']:.4f}" and cells[2] != ""
    assert "(1) dsr (buy_and_hold): not in the trial family" in md


def _row(md: str, name: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_empty_entries_of_the_demo_table_say_why(tmp_path, inputs):
    """The demo calls stats_table(equities, weights): no trial family, no costs, no weights for buy and hold."""
    equities, weights, stats, meta = inputs
    paths = write_report(tmp_path, equities, weights, stats, "t", meta)
    md = paths["stats_md"].read_text()
    assert _row(md, "dsr") == ["n/a (1)", "n/a (1)"]
    assert "(1) dsr (agent, buy_and_hold): no trial family was given" in md and "trial_family=" in md
    assert _row(md, "costs_paid") == ["n/a (3)", "n/a (3)"]
    assert "(3) costs_paid (agent, buy_and_hold): costs paid were not recorded for this curve" in md
    assert _row(md, "turnover_per_year")[1] == "n/a (2)" and _row(md, "turnover_per_year")[0] != ""
    assert ("(2) turnover_per_year, avg_exposure, time_in_market, n_trades, round_trips, trade_win_rate "
            "(buy_and_hold): no target weights were given") in md
    assert all("" not in _row(md, row) for row in stats.index)  # no entry is left empty without a word
    page = paths["html"].read_text()
    assert "<td>n/a (1)</td>" in page and '<ol class="notes"><li>dsr (agent, buy_and_hold): no trial family' in page
    assert pd.isna(pd.read_csv(paths["stats_csv"], index_col=0).loc["dsr", "agent"])  # the CSV stays numeric


def test_entries_given_their_inputs_are_filled_not_explained(tmp_path, inputs):
    equities, weights, _, meta = inputs
    rng = np.random.default_rng(4)
    seed_2 = pd.Series(np.cumprod(1 + rng.normal(0.0004, 0.01, 260)), index=equities["agent"].index)
    curves = {"agent": equities["agent"], "agent_seed_2": seed_2}
    bars = weights["agent"].index
    costs = {"agent": pd.Series(0.001, index=bars), "agent_seed_2": pd.Series(0.002, index=bars)}
    stats = mt.stats_table(curves, {"agent": weights["agent"], "agent_seed_2": weights["agent"]},
                           trial_family=["agent", "agent_seed_2"], costs=costs)
    md = write_report(tmp_path, curves, None, stats, "t", meta)["stats_md"].read_text()
    for row in ("dsr", "costs_paid", "turnover_per_year"):
        assert all(cell and not cell.startswith("n/a") for cell in _row(md, row)), row
    assert "(1)" not in md


@pytest.mark.parametrize("depth", [0.004, 0.012, 0.03, 0.1, 0.18, 0.45, 0.95])
def test_drawdown_tick_labels_state_their_values(depth):
    """Ticks every 2.5% must not read -2% / -5% / -7%: each label is its tick's value, and no two agree."""
    index = pd.bdate_range("2020-01-01", periods=200)
    curve = pd.Series(np.r_[np.linspace(1, 1 - depth, 100), np.linspace(1 - depth, 1.05, 100)], index=index)
    fig = png_figure({"a": curve}, kind="drawdown")
    fig.draw_without_rendering()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    shown = [(tick, label.get_text()) for tick, label in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)
             if low <= tick <= high]
    assert len(shown) >= 3
    for tick, label in shown:
        assert label.endswith("%")
        assert float(label[:-1].replace("\N{MINUS SIGN}", "-")) == pytest.approx(100 * tick, abs=1e-9), label
    assert len({label for _, label in shown}) == len(shown)
    with pytest.raises(ValueError, match="kind"):
        png_figure({"a": curve}, kind="weights")


def test_report_html_stands_alone_when_moved(tmp_path, inputs):
    equities, weights, stats, meta = inputs
    page = write_report(tmp_path / "run", equities, weights, stats, "t", meta)["html"]
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    moved.write_bytes(page.read_bytes())
    text = re.sub(r"<script.*?</script>", "", moved.read_text(), flags=re.S)  # plotly.js mentions src= itself
    # Nothing is fetched from next to the page (no PNG, script or stylesheet by path); the figure is inline.
    assert not re.findall(r'(?:src|href)\s*=\s*["\'](?!data:|https?:|#)', text)
    assert "Plotly.newPlot" in moved.read_text() and "<img" not in text


def test_a_strategy_that_never_closes_a_trade_says_so(tmp_path, inputs):
    equities, _, _, meta = inputs
    flat = pd.Series(0.0, index=equities["agent"].index[:-1])  # never in the market: no round trip
    stats = mt.stats_table({"agent": equities["agent"]}, {"agent": flat})
    md = write_report(tmp_path, {"agent": equities["agent"]}, None, stats, "t", meta)["stats_md"].read_text()
    number = _row(md, "trade_win_rate")[0]
    assert number.startswith("n/a (") and f"{number[4:]} trade_win_rate (agent): no closed round trip" in md
    assert _row(md, "n_trades") == ["0"]
