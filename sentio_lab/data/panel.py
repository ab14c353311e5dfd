"""Panels of several assets on one calendar: skfolio's bundled S&P 500 closes and any set of user OHLCV files.

A :class:`PanelData` holds one canonical frame per asset (:func:`sentio_lab.data.canonicalize`: the same checks as a
single market), all on one common calendar -- the union of every asset's timestamps -- and the arrays a
portfolio env reads, ``(T, A)`` each.

Missing bars. An asset without a bar on a date of the calendar is an error naming the asset and the date
(:class:`~sentio_lab.data.DataValidationError`), unless the caller passes ``missing="ffill"``: the asset's last
close is then carried forward (open = high = low = close = the last close, volume 0: nothing traded) and every
filled ``(asset, date)`` is recorded in :attr:`PanelData.filled` and :meth:`PanelData.report`. A date before an
asset's first bar has no last close to carry: it is always an error saying where to start the panel.

Close-only panels (no opens, highs, lows or volume; skfolio's S&P 500 set) fill at the next close
(``fill_price="next_close"``); asking for next-open fills on them is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from sentio_lab.data.loading import StaleOpensPolicy, load_market
from sentio_lab.data.market_data import to_market
from sentio_lab.data.ranges import select_range
from sentio_lab.data.validation import CLOSE_ONLY_OPTIONAL, DEFAULT_MIN_ROWS, OHLCV_COLUMNS, DataValidationError

#: What a missing bar does: ``"refuse"`` (an error naming asset and date) or ``"ffill"`` (carry the last close).
MissingPolicy = Literal["refuse", "ffill"]
MISSING_POLICIES: tuple[str, ...] = ("refuse", "ffill")
#: skfolio's bundled panel: 20 S&P 500 stocks, daily adjusted closes 1990-01-02 .. 2022-12-28.
SP500_PANEL = "sp500_20"


@dataclass(frozen=True)
class PanelData:
    """Several assets on one calendar (module doc): per-asset canonical frames and ``(T, A)`` arrays."""

    name: str
    """Where the panel came from (``"sp500_20"`` or the user's description)."""
    assets: tuple[str, ...]
    """Asset names, in column order."""
    frames: dict[str, pd.DataFrame]
    """The canonical OHLCV frame of each asset on the common calendar (filled bars included)."""
    close_only: bool
    """True when the panel has closes only (opens, highs, lows and volume unknown): fills at the next close."""
    missing: str = "refuse"
    """The missing-bar policy the panel was built with (:data:`MISSING_POLICIES`)."""
    filled: tuple[tuple[str, pd.Timestamp], ...] = field(default=())
    """Every ``(asset, date)`` whose bar was forward-filled (empty unless ``missing="ffill"``)."""

    @property
    def index(self) -> pd.DatetimeIndex:
        """The common calendar."""
        return self.frames[self.assets[0]].index

    def column(self, name: str) -> np.ndarray:
        """float64 ``(T, A)``: the OHLCV column ``name`` of every asset (NaN where unknown: close-only)."""
        if name not in OHLCV_COLUMNS:
            raise KeyError(f"unknown column {name!r}; choose from {OHLCV_COLUMNS}")
        return np.column_stack([self.frames[a][name].to_numpy(dtype=np.float64) for a in self.assets])

    def returns(self) -> pd.DataFrame:
        """Simple close-to-close returns ``(T - 1, A)`` (row d: the return from the previous bar's close to d's)."""
        close = pd.DataFrame(self.column("close"), index=self.index, columns=list(self.assets))
        return close.pct_change().iloc[1:]

    def report(self) -> dict:
        """What a run must record about the panel: assets, calendar, the missing-bar policy and the filled bars."""
        per_asset: dict[str, int] = {}
        for asset, _ in self.filled:
            per_asset[asset] = per_asset.get(asset, 0) + 1
        return {
            "name": self.name, "assets": list(self.assets), "bars": len(self.index),
            "first": str(self.index[0].date()), "last": str(self.index[-1].date()),
            "close_only": self.close_only, "missing_policy": self.missing,
            "filled_bars": per_asset,
            "filled": [(asset, str(date.date())) for asset, date in self.filled],
        }


def _check_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise DataValidationError(f"missing={missing!r}: choose one of {MISSING_POLICIES} (--panel-missing)",
                                  flag="--panel-missing")


def align_panel(frames: Mapping[str, pd.DataFrame], *, name: str, missing: MissingPolicy = "refuse",
                close_only: bool = False) -> PanelData:
    """Put canonical frames (one per asset) on the union of their calendars (module doc: missing bars)."""
    _check_policy(missing)
    if len(frames) < 2:
        raise DataValidationError(f"{name}: a panel needs at least 2 assets, got {list(frames)}")
    calendar = frames[next(iter(frames))].index
    for frame in frames.values():
        calendar = calendar.union(frame.index)
    aligned: dict[str, pd.DataFrame] = {}
    filled: list[tuple[str, pd.Timestamp]] = []
    for asset, frame in frames.items():
        absent = ~calendar.isin(frame.index)
        if not absent.any():
            aligned[asset] = frame
            continue
        first_missing = calendar[int(np.argmax(absent))]
        if first_missing < frame.index[0]:
            raise DataValidationError(
                f"{name}: asset {asset!r} has no bar at {first_missing.date()} (its data start at "
                f"{frame.index[0].date()}, nothing to carry forward); start the panel at {frame.index[0].date()} "
                "or later (--data-start)", flag="--data-start", value=str(frame.index[0].date()))
        if missing == "refuse":
            raise DataValidationError(
                f"{name}: asset {asset!r} has no bar at {first_missing.date()} ({int(absent.sum())} missing bar(s) "
                "on the common calendar); pass missing='ffill' (--panel-missing ffill) to carry its last close "
                "forward (recorded in the panel report)", flag="--panel-missing", value="ffill")
        out = frame.reindex(calendar)
        close = out["close"].ffill()
        for col in ("open", "high", "low"):  # a filled bar did not trade: its prices are the last close
            out[col] = out[col].where(~absent, close)
        out["volume"] = out["volume"].where(~absent, 0.0)
        out["close"] = close
        if close_only:  # unknown stays unknown: close-only columns are not made up on filled bars
            out[list(CLOSE_ONLY_OPTIONAL)] = np.nan
        aligned[asset] = out
        filled += [(asset, date) for date in calendar[absent]]
    return PanelData(name=name, assets=tuple(frames), frames=aligned, close_only=close_only, missing=missing,
                     filled=tuple(filled))


def load_panel(
    sources: Mapping[str, str | Path | pd.DataFrame],
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    missing: MissingPolicy = "refuse",
    fill_price: Literal["next_open", "next_close"] = "next_open",
    stale_opens: StaleOpensPolicy = "refuse",
    min_rows: int = DEFAULT_MIN_ROWS,
) -> PanelData:
    """User OHLCV files (or raw frames), one per asset name, validated one by one and aligned (module doc).

    Each file goes through :func:`sentio_lab.data.load_market` (the same validation, range selection and stale-open
    rule as a single market; with ``fill_price="next_close"`` close-only files load). A raw frame is validated by
    :func:`sentio_lab.data.to_market` and, with next-open fills, refused if the quality report finds stale opens.
    """
    _check_policy(missing)
    optional = CLOSE_ONLY_OPTIONAL if fill_price == "next_close" else ()
    frames: dict[str, pd.DataFrame] = {}
    for asset, source in sources.items():
        if isinstance(source, pd.DataFrame):
            market = to_market(source, name=f"asset {asset!r}", min_rows=min_rows, optional=optional)
            frame = select_range(market.frame, start, end, source=f"asset {asset!r}")
            if fill_price == "next_open" and market.quality.stale_stretches and stale_opens == "refuse":
                raise DataValidationError(
                    f"asset {asset!r}: stale opens ({len(market.quality.stale_stretches)} stretch(es), the first "
                    f"{market.quality.stale_stretches[0].describe()}); fill at the next close (fill_price="
                    "'next_close') or pass stale_opens='allow'", flag="--stale-opens", value="allow")
        else:
            frame = load_market(source, start=start, end=end, stale_opens=stale_opens, min_rows=min_rows,
                                fill_price=fill_price).frame
        frames[str(asset)] = frame
    close_only = any(frame[list(CLOSE_ONLY_OPTIONAL)].isna().any().any() for frame in frames.values())
    description = "panel of " + ", ".join(frames)
    return align_panel(frames, name=description, missing=missing, close_only=close_only)


def load_sp500_panel(
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    assets: Sequence[str] | None = None,
) -> PanelData:
    """skfolio's bundled S&P 500 panel (no network): 20 stocks, daily closes 1990-01-02 .. 2022-12-28.

    Close-only, so a portfolio env fills it at the next close. ``assets`` picks a subset (by ticker, in that order);
    ``start`` / ``end`` select an inclusive date range.
    """
    from skfolio.datasets import load_sp500_dataset

    prices = load_sp500_dataset()
    if assets is not None:
        unknown = [a for a in assets if a not in prices.columns]
        if unknown:
            raise DataValidationError(f"{SP500_PANEL}: unknown asset(s) {unknown}; choose from "
                                      f"{list(prices.columns)}")
        prices = prices[list(assets)]
    frames = {}
    for asset in prices.columns:
        raw = pd.DataFrame({"close": prices[asset].to_numpy(dtype=np.float64)}, index=prices.index)
        market = to_market(raw, name=f"{SP500_PANEL}:{asset}", optional=CLOSE_ONLY_OPTIONAL)
        frames[str(asset)] = select_range(market.frame, start, end, source=f"{SP500_PANEL}:{asset}")
    return align_panel(frames, name=SP500_PANEL, close_only=True)
