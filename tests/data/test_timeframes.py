"""Higher-timeframe views become visible only at the close of their last base bar."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import load_market
from sentio_lab.data.timeframes import _buckets, resample_causal

HOUR = pd.Timedelta("1h")
DAY = pd.Timedelta("1D")


def ohlcv_at(index, seed: int = 0, price: float = 1.1) -> pd.DataFrame:
    """Valid random OHLCV on the given timestamps."""
    rng = np.random.default_rng(seed)
    n = len(index)
    close = price * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.r_[price, close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.001, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.001, n))
    volume = rng.uniform(1, 10, n)
    idx = pd.DatetimeIndex(index).as_unit("us").rename("timestamp")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=idx)


def test_four_hour_bar_is_visible_exactly_at_the_close_of_its_last_hour():
    frame = ohlcv_at(pd.date_range("2017-01-02 00:00", periods=10, freq="h"))
    view = resample_causal(frame, "4h", HOUR)
    # Buckets 00-04 and 04-08 are complete; 08-12 has only two hours so far and is never shown.
    assert list(view.bars.index) == [pd.Timestamp("2017-01-02 00:00"), pd.Timestamp("2017-01-02 04:00")]
    assert list(view.close_row) == [3, 7]
    assert list(view.latest) == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]
    first = frame.iloc[:4]
    np.testing.assert_array_equal(
        view.bars.iloc[0].to_numpy(),
        [first.open.iloc[0], first.high.max(), first.low.min(), first.close.iloc[-1], first.volume.sum()],
    )
    aligned = view.align(view.bars["close"].to_numpy())
    assert np.isnan(aligned[:3]).all() and aligned[3] == frame.close.iloc[3] and aligned[9] == frame.close.iloc[7]


def test_a_gap_at_the_bucket_end_delays_visibility_to_the_next_bar():
    # 03:00 is missing: no bar of the 00-04 bucket ends at 04:00, so it closes with the 04:00 bar.
    stamps = pd.to_datetime(["2017-01-02 00:00", "2017-01-02 01:00", "2017-01-02 02:00", "2017-01-02 04:00",
                             "2017-01-02 05:00", "2017-01-02 06:00", "2017-01-02 07:00"])
    frame = ohlcv_at(stamps)
    view = resample_causal(frame, "4h", HOUR)
    assert list(view.close_row) == [3, 6]
    assert list(view.latest) == [-1, -1, -1, 0, 0, 0, 1]
    # The 04:00 bar itself belongs to the next bucket, not to the one it reveals.
    assert view.bars["close"].iloc[0] == frame.close.iloc[2]
    assert view.bars["open"].iloc[1] == frame.open.iloc[3]


def test_daily_stock_bars_make_weeks_visible_on_friday_with_w_fri():
    days = pd.bdate_range("2018-01-01", "2018-01-31")  # Mon 1 Jan .. Wed 31 Jan
    frame = ohlcv_at(days)
    view = resample_causal(frame, "W-FRI", DAY)
    fridays = [i for i, d in enumerate(days) if d.dayofweek == 4]
    assert list(view.close_row) == fridays
    # pandas' default week ("1W" = W-SUN) ends on Sunday: a Mon..Fri market sees it on Monday's close.
    sunday_weeks = resample_causal(frame, "1W", DAY)
    mondays = [i for i, d in enumerate(days) if d.dayofweek == 0][1:]
    assert list(sunday_weeks.close_row) == mondays


def test_a_friday_holiday_delays_the_week_to_monday():
    days = pd.bdate_range("2018-03-26", "2018-04-06").drop(pd.Timestamp("2018-03-30"))  # Good Friday
    frame = ohlcv_at(days)
    view = resample_causal(frame, "W-FRI", DAY)
    assert [str(days[i].date()) for i in view.close_row] == ["2018-04-02", "2018-04-06"]
    assert view.bars["close"].iloc[0] == frame.close.loc["2018-03-29"]


@pytest.mark.parametrize("rule", ["4h", "1D", "W-FRI"])
def test_complete_buckets_match_pandas_on_eurusd(rule):
    frame = load_market("eurusd_1h").frame
    view = resample_causal(frame, rule, HOUR)
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
    if rule == "W-FRI":  # calendar weeks Saturday..Friday, as pandas periods define them
        periods = frame.index.to_period("W-FRI")
        ref = frame.groupby(periods).agg(agg)
        bucket_end = (ref.index + 1).start_time[: len(view.bars)]
    else:
        ref = frame.resample(rule, label="left", closed="left").agg(agg).dropna()
        bucket_end = view.bars.index + pd.tseries.frequencies.to_offset(rule)
    # pandas also emits the last, still-open bucket; ours stops at the last complete one.
    assert len(ref) == len(view.bars) + 1
    np.testing.assert_allclose(view.bars.to_numpy(), ref.iloc[:-1].to_numpy())
    # Each bar is revealed by the first base bar that ends at or after its bucket end, never earlier.
    ends = frame.index[view.close_row] + HOUR
    assert (ends >= bucket_end).all()
    previous_end = frame.index[np.maximum(view.close_row - 1, 0)] + HOUR
    assert ((previous_end < bucket_end) | (view.close_row == 0)).all()


def test_months_are_supported():
    frame = load_market("nasdaq").frame.iloc[:300]
    view = resample_causal(frame, "ME", DAY)
    assert view.bars.index[1] == pd.Timestamp("1999-02-01")
    assert frame.index[view.close_row[0]] == pd.Timestamp("1999-02-01")  # Jan 29 ends before Feb 1


def test_future_values_and_timestamps_cannot_change_what_is_visible():
    frame = load_market("eurusd_1h").frame.iloc[:900]
    base = resample_causal(frame, "4h", HOUR)
    base_day = resample_causal(frame, "1D", HOUR)
    rng = np.random.default_rng(7)
    for t in rng.integers(50, 880, size=8):
        # Different prices and a different calendar after t: a gap, then half-hour-shifted bars.
        start = frame.index[t] + pd.Timedelta(hours=int(rng.integers(1, 30)))
        future_index = start + pd.to_timedelta(np.arange(len(frame) - t - 1) * 2, unit="h")
        future = ohlcv_at(future_index, seed=int(t), price=float(frame.close.iloc[t]) * 1.05)
        changed = pd.concat([frame.iloc[: t + 1], future])
        for rule, ref in (("4h", base), ("1D", base_day)):
            other = resample_causal(changed, rule, HOUR)
            a = ref.align(ref.bars.to_numpy())[: t + 1]
            b = other.align(other.bars.to_numpy())[: t + 1]
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ref.latest[: t + 1], other.latest[: t + 1])


def test_first_row_with_counts_visible_bars():
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="h"))
    view = resample_causal(frame, "4h", HOUR)
    assert view.first_row_with(0) == 3 and view.first_row_with(1) == 7 and view.first_row_with(5) == 12


def test_base_freq_is_inferred_when_not_given():
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="h"))
    assert resample_causal(frame, "4h").base_freq == HOUR


@pytest.mark.parametrize(
    "rule, base, match",
    [("1h", HOUR, "not coarser"), ("QE", HOUR, "not supported"), ("4h", pd.Timedelta(0), "positive")],
)
def test_invalid_rules_raise(rule, base, match):
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="h"))
    with pytest.raises(ValueError, match=match):
        resample_causal(frame, rule, base)


def test_overlapping_bars_are_rejected():
    # Bars every 30 minutes but declared as hourly: the 01:30 bar lands in a bucket the 01:00 bar closed.
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="30min"))
    with pytest.raises(ValueError, match="overlap"):
        resample_causal(frame, "2h", HOUR)


def test_bad_frames_raise():
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="h"))
    with pytest.raises(ValueError, match="column"):
        resample_causal(frame.drop(columns="volume"), "4h", HOUR)
    with pytest.raises(ValueError, match="sorted"):
        resample_causal(frame.iloc[::-1], "4h", HOUR)
    with pytest.raises(ValueError, match="empty"):
        resample_causal(frame.iloc[:0], "4h", HOUR)
    view = resample_causal(frame, "4h", HOUR)
    with pytest.raises(ValueError, match="align"):
        view.align(np.zeros(5))


def test_no_complete_bucket_gives_an_empty_view():
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=3, freq="h"))
    view = resample_causal(frame, "4h", HOUR)
    assert len(view.bars) == 0 and (view.latest == -1).all()
    assert np.isnan(view.align(np.zeros((0, 2)))).all()


@pytest.mark.parametrize("rule", ["2W", "2W-FRI", "2ME", "3MS"])
def test_multi_period_calendar_rules_are_refused(rule):
    index = pd.date_range("2020-01-01", periods=100, freq="D")
    with pytest.raises(ValueError, match="single periods"):
        _buckets(index, rule)


# ------------------------------------------------------------------------------------------ session close
NY_CLOSE = "17:00 America/New_York"


@pytest.fixture(scope="module")
def eurusd() -> pd.DataFrame:
    return load_market("eurusd_1h").frame


def bars_per_bucket(frame: pd.DataFrame, rule: str, session_close) -> pd.Series:
    """Number of base bars in each bucket, by bucket start."""
    start, _ = _buckets(frame.index, rule, session_close)
    return pd.Series(1, index=start).groupby(level=0).size()


def test_utc_days_cut_a_sunday_stub_out_of_every_fx_week(eurusd):
    sizes = bars_per_bucket(eurusd, "1D", None)
    starts = pd.DatetimeIndex(sizes.index)
    sunday = sizes[starts.dayofweek == 6]
    assert len(sunday) == 52 and (sunday <= 3).all()  # 2 bars in winter, 3 in summer: the problem fixed below


def test_fx_days_run_from_17_00_new_york_to_17_00_new_york(eurusd):
    view = resample_causal(eurusd, "1D", HOUR, session_close=NY_CLOSE)
    assert view.session_close == NY_CLOSE
    sizes = bars_per_bucket(eurusd, "1D", NY_CLOSE)
    # No Sunday stub: every session has 24 hourly bars, except Christmas Day (the market closed at 07:00 UTC).
    assert len(view.bars) == len(sizes) == 260
    short = sizes[sizes != 24]
    assert list(short.index) == [pd.Timestamp("2017-12-24 22:00").value] and short.iloc[0] == 9
    # Each session starts at 17:00 New York: 22:00 UTC in winter, 21:00 UTC in summer (daylight saving).
    local = view.bars.index.tz_localize("UTC").tz_convert("America/New_York")
    assert (local.hour == 17).all() and (local.minute == 0).all()
    assert pd.Timestamp("2017-01-08 22:00") in view.bars.index and pd.Timestamp("2017-07-09 21:00") in view.bars.index
    # Sunday evening hours open Monday's session: no daily bar starts on Friday evening or Saturday.
    assert not ((local.dayofweek == 4) | (local.dayofweek == 5)).any()
    # Visible at the close of the session's last bar (21:00 or 20:00 UTC), one bar later only after Christmas.
    start, end = _buckets(eurusd.index, "1D", NY_CLOSE)
    ends = pd.DatetimeIndex(pd.Series(end, index=start).groupby(level=0).first().to_numpy())
    assert ((ends - view.bars.index) == pd.Timedelta("1D")).all()  # the DST changes fall on weekends
    revealed_by = eurusd.index[view.close_row] + HOUR
    on_time = revealed_by == ends
    assert on_time.sum() == len(ends) - 1
    assert eurusd.index[view.close_row[np.flatnonzero(~on_time)[0]]] == pd.Timestamp("2017-12-25 22:00")


def test_fx_session_days_match_a_groupby_on_the_session_date(eurusd):
    view = resample_causal(eurusd, "1D", HOUR, session_close=NY_CLOSE)
    local = eurusd.index.tz_localize("UTC").tz_convert("America/New_York").tz_localize(None)
    session_date = (local + pd.Timedelta(hours=7)).normalize()  # 17:00 New York belongs to the next day
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
    ref = eurusd.groupby(session_date).agg(agg)
    np.testing.assert_array_equal(view.bars.to_numpy(), ref.to_numpy())


def test_fx_weeks_and_four_hours_follow_the_session_close(eurusd):
    weeks = resample_causal(eurusd, "W-FRI", HOUR, session_close=NY_CLOSE)
    revealed = eurusd.index[weeks.close_row]
    assert (revealed.dayofweek == 4).all()  # Friday's last bar, not Sunday's first as on the UTC calendar
    utc_weeks = resample_causal(eurusd, "W-FRI", HOUR)
    assert (eurusd.index[utc_weeks.close_row].dayofweek == 6).all()
    four = resample_causal(eurusd, "4h", HOUR, session_close=NY_CLOSE)
    local = four.bars.index.tz_localize("UTC").tz_convert("America/New_York")
    assert set(local.hour) == {17, 21, 1, 5, 9, 13}
    sizes = bars_per_bucket(eurusd, "4h", NY_CLOSE)
    assert (sizes[sizes.index < pd.Timestamp("2017-12-22").value] == 4).all()  # no Sunday stub here either


def test_session_days_follow_daylight_saving_on_a_24_7_market():
    index = pd.date_range("2017-03-09", "2017-03-16", freq="h").append(
        pd.date_range("2017-11-02", "2017-11-09", freq="h"))
    frame = ohlcv_at(index)
    sizes = bars_per_bucket(frame, "1D", NY_CLOSE)
    starts = pd.DatetimeIndex(sizes.index)
    by_start = dict(zip(starts, sizes, strict=True))
    assert by_start[pd.Timestamp("2017-03-11 22:00")] == 23  # Saturday 17:00 EST .. Sunday 17:00 EDT
    assert by_start[pd.Timestamp("2017-03-12 21:00")] == 24
    assert by_start[pd.Timestamp("2017-11-04 21:00")] == 25  # Saturday 17:00 EDT .. Sunday 17:00 EST
    assert by_start[pd.Timestamp("2017-11-05 22:00")] == 24
    view = resample_causal(frame, "1D", HOUR, session_close=NY_CLOSE)
    assert (np.diff(view.close_row) > 0).all()
    # Two-hour buckets stay contiguous through both changes (boundaries are whole hours).
    two = resample_causal(frame, "2h", HOUR, session_close=NY_CLOSE)
    assert len(two.bars) > 150 and (np.diff(two.close_row) > 0).all()


def test_a_sub_hour_boundary_inside_a_repeated_hour_is_refused():
    frame = ohlcv_at(pd.date_range("2017-11-05 04:00", "2017-11-05 08:00", freq="15min"))
    with pytest.raises(ValueError, match="a local hour repeats there"):
        resample_causal(frame, "45min", pd.Timedelta("15min"), session_close="17:00 America/New_York")


def test_timezone_aware_timestamps_give_the_same_session_buckets(eurusd):
    frame = eurusd.iloc[:400]
    aware = frame.copy()
    aware.index = aware.index.tz_localize("UTC").tz_convert("Europe/Berlin")
    a = resample_causal(frame, "1D", HOUR, session_close=NY_CLOSE)
    b = resample_causal(aware, "1D", HOUR, session_close=NY_CLOSE)
    np.testing.assert_array_equal(a.close_row, b.close_row)
    np.testing.assert_array_equal(a.bars.to_numpy(), b.bars.to_numpy())
    np.testing.assert_array_equal(_buckets(frame.index, "1D", NY_CLOSE)[1], _buckets(aware.index, "1D", NY_CLOSE)[1])


def test_midnight_utc_session_close_equals_the_utc_calendar(eurusd):
    for rule in ("4h", "1D", "W-FRI", "ME"):
        a = resample_causal(eurusd, rule, HOUR)
        b = resample_causal(eurusd, rule, HOUR, session_close="00:00 UTC")
        np.testing.assert_array_equal(a.close_row, b.close_row)
        np.testing.assert_array_equal(a.bars.index, b.bars.index)


def test_bad_session_close_is_named():
    frame = ohlcv_at(pd.date_range("2017-01-02", periods=12, freq="h"))
    with pytest.raises(ValueError, match="session_close '25:00 UTC'"):
        resample_causal(frame, "4h", HOUR, session_close="25:00 UTC")


def test_session_views_cannot_see_future_values_or_timestamps(eurusd):
    frame = eurusd.iloc[:900]
    rng = np.random.default_rng(11)
    refs = {rule: resample_causal(frame, rule, HOUR, session_close=NY_CLOSE) for rule in ("1D", "4h", "W-FRI")}
    for t in [*rng.integers(30, 880, size=6).tolist(), int(refs["1D"].close_row[3]) - 1, int(refs["1D"].close_row[3])]:
        start = frame.index[t] + pd.Timedelta(hours=int(rng.integers(1, 60)))
        future_index = start + pd.to_timedelta(np.arange(len(frame) - t - 1) * 3, unit="h")
        changed = pd.concat([frame.iloc[: t + 1], ohlcv_at(future_index, seed=t, price=1.3)])
        for rule, ref in refs.items():
            other = resample_causal(changed, rule, HOUR, session_close=NY_CLOSE)
            np.testing.assert_array_equal(ref.latest[: t + 1], other.latest[: t + 1])
            np.testing.assert_array_equal(ref.align(ref.bars.to_numpy())[: t + 1],
                                          other.align(other.bars.to_numpy())[: t + 1])
