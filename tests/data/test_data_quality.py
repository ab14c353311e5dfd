"""Data-quality report, the stale-open rule, range selection and session closes (sentio_lab.data)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import (
    BUNDLED_DATASETS,
    SP500_DEFAULT_START,
    STALE_THRESHOLD,
    STALE_WINDOW,
    DataValidationError,
    SessionClose,
    canonical_session_close,
    data_quality,
    find_stale_stretches,
    load_market,
    parse_session_close,
    read_ohlcv_file,
    select_range,
    session_open_mask,
    to_market,
)


def real_opens(index: pd.DatetimeIndex, seed: int = 0) -> pd.DataFrame:
    """Valid OHLCV on ``index`` whose every open differs from the previous close (a clean feed)."""
    rng = np.random.default_rng(seed)
    n = len(index)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    # A gap of at least 0.05% either way: never equal to the previous close.
    gap = rng.choice([-1.0, 1.0], n) * rng.uniform(5e-4, 3e-3, n)
    open_ = np.r_[100.0, close[:-1]] * np.exp(gap)
    high = np.maximum(open_, close) * (1 + rng.uniform(1e-4, 0.01, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(1e-4, 0.01, n))
    volume = rng.uniform(1e3, 5e3, n)
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume},
                        index=pd.DatetimeIndex(index, name="timestamp"))


def make_stale(frame: pd.DataFrame, rows) -> pd.DataFrame:
    """Copy the previous close into the open of ``rows`` (the stale-open artifact), keeping the bars valid."""
    frame = frame.copy()
    for r in rows:
        o = frame["close"].iloc[r - 1]
        frame.iloc[r, frame.columns.get_loc("open")] = o
        frame.iloc[r, frame.columns.get_loc("high")] = max(frame["high"].iloc[r], o)
        frame.iloc[r, frame.columns.get_loc("low")] = min(frame["low"].iloc[r], o)
    return frame


def reference_stretches(stale_at_opens: np.ndarray, window: int, threshold: float) -> list[tuple[int, int, int]]:
    """Brute-force reading of the module docstring's rule: (first, last, stale count) in session-open positions."""
    m = len(stale_at_opens)
    if m == 0:
        return []
    w = min(window, m)
    covered = [False] * m
    for k in range(m - w + 1):
        if sum(stale_at_opens[k : k + w]) / w > threshold:
            for i in range(k, k + w):
                covered[i] = True
    out, i = [], 0
    while i < m:
        if not covered[i]:
            i += 1
            continue
        j = i
        while j < m and covered[j]:
            j += 1
        stale = [p for p in range(i, j) if stale_at_opens[p]]
        out.append((stale[0], stale[-1], int(sum(stale_at_opens[stale[0] : stale[-1] + 1]))))
        i = j
    return out


# ------------------------------------------------------------------------------------- bundled datasets
def test_sp500_from_1999_is_refused_naming_the_stretches_and_the_start():
    with pytest.raises(DataValidationError) as err:
        load_market("sp500", start="1999")
    text = str(err.value)
    assert text.startswith("sp500: stale opens: 2 stretch(es)")
    assert "1999-01-05 .. 2007-09-24 (1840 of 2193 session opens stale, 83.9%)" in text
    assert "2011-05-09 .. 2013-05-09 (151 of 504 session opens stale, 30.0%)" in text
    # One line naming the flag to change and its value, in the CLI's and in Python's spelling.
    assert "\n" not in text
    assert f"pass --data-start {SP500_DEFAULT_START} (start='{SP500_DEFAULT_START}' in Python)" in text
    assert "--stale-opens allow (stale_opens='allow' in Python)" in text
    assert (err.value.flag, err.value.value) == ("--data-start", SP500_DEFAULT_START)
    assert "same-bar execution" in text
    # The suggested start loads (it is also the dataset's default).
    assert load_market("sp500", start=err.value.value).frame.index[0] == pd.Timestamp(SP500_DEFAULT_START)


def test_sp500_default_start_is_accepted_and_recorded():
    market = load_market("sp500")
    q = market.quality
    assert market.frame.index[0] == pd.Timestamp(SP500_DEFAULT_START) == q.first_timestamp
    assert len(market) == 1421 and q.bars == 1421
    assert q.stale_stretches == () and not q.accepted_stale_stretches
    assert q.default_start_used and q.start == SP500_DEFAULT_START and q.end is None
    assert q.stale_opens_policy == "refuse"
    assert q.stale_session_opens == 2 and q.session_opens == 1420
    assert any("default start" in note for note in q.notes)
    # An explicit start is the caller's choice, not the default.
    later = load_market("sp500", start="2014")
    assert not later.quality.default_start_used and later.quality.start == "2014"
    assert later.frame.index[0] == pd.Timestamp("2014-01-02")


def test_sp500_allow_warns_and_the_report_records_the_choice():
    allow = r"--stale-opens allow \(stale_opens='allow'\): loading 2 stale-open stretch\(es\)"
    with pytest.warns(UserWarning, match=allow) as record:
        market = load_market("sp500", start="1999", stale_opens="allow")
    assert "1999-01-05 .. 2007-09-24" in str(record[0].message)
    q = market.quality
    assert len(market) == 5031 and q.stale_opens_policy == "allow" and q.accepted_stale_stretches
    assert [(s.first, s.last, s.session_opens, s.stale) for s in q.stale_stretches] == [
        (pd.Timestamp("1999-01-05"), pd.Timestamp("2007-09-24"), 2193, 1840),
        (pd.Timestamp("2011-05-09"), pd.Timestamp("2013-05-09"), 504, 151),
    ]
    assert q.open_eq_prev_close == q.stale_session_opens == 2004 and q.compared == 5030
    assert any("accepted knowingly" in note for note in q.notes)
    assert "accepted knowingly" in str(q) and "| stale_opens policy | allow |" in q.to_markdown()
    years = {y.year: y for y in q.per_year}
    assert years[2003].stale_share > 0.9 and years[2016].stale_share < 0.05
    assert sum(y.bars for y in q.per_year) == 5031
    # A clean market loaded with "allow" warns about nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_market("nasdaq", stale_opens="allow").quality.stale_opens_policy == "allow"


def test_eurusd_opens_equal_previous_closes_inside_the_session_and_it_loads():
    market = load_market("eurusd_1h")
    q = market.quality
    # A third of the hourly bars open at the previous close: normal inside a continuous FX session.
    assert 0.30 < q.open_eq_prev_close_share < 0.35 and q.open_eq_prev_close == 2032
    assert q.session_opens == 52 and q.stale_session_opens == 0  # the Sunday opens (and one Christmas reopen)
    assert q.stale_stretches == () and "gap > 1.5" in q.session_rule
    assert market.session_close == "17:00 America/New_York"


def test_nasdaq_has_real_opens_over_its_whole_history():
    q = load_market("nasdaq").quality
    assert q.bars == 5031 and q.stale_stretches == () and q.stale_session_opens == 8
    assert q.zero_volume_bars == 2 and q.default_start_used is False


# ------------------------------------------------------------------------------------ hand-built frames
def test_stale_stretch_is_found_exactly_on_daily_bars():
    frame = real_opens(pd.bdate_range("2020-01-01", periods=300))
    # A 40-bar stale block, and two isolated stale opens far from it (below the threshold on their own).
    stale_rows = [20, *range(100, 140), 260]
    q = data_quality(make_stale(frame, stale_rows))
    assert q.session_opens == 299 and q.stale_session_opens == 42 == q.open_eq_prev_close
    assert len(q.stale_stretches) == 1
    s = q.stale_stretches[0]
    assert (s.first, s.last, s.session_opens, s.stale) == (frame.index[100], frame.index[139], 40, 40)
    assert s.share == 1.0


def test_the_threshold_is_strict_seven_of_sixty_three():
    frame = real_opens(pd.bdate_range("2020-01-01", periods=250))
    seven = [50 + 10 * k for k in range(7)]  # 7 stale opens within 61 session opens: 7/63 > 10%
    q = data_quality(make_stale(frame, seven))
    assert [(s.first, s.last, s.session_opens, s.stale) for s in q.stale_stretches] == [
        (frame.index[50], frame.index[110], 61, 7)
    ]
    # 7 stale opens spread over 64 session opens: no 63-window holds all seven; 6 of 63 is not > 10%.
    spread = [50, 60, 70, 80, 90, 100, 113]
    assert data_quality(make_stale(frame, spread)).stale_stretches == ()
    assert data_quality(make_stale(frame, seven[:6])).stale_stretches == ()


def test_stale_session_opens_on_intraday_bars_with_session_gaps():
    days = pd.bdate_range("2021-01-04", periods=120)
    index = pd.DatetimeIndex([d + pd.Timedelta(hours=h) for d in days for h in range(9, 17)])  # 8 bars a day
    frame = real_opens(index, seed=3)
    opens = [i for i in range(1, len(index)) if index[i].hour == 9]  # every first bar after an overnight gap
    inside = [i for i in range(1, len(index)) if index[i].hour != 9]
    # Inside the session an open equal to the previous close is normal: 280 such bars count for nothing.
    assert len(inside[::3]) == 280
    stale = make_stale(frame, inside[::3] + opens[40:60])
    mask, rule = session_open_mask(stale.index, pd.Timedelta("1h"))
    assert np.flatnonzero(mask).tolist() == opens and "gap > 1.5" in rule
    q = data_quality(stale)
    assert q.bar_freq == pd.Timedelta("1h") and q.session_opens == 119
    assert q.open_eq_prev_close == 300 and q.stale_session_opens == 20
    assert [(s.first, s.last, s.session_opens, s.stale) for s in q.stale_stretches] == [
        (index[opens[40]], index[opens[59]], 20, 20)
    ]
    assert q.stale_stretches[0].describe() == (
        f"{index[opens[40]]} .. {index[opens[59]]} (20 of 20 session opens stale, 100.0%)"
    )
    # A continuous market (no gaps) has no session opens and cannot fail the rule.
    continuous = make_stale(real_opens(pd.date_range("2021-01-04", periods=500, freq="h")), range(1, 500))
    q = data_quality(continuous)
    assert q.session_opens == 0 and q.open_eq_prev_close == 499 and q.stale_stretches == ()
    assert np.isnan(q.stale_share)


def test_find_stale_stretches_matches_a_brute_force_reading_of_the_rule():
    rng = np.random.default_rng(0)
    index = pd.bdate_range("2020-01-01", periods=400)
    for trial in range(40):
        m = int(rng.integers(5, 400))
        rate = rng.choice([0.02, 0.08, 0.15, 0.5])
        stale = rng.random(m) < rate
        if trial % 5 == 0:  # dense blocks
            start = int(rng.integers(0, m))
            stale[start : start + int(rng.integers(1, 60))] = True
        window = int(rng.choice([5, 20, STALE_WINDOW]))
        got = find_stale_stretches(index[:m], stale, np.ones(m, dtype=bool), window=window, threshold=0.1)
        want = reference_stretches(stale.tolist(), window, 0.1)
        assert [(index.get_loc(s.first), index.get_loc(s.last), s.stale) for s in got] == want, trial
        assert all(s.session_opens == index.get_loc(s.last) - index.get_loc(s.first) + 1 for s in got)


def test_fewer_session_opens_than_a_window_form_one_window():
    index = pd.bdate_range("2020-01-01", periods=30)
    stale = np.zeros(30, dtype=bool)
    stale[[5, 9, 20, 25]] = True  # 4 of 30 = 13% > 10%
    (s,) = find_stale_stretches(index, stale, np.ones(30, dtype=bool))
    assert (s.first, s.last, s.session_opens, s.stale) == (index[5], index[25], 21, 4)
    assert find_stale_stretches(index, stale & False, np.zeros(30, dtype=bool)) == ()
    for kwargs in ({"window": 0}, {"threshold": 1.0}, {"threshold": -0.1}):
        with pytest.raises(ValueError, match="window"):
            find_stale_stretches(index, stale, np.ones(30, dtype=bool), **kwargs)


def quality_frame() -> pd.DataFrame:
    """20 daily bars with 3 zero-volume bars, 2 flat bars and unchanged-close runs of 4, 3 and 2 bars."""
    frame = real_opens(pd.bdate_range("2022-01-03", periods=20), seed=5)
    frame.iloc[[2, 7, 8], frame.columns.get_loc("volume")] = 0.0
    for r in (11, 15):  # flat bars: open = high = low = close
        frame.iloc[r, :4] = frame["close"].iloc[r]
    for start, length in ((3, 4), (11, 3), (17, 2)):  # closes 3..6, 11..13 and 17..18 repeat
        for r in range(start + 1, start + length):
            c = frame["close"].iloc[start]
            frame.iloc[r, frame.columns.get_loc("close")] = c
            frame.iloc[r, frame.columns.get_loc("high")] = max(frame["high"].iloc[r], c)
            frame.iloc[r, frame.columns.get_loc("low")] = min(frame["low"].iloc[r], c)
    return frame


def test_quality_counts_on_a_hand_built_frame():
    frame = quality_frame()
    q = to_market(frame, name="hand", min_rows=10).quality
    assert (q.bars, q.compared, q.zero_volume_bars, q.flat_bars) == (20, 19, 3, 2)
    assert q.longest_unchanged_close_run == 4 and q.unchanged_close_runs_3plus == 2
    assert q.open_eq_prev_close == 0 and q.session_opens == 19 and q.source == "hand"
    assert q.first_timestamp == frame.index[0] and q.last_timestamp == frame.index[-1]
    assert q.stale_opens_policy is None  # to_market reports, load_market decides
    assert [(y.year, y.bars, y.compared) for y in q.per_year] == [(2022, 20, 19)]


def test_report_text_markdown_and_dict_carry_the_figures(tmp_path):
    frame = make_stale(quality_frame(), [4, 9])
    q = data_quality(frame, source="hand.csv")
    text = str(q)
    assert text.startswith("data quality of hand.csv: 20 bars 2022-01-03 .. 2022-01-28 (bar 1 days")
    assert "open == previous close: 2 of 19 bars (10.5%)" in text
    assert "stale session opens: 2 of 19 (10.5%" in text
    assert "stale-open stretches (share > 10.0% of 63 session opens): 1: 2022-01-07 .. 2022-01-14" in text
    assert "zero-volume bars 3; flat bars (high == low) 2; unchanged-close runs >= 3 bars 2 (longest 4)" in text
    md = q.to_markdown()
    for row in ("| zero-volume bars | 3 |", "| flat bars (high == low) | 2 |",
                "| longest unchanged-close run | 4 bars |",
                "| open == previous close | 2 of 19 (10.5%) |", "| stale-open stretches | 1 |",
                "| 2022-01-07 | 2022-01-14 | 6 | 2 | 33.3% |", "| 2022 | 20 | 10.5% | 19 | 10.5% |",
                "| stale_opens policy | not checked |"):
        assert row in md, row
    d = q.to_dict()
    again = json.loads(json.dumps(d))  # plain python only
    assert again == d
    assert d["zero_volume_bars"] == 3 and d["flat_bars"] == 2 and d["longest_unchanged_close_run"] == 4
    assert d["stale_stretches"] == [{"first": "2022-01-07T00:00:00", "last": "2022-01-14T00:00:00",
                                     "session_opens": 6, "stale": 2, "share": pytest.approx(1 / 3)}]
    assert d["per_year"][0]["stale_share"] == pytest.approx(2 / 19) and d["bar_freq"] == "1 days 00:00:00"
    assert d["stale_window"] == STALE_WINDOW and d["stale_threshold"] == STALE_THRESHOLD


def test_reports_of_loaded_bundled_data_are_json_safe():
    for name in BUNDLED_DATASETS:
        d = load_market(name).quality.to_dict()
        assert json.loads(json.dumps(d)) == d and d["source"] == name
    with pytest.warns(UserWarning):
        d = load_market("sp500", start="1999", stale_opens="allow").quality.to_dict()
    assert json.loads(json.dumps(d))["stale_stretches"][1]["last"] == "2013-05-09T00:00:00"


def test_an_empty_or_single_bar_frame_has_a_report():
    frame = real_opens(pd.bdate_range("2022-01-03", periods=1))
    q = data_quality(frame)
    assert q.bars == 1 and q.compared == 0 and np.isnan(q.open_eq_prev_close_share)
    assert "n/a" in str(q) and q.to_dict()["open_eq_prev_close_share"] is None
    empty = data_quality(frame.iloc[:0], pd.Timedelta("1D"))
    assert empty.bars == 0 and empty.first_timestamp is None and "no bars" in str(empty)
    assert empty.to_dict()["first_timestamp"] is None and "none" in empty.to_markdown()


# ------------------------------------------------------------------------------------ load_market options
def test_user_file_stale_rule_and_range(tmp_path):
    frame = make_stale(real_opens(pd.bdate_range("2020-01-01", periods=300)), range(10, 80))
    path = tmp_path / "stale.csv"
    frame.to_csv(path, index_label="Date")
    first_after = str(frame.index[80].date())
    with pytest.raises(DataValidationError, match=rf"pass --data-start {first_after} \(start='{first_after}'") as err:
        load_market(path)
    assert str(path) in str(err.value) and "dataset's default start" not in str(err.value)
    assert (err.value.flag, err.value.value) == ("--data-start", first_after)
    market = load_market(path, start=first_after)
    assert market.quality.stale_stretches == () and len(market) == 220
    # A stretch that reaches the end of the data: only an earlier end helps, and the message says so.
    tail = make_stale(real_opens(pd.bdate_range("2020-01-01", periods=300)), range(230, 300))
    tail.to_csv(path, index_label="Date")
    with pytest.raises(DataValidationError, match="the last stretch reaches the end of the selected range") as err:
        load_market(path)
    last_clean = str(tail.index[229].date())  # stale opens from row 230: end on the bar before
    assert f"pass --data-end {last_clean} (end='{last_clean}' in Python)" in str(err.value)
    assert (err.value.flag, err.value.value) == ("--data-end", last_clean)
    assert load_market(path, end=err.value.value).quality.stale_stretches == ()
    assert len(load_market(path, end=str(tail.index[200].date()))) == 201


def test_load_market_range_and_policy_errors():
    with pytest.raises(DataValidationError, match="stale_opens='maybe': choose --stale-opens refuse or allow") as err:
        load_market("nasdaq", stale_opens="maybe")
    assert err.value.flag == "--stale-opens"
    with pytest.raises(DataValidationError, match=r"--data-end 2010 \(end='2010' in Python\) is before the "
                                                  "dataset's default start 2013-05-10") as err:
        load_market("sp500", end="2010")
    assert err.value.flag == "--data-start" and "--stale-opens allow" in str(err.value)
    with pytest.raises(DataValidationError, match=r"too few rows \(0\) from --data-start 2030 \(start='2030'"):
        load_market("nasdaq", start="2030")
    with pytest.raises(DataValidationError, match=r"--data-start 2018 \(start='2018' in Python\) is after "
                                                  r"--data-end 2017 \(end='2017' in Python\)"):
        load_market("nasdaq", start="2018", end="2017")
    with pytest.raises(DataValidationError, match=r"cannot select the range --data-start soon \(start='soon'") as err:
        load_market("nasdaq", start="soon")
    assert err.value.flag == "--data-start"
    with pytest.raises(DataValidationError, match="cannot select the range --data-start 2013-05-10 .* --data-end soon"
                       ) as err:
        load_market("sp500", end="soon")
    assert err.value.flag == "--data-end"
    # end="2013-05" covers May, so it is not before the default start 2013-05-10 (only 15 bars, though).
    with pytest.raises(DataValidationError, match=r"too few rows \(15\) from --data-start 2013-05-10 .* to "
                                                  r"--data-end 2013-05 \(end='2013-05' in Python\)"):
        load_market("sp500", end="2013-05")
    market = load_market("nasdaq", start="2010-03", end="2010-06")
    assert market.frame.index[0] == pd.Timestamp("2010-03-01") and market.frame.index[-1] == pd.Timestamp("2010-06-30")
    assert market.quality.start == "2010-03" and market.quality.end == "2010-06"


def test_select_range_is_inclusive_with_partial_dates():
    frame = real_opens(pd.bdate_range("2017-05-01", "2017-07-31"))
    june = select_range(frame, "2017-06", "2017-06")
    assert june.index[0] == pd.Timestamp("2017-06-01") and june.index[-1] == pd.Timestamp("2017-06-30")
    assert len(select_range(frame, "2017-06-15", "2017-06")) == 12  # the second half of June
    assert select_range(frame) is frame
    assert len(select_range(frame, end=pd.Timestamp("2017-05-02"))) == 2
    with pytest.raises(DataValidationError, match="feed: --data-start 2017-07-01 .* is after --data-end 2017-06-30"):
        select_range(frame, "2017-07-01", "2017-06-30", source="feed")
    with pytest.raises(DataValidationError, match="cannot select") as err:
        select_range(frame, pd.Timestamp("2017-06-01", tz="UTC"), None)
    assert err.value.flag == "--data-start" and "(the data start 2017-05-01 00:00:00)" in str(err.value)
    with pytest.raises(DataValidationError, match=r"cannot select the range --data-end soon \(end='soon'") as err:
        select_range(frame, None, "soon")
    assert err.value.flag == "--data-end"


def test_csv_without_a_timestamp_column_says_so(tmp_path):
    frame = real_opens(pd.bdate_range("2020-01-01", periods=60))
    path = tmp_path / "no_dates.csv"
    frame.to_csv(path, index=False)  # Open,High,... only
    with pytest.raises(DataValidationError, match="no timestamp column") as err:
        load_market(path)
    text = str(err.value)
    assert "missing column" not in text and str(path) in text and "'open'" in text and "date" in text
    frame.rename(columns={"close": "Adj Close"})[["Adj Close", "open", "high", "low", "volume"]].to_csv(
        path, index=False
    )
    with pytest.raises(DataValidationError, match="no timestamp column"):
        read_ohlcv_file(path)


# ---------------------------------------------------------------------------------------- session close
@pytest.mark.parametrize(
    "text, canonical",
    [("17:00 America/New_York", "17:00 America/New_York"), ("5:30  Europe/London ", "05:30 Europe/London"),
     ("00:00 UTC", "00:00 UTC")],
)
def test_session_close_parses_to_a_canonical_form(text, canonical):
    parsed = parse_session_close(text)
    assert str(parsed) == canonical == canonical_session_close(text)
    assert parse_session_close(parsed) is parsed and parse_session_close(None) is None
    assert parsed.offset == pd.Timedelta(hours=parsed.hour, minutes=parsed.minute)
    assert str(pd.Timestamp("2017-01-01", tz=parsed.tzinfo).tz) == parsed.zone


@pytest.mark.parametrize(
    "value, match",
    [("17:00", "expected 'HH:MM Area/City'"), ("24:00 UTC", "not a time of day"), ("12:61 UTC", "not a time"),
     ("17:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"), (1700, "must be a string")],
)
def test_bad_session_closes_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        parse_session_close(value)
    with pytest.raises(ValueError, match=match):
        to_market(real_opens(pd.bdate_range("2020-01-01", periods=60)), name="x", session_close=value)


def test_markets_carry_their_session_close():
    assert load_market("eurusd_1h").session_close == "17:00 America/New_York"
    assert load_market("nasdaq").session_close is None
    frame = real_opens(pd.bdate_range("2020-01-01", periods=60))
    assert to_market(frame, name="x", session_close="9:00 Asia/Tokyo").session_close == "09:00 Asia/Tokyo"
    assert SessionClose(9, 0, "Asia/Tokyo") == parse_session_close("09:00 Asia/Tokyo")


def test_a_range_ending_inside_a_stretch_is_told_to_end_earlier():
    # sp500 2010 .. 2013-01: the last stretch (from 2011-05-09) runs to the end of the selected range.
    with pytest.raises(DataValidationError, match="the last stretch reaches the end of the selected range: pass "
                                                  r"--data-end 2011-05-06 \(end='2011-05-06' in Python\)") as err:
        load_market("sp500", start="2010", end="2013-01")
    assert (err.value.flag, err.value.value) == ("--data-end", "2011-05-06")
    assert load_market("sp500", start="2010", end=err.value.value).quality.stale_stretches == ()
    # 1999 .. 2013-03: two stretches, a few bars after the last; the clean range lies between them.
    with pytest.raises(DataValidationError, match="only 2 bars follow the last stretch") as err:
        load_market("sp500", start="1999", end="2013-03-28")
    text = str(err.value)
    assert "pass --data-start 2007-09-25 (start='2007-09-25' in Python) and --data-end 2011-05-06" in text
    assert load_market("sp500", start="2007-09-25", end="2011-05-06").quality.stale_stretches == ()
    # Stale from the first bar to the last: no clean range to suggest, the flags are still named.
    with pytest.raises(DataValidationError, match="reaches the end of the selected range: choose a range of at "
                                                  "least 50 bars without them") as err:
        load_market("sp500", start="2000", end="2004")
    assert err.value.flag == "--data-end" and err.value.value is None
