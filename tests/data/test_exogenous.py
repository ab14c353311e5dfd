"""Point-in-time alternative data (sentio_lab.data.exogenous): release times, the as-of rule and the CSV format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import DataValidationError, load_market
from sentio_lab.data.exogenous import (
    BUNDLED_EXOGENOUS,
    ExogenousSeries,
    bar_close_times,
    bundled_exogenous,
    load_exogenous,
    read_exogenous_csv,
    release_times,
    visible_index,
)

DAY = pd.Timedelta(days=1)


@pytest.fixture(scope="module")
def sp500_index() -> pd.DatetimeIndex:
    return load_market("sp500").frame.index


def ns(stamp) -> int:
    return pd.Timestamp(stamp).as_unit("ns").value


@pytest.mark.parametrize("name", sorted(BUNDLED_EXOGENOUS))
def test_no_bundled_value_is_public_before_its_period_ends(name):
    series = bundled_exogenous(name)
    assert len(series.dates) > 100 and np.isfinite(series.values).all()
    # released strictly after the period is over (the day, or the month): never during it
    assert (series.released_at > series.period_end).all(), name
    assert series.dates.is_monotonic_increasing and series.released_at.is_monotonic_increasing
    entry = BUNDLED_EXOGENOUS[name]
    assert entry.description and entry.published and entry.chosen


def test_bundled_release_times_are_the_documented_ones():
    vix = bundled_exogenous("vix")
    friday = vix.dates.get_loc(pd.Timestamp("2016-03-04"))  # a Friday (EST: New York = UTC-5)
    assert vix.released_at[friday] == pd.Timestamp("2016-03-05 14:30")  # next day 09:30 New York
    summer = vix.dates.get_loc(pd.Timestamp("2016-07-05"))  # EDT: UTC-4
    assert vix.released_at[summer] == pd.Timestamp("2016-07-06 13:30")
    wti = bundled_exogenous("wti")
    assert wti.released_at[wti.dates.get_loc(pd.Timestamp("2016-03-04"))] == pd.Timestamp("2016-03-06 14:30")
    cpi = bundled_exogenous("core_cpi")
    assert cpi.released_at[cpi.dates.get_loc(pd.Timestamp("2016-01-01"))] == pd.Timestamp("2016-02-29 13:30")
    spread = bundled_exogenous("credit_spread")
    jan = spread.dates.get_loc(pd.Timestamp("2016-01-01"))
    assert spread.released_at[jan] == pd.Timestamp("2016-02-11 14:30")
    baa, aaa = bundled_exogenous("baa"), bundled_exogenous("aaa")
    assert spread.values[jan] == pytest.approx(baa.values[jan] - aaa.values[jan])
    ff = bundled_exogenous("ff_mkt_rf")
    assert ff.dates[0] == pd.Timestamp("1926-07-01") and ff.dates[-1] == pd.Timestamp("2018-11-01")
    assert (ff.dates.day == 1).all() and (np.diff(ff.dates.year * 12 + ff.dates.month) == 1).all()
    assert ff.released_at[ff.dates.get_loc(pd.Timestamp("2016-01-01"))] == pd.Timestamp("2016-03-31 13:30")
    # holidays (NaN in the source) are no values: left out, not filled
    assert len(vix.dates) == 1305 - 46 and pd.Timestamp("2014-01-20") not in vix.dates  # MLK day


def test_a_monthly_value_is_not_visible_at_the_months_own_end(sp500_index):
    """Core CPI of month m on sp500 bars: not on the month's last bar, nor before its release, and from the first
    bar closing after the release on."""
    cpi = bundled_exogenous("core_cpi")
    close = bar_close_times(sp500_index, DAY)
    seen = visible_index(cpi, close)
    months = pd.period_range("2014-01", "2018-10", freq="M")
    for month in months:
        i = cpi.dates.get_loc(month.to_timestamp())
        in_month = np.flatnonzero(sp500_index.to_period("M") == month)
        last_bar = in_month[-1]
        assert seen[last_bar] < i, month  # the month's own end: its value is not out yet
        first = int(np.argmax(seen >= i))
        assert close[first] >= ns(cpi.released_at[i]) and close[first - 1] < ns(cpi.released_at[i])
        # the last day of the next month, or the next trading day after it
        assert (month + 1).to_timestamp(how="end").normalize() <= sp500_index[first] <= (
            month + 1).to_timestamp(how="end") + pd.Timedelta(days=4)
    assert (np.diff(seen) >= 0).all()


def test_vix_of_a_day_is_first_seen_on_the_next_bar(sp500_index):
    vix = bundled_exogenous("vix")
    seen = visible_index(vix, bar_close_times(sp500_index, DAY))
    seen_dates = vix.dates[seen[seen >= 0]]
    bars = sp500_index[seen >= 0]
    assert (seen_dates < bars).all()  # never the bar's own day
    friday = np.flatnonzero(bars == pd.Timestamp("2016-03-07"))[0]  # a Monday sees Friday's close
    assert seen_dates[friday] == pd.Timestamp("2016-03-04")


def test_visible_from_the_first_bar_closing_at_or_after_the_release():
    index = pd.date_range("2020-01-01", periods=6, freq="D")  # bars close at the next midnight
    release = pd.DatetimeIndex(["2020-01-03", "2020-01-03 00:00:00.000000001", "2020-01-05 12:00"])
    series = ExogenousSeries("x", pd.DatetimeIndex(["2020-01-01", "2020-01-02", "2020-01-03"]),
                             np.array([1.0, 2.0, 3.0]), release)
    seen = visible_index(series, bar_close_times(index, DAY))
    # bar 1 (2020-01-02) closes exactly at the first release; the second comes a nanosecond later: bar 2
    np.testing.assert_array_equal(seen, [-1, 0, 1, 1, 2, 2])
    utc = index.tz_localize("Europe/Berlin")  # aware bars close at their UTC instants (an hour earlier)
    np.testing.assert_array_equal(visible_index(series, bar_close_times(utc, DAY)), [-1, -1, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="base_freq"):
        bar_close_times(index, pd.Timedelta(0))


def test_release_times_follow_daylight_saving():
    days = pd.DatetimeIndex(["2018-01-15", "2018-07-16"])
    assert list(release_times(days, 1, "09:30")) == [pd.Timestamp("2018-01-16 14:30"),
                                                    pd.Timestamp("2018-07-17 13:30")]


def test_series_invariants_are_checked():
    dates = pd.DatetimeIndex(["2020-01-01", "2020-01-02"])
    good = dict(name="x", dates=dates, values=np.array([1.0, 2.0]), released_at=dates + DAY)
    ExogenousSeries(**good)
    for change, message in [
        ({"values": np.array([1.0])}, "same"), ({"change": "pct"}, "change must"),
        ({"values": np.array([1.0, np.nan])}, "finite"),
        ({"values": np.array([1.0, -1.0]), "change": "log"}, "positive"),
        ({"dates": dates[::-1], "released_at": dates[::-1] + 2 * DAY}, "strictly increasing"),
        ({"released_at": (dates + DAY)[::-1]}, "dates' order"), ({"released_at": dates - DAY}, "before its date"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExogenousSeries(**{**good, **change})
    with pytest.raises(ValueError, match="unknown exogenous series 'vixx'"):
        bundled_exogenous("vixx")


def write(tmp_path, text: str, name: str = "macro.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_user_csv_with_release_times(tmp_path):
    path = write(tmp_path, "Date,Value,Released_At\n2020-01-01,1.5,2020-02-14 08:30-05:00\n"
                           "2020-02-01,1.7,2020-03-13T13:30:00\n2020-03-01,1.6,2020-04-14 13:30\n")
    series = load_exogenous(str(path))
    assert series.name == "macro" and list(series.values) == [1.5, 1.7, 1.6]
    assert series.released_at[0] == pd.Timestamp("2020-02-14 13:30")  # offsets are converted to UTC
    assert series.max_age == 3 * pd.Timedelta(days=30)  # three median gaps between dates (31 and 29 days)


def test_a_user_csv_with_a_lag(tmp_path):
    path = write(tmp_path, "date,value\n2020-01-01,1\n2020-01-02,2\n")
    series = load_exogenous(f"{path}@36h")
    assert list(series.released_at) == [pd.Timestamp("2020-01-02 12:00"), pd.Timestamp("2020-01-03 12:00")]
    assert read_exogenous_csv(path, pd.Timedelta("1h"), name="own").name == "own"
    with pytest.raises(DataValidationError, match="lag 0 days 00:00:00 is not positive"):
        read_exogenous_csv(path, pd.Timedelta(0))
    single = read_exogenous_csv(write(tmp_path, "date,value\n2020-01-01,1\n", "one.csv"), pd.Timedelta("1D"))
    assert single.max_age == pd.Timedelta(days=3)  # one line: three days


@pytest.mark.parametrize(("text", "spec_tail", "message"), [
    ("date,val\n2020-01-01,1\n", "", "header must be date,value"),
    ("date,value\n", "@1D", "no data rows"),
    ("date,value\n2020-01-01,1\nsoon,2\n", "@1D", "line 3: date 'soon' is not a date"),
    ("date,value\n2020-01-01,1\n2020-01-02,\n", "@1D", "line 3: value '' is not a finite number"),
    ("date,value\n2020-01-01,x\n", "@1D", "line 2: value 'x'"),
    ("date,value\n2020-01-01,1\n2020-01-01,2\n", "@1D", "line 3: date 2020-01-01 repeats the date on line 2"),
    ("date,value\n2020-01-02,1\n2020-01-01,2\n", "@1D", "line 3: date 2020-01-01 is earlier than"),
    ("date,value,released_at\n2020-01-02,1,2020-01-01\n", "", "line 2: released_at 2020-01-01 00:00:00 is not after"),
    ("date,value,released_at\n2020-01-02,1,2020-01-02\n", "", "line 2: released_at 2020-01-02 00:00:00 is not after"),
    ("date,value,released_at\n2020-01-01,1,2020-03-01\n2020-02-01,2,2020-02-20\n", "",
     "line 3: released_at 2020-02-20 00:00:00 is earlier than line 2's"),
    ("date,value,released_at\n2020-01-01,1,\n", "", "line 2: released_at '' is not a date"),
    ("date,value\n2020-01-01,1\n", "", "no released_at column and no publication lag"),
    ("date,value,released_at\n2020-01-01,1,2020-01-02\n", "@1D", "has a released_at column and a lag"),
    ("date,value\n2020-01-01,1\n", "@-1D", "is not positive"),
    ("date,value\n2020-01-01,1\n", "@soon", "the lag 'soon' is not a duration"),
    ("date,value\n2020-01-01,1\n", "@1D" + "x" * 0, None),
])
def test_invalid_csvs_get_one_line_naming_the_line(tmp_path, text, spec_tail, message):
    path = write(tmp_path, text)
    if message is None:
        assert len(load_exogenous(f"{path}{spec_tail}").dates) == 1
        return
    with pytest.raises(DataValidationError, match=message) as err:
        load_exogenous(f"{path}{spec_tail}")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_csv_errors_outside_the_rows(tmp_path):
    with pytest.raises(DataValidationError, match="no such exogenous CSV file"):
        load_exogenous(str(tmp_path / "absent.csv"))
    with pytest.raises(DataValidationError, match="not a readable CSV"):
        load_exogenous(f"{write(tmp_path, '')}@1D")
    path = write(tmp_path, "date,value\n2020-01-01,0\n")
    with pytest.raises(DataValidationError, match="line 2: value 0.0 is not positive"):
        read_exogenous_csv(path, DAY, change="log")


def test_a_user_release_after_the_new_york_close_is_not_seen_by_that_days_bar(tmp_path):
    # A daily US equity bar labelled D closes at 16:00 New York, before the end of D in UTC: a user's value
    # released at 16:15 New York on D must wait for bar D + 1 (review finding: the end-of-date reading let it in).
    index = pd.DatetimeIndex(["2018-01-02", "2018-01-03", "2018-01-04"])
    path = write(tmp_path, "date,value,released_at\n2018-01-01,1,2018-01-02T16:15:00-05:00\n"
                           "2018-01-02,2,2018-01-03T08:30:00-05:00\n", "late.csv")
    series = load_exogenous(str(path))
    assert series.earliest_close
    np.testing.assert_array_equal(visible_index(series, bar_close_times(index, DAY), DAY), [-1, 0, 1])
    # a one-day lag: the value dated D is public at the start of D + 1, so bar D + 1 (and not bar D) sees it
    lag_file = write(tmp_path, "date,value\n2018-01-02,1\n2018-01-03,2\n", "lag.csv")
    lagged = load_exogenous(f"{lag_file}@1D")
    np.testing.assert_array_equal(visible_index(lagged, bar_close_times(index, DAY), DAY), [-1, 0, 1])
    # the end-of-date reading (bundled series, chosen after the 16:00 close) would show both a bar earlier
    np.testing.assert_array_equal(visible_index(lagged, bar_close_times(index, DAY)), [0, 1, 1])
