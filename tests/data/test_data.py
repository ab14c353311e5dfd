"""Loading, validation, fingerprinting and splitting of OHLCV data (sentio_lab.data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import (
    BUNDLED_DATASETS,
    DEFAULT_MIN_ROWS,
    OHLCV_COLUMNS,
    DataValidationError,
    MarketData,
    bars_needed,
    canonicalize,
    chronological_split,
    fingerprint,
    infer_bar_freq,
    load_market,
    read_ohlcv_file,
    to_market,
)

N_BARS = 80
BAD_ROW = 37  # the row a bad-input test corrupts; its timestamp must appear in the error message


def make_ohlcv(n: int = N_BARS, seed: int = 0, freq: str = "D", start: str = "2021-01-04") -> pd.DataFrame:
    """A valid random-walk OHLCV frame with lower-case columns and a DatetimeIndex."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.r_[100.0, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, n))
    volume = rng.integers(1_000, 5_000, n).astype(np.float64)
    index = pd.date_range(start, periods=n, freq=freq)
    columns = {"open": open_, "high": high, "low": low, "close": close, "volume": volume}
    return pd.DataFrame(columns, index=index)


def ts(frame: pd.DataFrame, row: int) -> str:
    """The timestamp of ``row`` as the error messages print it."""
    return str(frame.index[row])


# ---------------------------------------------------------------------------------------- bundled data
@pytest.fixture(scope="module")
def bundled() -> dict[str, MarketData]:
    return {name: load_market(name) for name in BUNDLED_DATASETS}


@pytest.mark.parametrize(
    ("name", "freq"), [("sp500", pd.Timedelta(days=1)), ("nasdaq", pd.Timedelta(days=1)),
                       ("eurusd_1h", pd.Timedelta(hours=1))]
)
def test_bundled_dataset_is_canonical(bundled, name, freq):
    market = bundled[name]
    frame = market.frame
    assert market.name == name
    assert tuple(frame.columns) == OHLCV_COLUMNS
    assert all(dtype == np.float64 for dtype in frame.dtypes)
    assert isinstance(frame.index, pd.DatetimeIndex)
    assert frame.index.name == "timestamp"
    assert frame.index.is_unique and frame.index.is_monotonic_increasing
    assert market.bar_freq == freq
    assert len(market) == len(frame) > 1000
    # Validated properties hold on the real data.
    values = frame.to_numpy()
    assert np.isfinite(values).all()
    assert (frame[["open", "high", "low", "close"]].to_numpy() > 0).all()
    assert (frame["high"] >= frame[["open", "close"]].max(axis=1)).all()
    assert (frame["low"] <= frame[["open", "close"]].min(axis=1)).all()


@pytest.mark.parametrize("name", list(BUNDLED_DATASETS))
def test_bundled_dataset_keeps_every_raw_row(bundled, name):
    raw = BUNDLED_DATASETS[name]()
    raw.index = pd.DatetimeIndex(raw.index)
    default_start = BUNDLED_DATASETS[name].default_start
    if default_start is not None:  # the default range: every raw row from the default start on
        raw = raw.loc[default_start:]
    market = bundled[name]
    assert len(market) == len(raw)  # nothing dropped or resampled
    raw_close = raw[[c for c in raw.columns if str(c).strip().lower() == "close"][0]]
    np.testing.assert_array_equal(market.frame["close"].to_numpy(), raw_close.to_numpy(dtype=np.float64))


def test_fingerprint_is_stable_and_sensitive(bundled):
    first = bundled["sp500"]
    again = load_market("sp500")
    assert again.fingerprint == first.fingerprint
    assert len(first.fingerprint) == 16
    assert len({m.fingerprint for m in bundled.values()}) == len(bundled)

    changed = first.frame.copy()
    changed.iloc[1234, changed.columns.get_loc("close")] += 1e-6
    assert to_market(changed, name="x").fingerprint != first.fingerprint
    assert fingerprint(changed) != first.fingerprint

    shifted = first.frame.copy()
    shifted.index = shifted.index + pd.Timedelta(hours=1)
    assert fingerprint(shifted) != first.fingerprint
    # The name is not data: the same values under another name share the fingerprint.
    assert to_market(first.frame, name="renamed").fingerprint == first.fingerprint


# ------------------------------------------------------------------------------------------ user files
def test_csv_round_trip_with_messy_column_names(tmp_path):
    frame = make_ohlcv()
    messy = pd.DataFrame(
        {
            "Date": frame.index.strftime("%Y-%m-%d"),
            "Open": frame["open"].to_numpy(),
            " HIGH ": frame["high"].to_numpy(),
            "Low": frame["low"].to_numpy(),
            "CLOSE": frame["close"].to_numpy(),
            "Adj Close": frame["close"].to_numpy() * 0.5,  # extra column: ignored
            "Volume": frame["volume"].astype(np.int64).to_numpy(),  # integer volume becomes float64
        }
    )
    path = tmp_path / "prices.csv"
    messy.to_csv(path, index=False)
    market = load_market(path)
    assert market.name == str(path)
    assert tuple(market.frame.columns) == OHLCV_COLUMNS
    assert all(dtype == np.float64 for dtype in market.frame.dtypes)
    assert len(market) == len(frame)
    np.testing.assert_array_equal(market.frame.index.to_numpy(), frame.index.to_numpy())
    np.testing.assert_array_equal(market.frame.to_numpy(), frame.to_numpy())
    assert market.bar_freq == pd.Timedelta(days=1)
    assert market.fingerprint == fingerprint(canonicalize(frame))


def test_csv_written_by_pandas_uses_first_column_as_index(tmp_path):
    frame = make_ohlcv(freq="h")
    path = tmp_path / "hourly.CSV"
    frame.to_csv(path)  # the index becomes an unnamed first column
    market = load_market(str(path))
    assert market.bar_freq == pd.Timedelta(hours=1)
    np.testing.assert_array_equal(market.frame.index.to_numpy(), frame.index.to_numpy())
    np.testing.assert_array_equal(market.frame.to_numpy(), frame.to_numpy())


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_parquet_round_trip_with_datetime_index(tmp_path, suffix):
    frame = make_ohlcv(freq="h")
    frame.columns = ["Open", "High", "Low", "Close", "Volume"]
    path = tmp_path / f"prices{suffix}"
    frame.to_parquet(path)
    raw = read_ohlcv_file(path)
    assert isinstance(raw.index, pd.DatetimeIndex)
    market = load_market(path)
    assert market.bar_freq == pd.Timedelta(hours=1)
    np.testing.assert_array_equal(market.frame.index.to_numpy(), frame.index.to_numpy())
    np.testing.assert_array_equal(market.frame.to_numpy(), frame.to_numpy())


def test_unsupported_extension(tmp_path):
    path = tmp_path / "prices.xlsx"
    path.write_bytes(b"not a spreadsheet")
    with pytest.raises(DataValidationError, match=r"unsupported file type '\.xlsx'") as err:
        load_market(path)
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_dataset(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(FileNotFoundError, match="neither a bundled dataset") as err:
        load_market(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="sp500"):
        load_market("sp501")


def test_bad_file_error_names_the_file_and_the_row(tmp_path):
    frame = make_ohlcv()
    frame.iloc[BAD_ROW, frame.columns.get_loc("volume")] = -5.0
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index_label="Date")
    with pytest.raises(DataValidationError, match="negative volume") as err:
        load_market(path)
    assert str(path) in str(err.value)
    assert ts(frame, BAD_ROW) in str(err.value)


# ------------------------------------------------------------------------------------------ validation
def test_valid_input_keeps_every_row_and_value():
    frame = make_ohlcv()
    shuffled_columns = frame[["volume", "close", "low", "open", "high"]].rename(columns=str.upper)
    out = canonicalize(shuffled_columns)
    assert len(out) == len(frame)
    assert tuple(out.columns) == OHLCV_COLUMNS
    np.testing.assert_array_equal(out.to_numpy(), frame.to_numpy())
    assert out is not shuffled_columns
    # The input is not modified.
    assert list(shuffled_columns.columns) == ["VOLUME", "CLOSE", "LOW", "OPEN", "HIGH"]


def test_string_index_is_parsed():
    frame = make_ohlcv()
    frame.index = frame.index.strftime("%Y-%m-%d %H:%M")
    out = canonicalize(frame)
    assert isinstance(out.index, pd.DatetimeIndex)
    assert out.index[BAD_ROW] == pd.Timestamp("2021-01-04") + pd.Timedelta(days=BAD_ROW)


def test_missing_columns_are_named():
    frame = make_ohlcv().drop(columns=["volume", "low"])
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['low', 'volume'\]") as err:
        canonicalize(frame, source="my.csv")
    assert "my.csv" in str(err.value)
    assert "'open'" in str(err.value)  # it lists what it found


def test_duplicated_column_case_insensitive():
    frame = make_ohlcv()
    frame[" Close"] = frame["close"]
    with pytest.raises(DataValidationError, match="column 'close' appears twice"):
        canonicalize(frame)


def _set(column: str, value):
    def mutate(frame: pd.DataFrame) -> pd.DataFrame:
        if isinstance(value, str):
            frame[column] = frame[column].astype(object)
        frame.iloc[BAD_ROW, frame.columns.get_loc(column)] = value
        return frame

    return mutate


def _high_below(frame: pd.DataFrame) -> pd.DataFrame:
    o, c = frame["open"].iloc[BAD_ROW], frame["close"].iloc[BAD_ROW]
    frame.iloc[BAD_ROW, frame.columns.get_loc("high")] = 0.5 * (o + c) if o != c else o * 0.999
    frame.iloc[BAD_ROW, frame.columns.get_loc("low")] = min(o, c) * 0.5
    return frame


def _low_above(frame: pd.DataFrame) -> pd.DataFrame:
    o, c = frame["open"].iloc[BAD_ROW], frame["close"].iloc[BAD_ROW]
    frame.iloc[BAD_ROW, frame.columns.get_loc("low")] = 0.5 * (o + c) if o != c else o * 1.001
    frame.iloc[BAD_ROW, frame.columns.get_loc("high")] = max(o, c) * 2
    return frame


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("close", "12.3x"), r"non-numeric 'close'"),
        (_set("open", "n/a"), r"non-numeric 'open'"),
        (_set("volume", np.nan), r"NaN or inf in 'volume'"),
        (_set("high", np.inf), r"NaN or inf in 'high'"),
        (_set("close", -np.inf), r"NaN or inf in 'close'"),
        (_set("low", 0.0), r"non-positive 'low'"),
        (_set("close", -3.0), r"non-positive 'close'"),
        (_set("volume", -1.0), r"negative volume"),
        (_high_below, r"high below max\(open, close\)"),
        (_low_above, r"low above min\(open, close\)"),
    ],
    ids=["text-close", "text-open", "nan", "inf", "minus-inf", "zero-price", "negative-price",
         "negative-volume", "high-below", "low-above"],
)
def test_bad_value_names_problem_and_row(mutate, message):
    frame = make_ohlcv()
    bad = mutate(frame.copy())
    with pytest.raises(DataValidationError, match=message) as err:
        canonicalize(bad, source="feed")
    text = str(err.value)
    assert text.startswith("feed: ")
    assert "1 row(s)" in text
    assert ts(frame, BAD_ROW) in text
    assert ts(frame, BAD_ROW + 1) not in text


def test_many_bad_rows_are_counted_not_all_listed():
    frame = make_ohlcv()
    rows = [3, 9, 10, 20, 41, 42, 70]
    frame.iloc[rows, frame.columns.get_loc("volume")] = -1.0
    with pytest.raises(DataValidationError, match=r"7 row\(s\)") as err:
        canonicalize(frame)
    text = str(err.value)
    assert "and 2 more" in text
    for row in rows[:5]:
        assert ts(frame, row) in text
    assert ts(frame, rows[5]) not in text


def test_unsorted_timestamps():
    frame = make_ohlcv()
    order = list(range(len(frame)))
    order[BAD_ROW], order[BAD_ROW + 1] = order[BAD_ROW + 1], order[BAD_ROW]
    swapped = frame.iloc[order]
    with pytest.raises(DataValidationError, match="not in increasing order") as err:
        canonicalize(swapped)
    # Row BAD_ROW + 1 now holds the earlier bar: it is the one out of order.
    assert ts(frame, BAD_ROW) in str(err.value)
    assert "nothing is reordered" in str(err.value)


def test_duplicate_timestamps():
    frame = make_ohlcv()
    index = frame.index.to_numpy().copy()
    index[BAD_ROW + 1] = index[BAD_ROW]
    frame.index = pd.DatetimeIndex(index)
    with pytest.raises(DataValidationError, match="duplicate timestamp") as err:
        canonicalize(frame)
    assert "2 row(s)" in str(err.value)  # both copies are reported
    assert ts(frame, BAD_ROW) in str(err.value)


def test_unparseable_index_names_the_label():
    frame = make_ohlcv()
    labels = list(frame.index.strftime("%Y-%m-%d"))
    labels[BAD_ROW] = "not-a-date"
    frame.index = pd.Index(labels)
    with pytest.raises(DataValidationError, match="not parseable as timestamps") as err:
        canonicalize(frame)
    assert "not-a-date" in str(err.value)


@pytest.mark.parametrize("index", [pd.RangeIndex(N_BARS), pd.Index(np.arange(20200101, 20200101 + N_BARS))])
def test_numeric_index_is_rejected_not_read_as_nanoseconds(index):
    frame = make_ohlcv()
    frame.index = index
    with pytest.raises(DataValidationError, match="not parseable as timestamps .*numeric") as err:
        canonicalize(frame)
    assert repr(index[0]) in str(err.value)


def test_missing_timestamp_names_row_position():
    frame = make_ohlcv()
    labels = list(frame.index.strftime("%Y-%m-%d"))
    labels[BAD_ROW] = None
    frame.index = pd.Index(labels)
    with pytest.raises(DataValidationError, match="missing timestamp") as err:
        canonicalize(frame)
    assert f"[{BAD_ROW}]" in str(err.value)


def test_too_few_rows():
    frame = make_ohlcv(n=10)
    with pytest.raises(DataValidationError, match=rf"too few rows \(10\); at least {DEFAULT_MIN_ROWS}"):
        canonicalize(frame)
    assert len(canonicalize(frame, min_rows=10)) == 10
    with pytest.raises(DataValidationError, match="too few rows"):
        to_market(frame, name="short", min_rows=11)


def test_bar_freq_is_median_gap():
    frame = make_ohlcv(n=60, freq="B")  # business days: weekend gaps of 3 days are the minority
    assert infer_bar_freq(frame) == pd.Timedelta(days=1)
    assert to_market(frame, name="b").bar_freq == pd.Timedelta(days=1)
    four_hourly = make_ohlcv(freq="4h")
    assert infer_bar_freq(four_hourly) == pd.Timedelta(hours=4)
    single = to_market(make_ohlcv(n=1), name="one", min_rows=1)
    assert single.bar_freq == pd.Timedelta(0)


# ---------------------------------------------------------------------------------------------- splits
def _check_partition(splits, frame):
    train, val, test = splits["train"], splits["validation"], splits["test"]
    assert list(splits) == ["train", "validation", "test"]
    assert train.start == 0 and train.stop == val.start and val.stop == test.start and test.stop == len(frame)
    assert len(train) + len(val) + len(test) == len(frame)
    for split in (train, test) + ((val,) if len(val) else ()):
        assert split.first_timestamp == frame.index[split.start]
        assert split.last_timestamp == frame.index[split.stop - 1]
    assert train.last_timestamp < test.first_timestamp
    if len(val):
        assert train.last_timestamp < val.first_timestamp <= val.last_timestamp < test.first_timestamp


def test_split_by_fractions():
    market = to_market(make_ohlcv(n=100), name="m")
    splits = chronological_split(market, 0.6, 0.2)
    assert [(s.start, s.stop) for s in splits.values()] == [(0, 60), (60, 80), (80, 100)]
    assert [s.name for s in splits.values()] == ["train", "validation", "test"]
    _check_partition(splits, market.frame)
    # A bare frame works the same as MarketData.
    assert chronological_split(market.frame, 0.6, 0.2) == splits
    defaults = chronological_split(market)
    assert (len(defaults["train"]), len(defaults["validation"]), len(defaults["test"])) == (60, 20, 20)


def test_split_real_data(bundled):
    market = bundled["sp500"]
    splits = chronological_split(market, 0.7, 0.15)
    _check_partition(splits, market.frame)
    assert abs(len(splits["train"]) - 0.7 * len(market)) <= 1


def test_split_with_empty_validation():
    frame = make_ohlcv(n=100)
    splits = chronological_split(frame, 0.8, 0.0)
    assert len(splits["validation"]) == 0
    assert splits["train"].stop == splits["test"].start == 80
    _check_partition(splits, frame)


def test_split_by_timestamps():
    frame = make_ohlcv(n=100, freq="B", start="2021-01-04")  # Monday
    # Validation begins at the first bar at or after the timestamp; a weekend date moves to Monday.
    splits = chronological_split(frame, "2021-02-01", pd.Timestamp("2021-03-06"))
    assert splits["validation"].first_timestamp == pd.Timestamp("2021-02-01")
    assert splits["train"].last_timestamp == pd.Timestamp("2021-01-29")
    assert splits["test"].first_timestamp == pd.Timestamp("2021-03-08")
    assert splits["validation"].last_timestamp == pd.Timestamp("2021-03-05")
    _check_partition(splits, frame)


@pytest.mark.parametrize(
    ("train", "validation", "message"),
    [
        (0.0, 0.2, "fractions"),
        (-0.1, 0.2, "fractions"),
        (0.6, -0.1, "fractions"),
        (0.6, 0.4, "fractions"),
        (0.9, 0.3, "fractions"),
        (0.6, "2021-02-01", "both as fractions or both as timestamps"),
        ("2021-02-01", 0.2, "both as fractions or both as timestamps"),
        (0.001, 0.2, "the train range is empty"),
        (0.6, 0.399, "the test range is empty"),
        ("2020-01-01", "2021-02-01", "the train range is empty"),
        ("2021-02-01", "2030-01-01", "the test range is empty"),
        ("2021-03-01", "2021-02-01", "the validation range ends before it starts"),
    ],
)
def test_split_errors(train, validation, message):
    frame = make_ohlcv(n=100)
    with pytest.raises(ValueError, match=message):
        chronological_split(frame, train, validation)


def test_split_errors_name_the_fraction_flags():
    with pytest.raises(DataValidationError, match=r"--train-fraction 0\.9 \(train_fraction=0\.9 in Python\)") as err:
        chronological_split(make_ohlcv(n=100), 0.9, 0.3)
    assert err.value.flag == "--train-fraction" and "--validation-fraction 0.3" in str(err.value)
    with pytest.raises(DataValidationError, match="the test range is empty .*change --train-fraction"):
        chronological_split(make_ohlcv(n=100), 0.6, 0.399)


# ------------------------------------------------------------------------------- one-line, flag-naming errors
def test_a_missing_file_is_a_value_error_naming_the_dataset_flag(tmp_path):
    with pytest.raises(ValueError, match=r"check --dataset \(source= in Python\)") as err:
        load_market(tmp_path / "nowhere.csv")
    assert isinstance(err.value, FileNotFoundError | DataValidationError) and err.value.flag == "--dataset"
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataValidationError)


def test_data_errors_keep_flag_and_value_through_pickling():
    # Experiment workers send exceptions between processes.
    import pickle

    with pytest.raises(DataValidationError) as err:
        load_market("sp500", start="1999")
    copy = pickle.loads(pickle.dumps(err.value))
    assert type(copy) is DataValidationError and str(copy) == str(err.value)
    assert (copy.flag, copy.value) == ("--data-start", "2013-05-10")


@pytest.mark.parametrize(
    "call",
    [lambda: load_market("sp500", start="1999"), lambda: load_market("sp500", start="2000", end="2004"),
     lambda: load_market("sp500", end="2010"), lambda: load_market("nasdaq", start="soon"),
     lambda: load_market("nasdaq", start="2030"), lambda: load_market("nasdaq", stale_opens="maybe"),
     lambda: chronological_split(make_ohlcv(n=100), 0.9, 0.3)],
)
def test_data_errors_are_one_line_and_name_a_flag(call):
    with pytest.raises(DataValidationError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and err.value.flag is not None and err.value.flag in text
    assert " in Python" in text  # library callers read the same message: both spellings


# ------------------------------------------------------------------------------------------ too few bars
def _prepare(path, window, episode_length, **kwargs):
    from sentio_lab.env.market import prepare_market
    from sentio_lab.features import FeatureConfig

    return prepare_market(path, FeatureConfig(), window=window, episode_length=episode_length, **kwargs)


def _train_and_evaluate_envs(market, window, episode_length):
    """Build what a training run builds: the training env, and one greedy episode over validation and test."""
    from sentio_lab.env import TradingEnv

    start, stop = market.range("train")
    TradingEnv(market.arrays, num_envs=1, window=window, episode_length=episode_length, start=start, stop=stop)
    for name in ("validation", "test"):
        start, stop = market.range(name)
        first = max(start, market.arrays.first_valid + window - 1)
        env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=stop - 1 - first, start=start,
                         stop=stop)
        env.reset(starts=[first])


@pytest.mark.parametrize(
    ("window", "episode_length", "binding"),
    [(16, 64, "episode"),  # warm-up + window + episode fill the training range
     (4, 10, "fit")],  # the features' 50 fitting rows after the warm-up bind instead
)
def test_too_few_bars_names_the_count_and_the_count_is_exact(tmp_path, window, episode_length, binding):
    from sentio_lab.features.observation import MIN_TRAIN_ROWS

    frame = make_ohlcv(n=400)
    path = tmp_path / "short.csv"
    frame.to_csv(path)
    full = _prepare(path, window, episode_length)
    warmup = full.features.first_valid
    needed = bars_needed(warmup=warmup, window=window, episode_length=episode_length, train_fraction=0.6,
                         validation_fraction=0.2, min_train_rows=MIN_TRAIN_ROWS, min_rows=DEFAULT_MIN_ROWS)
    episode_bars, fit_bars = warmup + window + episode_length, warmup + MIN_TRAIN_ROWS
    assert (episode_bars > fit_bars) == (binding == "episode")
    # Exactly `needed` bars: the market loads and every env a run builds works.
    frame.iloc[:needed].to_csv(path)
    _train_and_evaluate_envs(_prepare(path, window, episode_length), window, episode_length)
    # One bar fewer: one line saying how many are needed, naming the flags.
    frame.iloc[: needed - 1].to_csv(path)
    with pytest.raises(DataValidationError) as err:
        _prepare(path, window, episode_length)
    text = str(err.value)
    assert "\n" not in text and f"{needed - 1} bars, too few to train on: at least {needed} are needed" in text
    assert f"{warmup} feature warm-up bars + a {window}-bar --window + {episode_length} --episode-length" in text
    assert "--data-start / --data-end" in text and "start=, end=" in text
    # ... and the count is tight: without the check the run itself fails on that file.
    with pytest.raises(ValueError):
        _train_and_evaluate_envs(_prepare(path, None, None), window, episode_length)


def test_too_few_bars_suggests_the_longest_episode_that_fits(tmp_path):
    frame = make_ohlcv(n=300)
    path = tmp_path / "short.csv"
    frame.to_csv(path)
    with pytest.raises(DataValidationError, match="or --episode-length 128 or less") as err:
        _prepare(path, 32, 256)
    assert (err.value.flag, err.value.value) == ("--episode-length", "128")
    assert "episode_length=128" in str(err.value)
    _train_and_evaluate_envs(_prepare(path, 32, 128), 32, 128)  # the suggestion works
    with pytest.raises(DataValidationError):
        _prepare(path, 32, 129)
    # Too short for any episode: no episode-length suggestion, the range flags instead.
    frame.iloc[:60].to_csv(path)
    with pytest.raises(DataValidationError, match="too few to train on") as err:
        _prepare(path, 32, 256)
    assert err.value.flag == "--data-start" and err.value.value is None and "--episode-length 0" not in str(err.value)


def test_bars_needed_counts_the_evaluation_ranges_and_refuses_bad_input():
    # A training range that is almost everything leaves the test range short: 2 test bars are needed.
    n = bars_needed(warmup=0, window=1, episode_length=1, train_fraction=0.98, validation_fraction=0.0)
    assert n - round(0.98 * n) >= 2 and (n - 1) - round(0.98 * (n - 1)) < 2
    assert bars_needed(warmup=0, window=1, episode_length=1, train_fraction=0.5, validation_fraction=0.0,
                       min_rows=DEFAULT_MIN_ROWS) == DEFAULT_MIN_ROWS
    with pytest.raises(ValueError, match="must be >= 0"):
        bars_needed(warmup=-1, window=1, episode_length=1, train_fraction=0.5, validation_fraction=0.2)
    with pytest.raises(DataValidationError, match="fractions"):
        bars_needed(warmup=0, window=1, episode_length=1, train_fraction=0.9, validation_fraction=0.2)


# ---------------------------------------------------------------------------------- timestamps and columns
def test_local_times_across_a_daylight_saving_change_are_read_as_utc(tmp_path):
    """Offsets that change inside a file (+01:00 then +02:00) are the same instants in UTC: kept, not refused."""
    frame = make_ohlcv(n=60, freq="h", start="2021-03-27 12:00")
    local = frame.index.tz_localize("UTC").tz_convert("Europe/Berlin")  # CET -> CEST on 2021-03-28 02:00
    text = frame.copy()
    text.index = [t.isoformat() for t in local]
    path = tmp_path / "berlin.csv"
    text.to_csv(path, index_label="Date")
    assert "+01:00" in path.read_text() and "+02:00" in path.read_text()
    market = load_market(path)
    assert str(market.frame.index.tz) == "UTC" and market.bar_freq == pd.Timedelta(hours=1)
    np.testing.assert_array_equal(market.frame.index, frame.index.tz_localize("UTC"))  # the same instants
    # One offset throughout keeps it; naive stays naive (the loader never guesses a zone).
    single = frame.copy()
    single.index = frame.index.tz_localize("UTC").tz_convert("Asia/Tokyo")
    single.to_csv(path, index_label="Date")
    assert str(load_market(path).frame.index.tz) == "UTC+09:00"
    frame.to_csv(path, index_label="Date")
    assert load_market(path).frame.index.tz is None


def test_naive_and_aware_timestamps_mixed_are_refused_in_one_line(tmp_path):
    frame = make_ohlcv(n=60, freq="h")
    text = frame.copy()
    text.index = [t.isoformat() + ("+00:00" if i == 0 else "") for i, t in enumerate(frame.index)]
    path = tmp_path / "mixed.csv"
    text.to_csv(path, index_label="Date")
    with pytest.raises(DataValidationError, match="not parseable as timestamps .* write ISO 8601") as err:
        load_market(path)
    assert "\n" not in str(err.value)


def test_extra_columns_are_ignored_and_column_order_does_not_matter(tmp_path):
    frame = make_ohlcv()
    extra = frame[["volume", "close", "low", "high", "open"]].assign(Symbol="MSFT", Trades=7, Notes="x")
    path = tmp_path / "extra.csv"
    extra.to_csv(path, index_label="timestamp")
    market = load_market(path)
    assert tuple(market.frame.columns) == OHLCV_COLUMNS
    np.testing.assert_array_equal(market.frame.to_numpy(), frame.to_numpy())
    assert market.fingerprint == fingerprint(canonicalize(frame))
    # A date-only column named "Date" in any case is the index; a column of timestamps not named so must be first.
    frame.to_csv(path, index_label="DATE", date_format="%Y-%m-%d")
    assert load_market(path).frame.index.equals(frame.index.rename("timestamp"))


def test_what_docs_data_md_says_about_messy_timestamp_columns(tmp_path):
    # Separate Date and Time columns (MetaTrader exports): Date is the index, so hourly bars collide.
    hours = pd.DataFrame({"Date": ["2020-01-02"] * 60, "Time": [f"{h % 24:02d}:00" for h in range(60)],
                          "Open": 1.0, "High": 1.1, "Low": 0.9, "Close": 1.05, "Volume": 1.0})
    path = tmp_path / "mt.csv"
    hours.to_csv(path, index=False)
    with pytest.raises(DataValidationError, match=r"duplicate timestamp\(s\) in 60 row\(s\)"):
        load_market(path)
    # Day-first text is read month-first until a day above 12 appears, then refused (one line).
    frame = make_ohlcv(n=60)
    text = frame.copy()
    text.index = frame.index.strftime("%d.%m.%Y")
    text.to_csv(path, index_label="Date")
    with pytest.raises(DataValidationError, match='not parseable as timestamps .*"13.01.2021"') as err:
        load_market(path)
    assert "\n" not in str(err.value)
    # Compressed CSV.
    frame.to_csv(tmp_path / "prices.csv.gz", index_label="Date")
    np.testing.assert_array_equal(load_market(tmp_path / "prices.csv.gz").frame.to_numpy(), frame.to_numpy())


def test_a_variant_refuses_a_short_file_with_the_count_before_training(tmp_path):
    """The variants build their market through training.market_from, which passes their window and episode."""
    from sentio_lab import ppo

    path = tmp_path / "short.csv"
    make_ohlcv(n=300).to_csv(path)
    with pytest.raises(DataValidationError, match="300 bars, too few to train on: at least 513 are needed") as err:
        ppo.market_for(ppo.Args.from_flat(dataset=str(path), feature_cache_dir=None))
    assert (err.value.flag, err.value.value) == ("--episode-length", "128")
    market = ppo.market_for(ppo.Args.from_flat(dataset=str(path), feature_cache_dir=None, episode_length=128))
    assert len(market.data) == 300
