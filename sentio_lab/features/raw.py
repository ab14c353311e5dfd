"""Raw (un-normalised) features: the producers run on the base bars and on every higher-timeframe view, with an
optional Parquet cache keyed by the data fingerprint, what the features depend on and the code version."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import talib

from sentio_lab.data import canonicalize, fingerprint
from sentio_lab.data.timeframes import resample_causal
from sentio_lab.features.config import FeatureConfig
from sentio_lab.features.registry import (
    FEATURE_VERSION,
    Bars,
    FeatureProducer,
    bank_optional_columns,
    registered_producers,
)


@dataclass
class RawFeatures:
    """Un-normalised features of every block, NaN during each column's warm-up."""

    values: np.ndarray
    """float64 ``(T, F)``."""
    names: list[str]
    blocks: dict[str, slice]
    first_valid: int
    """First row at which every column is defined by its declaration (max over blocks)."""
    block_first_valid: dict[str, int] = field(default_factory=dict)


def compute_features(bars: Bars, producers: Iterable[FeatureProducer]) -> tuple[np.ndarray, list[str], int]:
    """Run ``producers`` on ``bars``: ``(values (T, F) float64, names, max lookback)``."""
    columns: list[np.ndarray] = []
    names: list[str] = []
    lookback = 0
    for producer in producers:
        out = producer(bars)
        for key, col in out.items():
            columns.append(col)
            names.append(key)
        lookback = max(lookback, producer.lookback)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate feature column names {dup}")
    values = np.column_stack(columns) if columns else np.empty((len(bars), 0))
    return values, names, lookback


def _validated_frame(frame: pd.DataFrame, source: str = "frame", bank: str = "basic") -> pd.DataFrame:
    """Canonical OHLCV frame or a clear error (see :func:`sentio_lab.data.canonicalize`); the columns ``bank``
    never reads may be absent or NaN (the "close" bank on close-only data)."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{source}: frame must be a pandas DataFrame, got {type(frame).__name__}")
    return canonicalize(frame, source=source, min_rows=1, optional=bank_optional_columns(bank))


def _raw_cache_key(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> str:
    """Cache key: data fingerprint + what the raw features depend on (bank, timeframes, code version)."""
    payload = {
        "fingerprint": fingerprint(frame),
        "bank": config.bank,
        "timeframes": list(config.timeframes),
        "session_close": config.session_close if config.timeframes else None,
        "base_freq_ns": int(base_freq.value),
        "feature_version": FEATURE_VERSION,
        "talib": talib.__version__,
        "producers": [(p.name, p.lookback) for p in registered_producers(config.bank)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> RawFeatures | None:
    """Load raw features from a cache file, or None if it does not exist."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"sentio_lab"])
    values = np.column_stack([table.column(i).to_numpy() for i in range(table.num_columns)]).astype(
        np.float64
    )
    return RawFeatures(
        values=values,
        names=list(meta["names"]),
        blocks={k: slice(*v) for k, v in meta["blocks"].items()},
        first_valid=int(meta["first_valid"]),
        block_first_valid={k: int(v) for k, v in meta["block_first_valid"].items()},
    )


def _write_cache(path: Path, raw: RawFeatures) -> None:
    """Write raw features atomically (temp file + rename) so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {
        "names": raw.names,
        "blocks": {k: [s.start, s.stop] for k, s in raw.blocks.items()},
        "first_valid": raw.first_valid,
        "block_first_valid": raw.block_first_valid,
    }
    # Positional column names; the feature names, blocks and warm-ups travel in the file's metadata.
    table = pa.table({f"c{i}": raw.values[:, i] for i in range(raw.values.shape[1])})
    table = table.replace_schema_metadata({b"sentio_lab": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def raw_features(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> RawFeatures:
    """Raw (un-normalised) features of the base block and every extra timeframe, cached if configured.

    ``frame`` is validated first (sorted, unique timestamps, the OHLCV columns, valid prices; see
    :func:`sentio_lab.data.canonicalize`): :class:`~sentio_lab.data.DataValidationError` names the problem and
    the rows. ``base_freq`` is the duration of one base bar (used only by the timeframe views).
    """
    return _raw_features(_validated_frame(frame, source="raw_features", bank=config.bank), config, base_freq)


def _raw_features(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> RawFeatures:
    """:func:`raw_features` of an already canonical frame."""
    cache_path = None
    if config.cache_dir is not None:
        cache_path = Path(config.cache_dir) / f"raw-{_raw_cache_key(frame, config, base_freq)}.parquet"
        cached = _read_cache(cache_path)
        if cached is not None and cached.values.shape[0] == len(frame):
            return cached
    producers = registered_producers(config.bank)
    base_values, base_names, base_lookback = compute_features(Bars.from_frame(frame), producers)
    parts, names = [base_values], list(base_names)
    blocks = {"base": slice(0, len(base_names))}
    block_first = {"base": base_lookback}
    for rule in config.timeframes:
        view = resample_causal(frame, rule, base_freq, session_close=config.session_close)
        htf_values, htf_names, htf_lookback = compute_features(Bars.from_frame(view.bars), producers)
        parts.append(view.align(htf_values))
        blocks[rule] = slice(len(names), len(names) + len(htf_names))
        names.extend(f"{rule}:{n}" for n in htf_names)
        block_first[rule] = view.first_row_with(htf_lookback)
    raw = RawFeatures(
        values=np.column_stack(parts),
        names=names,
        blocks=blocks,
        first_valid=max(block_first.values()),
        block_first_valid=block_first,
    )
    if cache_path is not None:
        _write_cache(cache_path, raw)
    return raw
