"""Pooled multi-instrument markets: one policy trained on many instruments at once (issue 19, section 4).

A :class:`PooledMarket` holds one :class:`~sentio_lab.env.market.PreparedMarket` per instrument (its *member*), each
with its own features and its own normaliser fitted on its own training rows, all on **one calendar**: the ranges
(chronological, or a CPCV / walk-forward fold) are cut on dates, the same bar positions for every instrument.

How the pool trains. The members' arrays are stacked end to end into one :class:`~sentio_lab.env.MarketArrays`
(instrument ``k`` occupies rows ``offsets[k] .. offsets[k] + T - 1``) and the training env draws its episode starts
from :meth:`PooledMarket.episode_sampler`, a :class:`~sentio_lab.env.splits.SegmentEpisodeSampler` over every
member's training segments, each moved to its instrument's rows and started ``window - 1`` rows after that
instrument's warm-up. So each env instance draws an instrument and a start together, from the env's seeded
generator, at every episode start; an episode (its observations, fills, marks and bootstrap value) never leaves
its instrument, and no observation reads a row of another instrument. The draw is uniform over all valid starts,
so an instrument's share of episodes is its share of valid starts: equal shares when the instruments share the
calendar and the warm-up (they share the calendar by construction). The instrument is never an input: the
observation is the member's own feature window and position, as in a single-instrument run.

Calendars. Every instrument is loaded over the requested range; the pool keeps the dates all of them cover (from
the latest first date to the earliest last date, said in :attr:`PooledMarket.calendar_note` and the printed
report) and inside that span every instrument must have exactly the same dates: a missing or extra date is an
error naming the instrument and the date. Nothing is filled.

Sources (``--pool``): ``sp500_20`` (skfolio's 20 S&P 500 stocks, daily closes 1990-2022, close-only: needs
``--fill-price next_close`` and a close-only bank, ``close`` or ``slow``), ``sp500_20:TICKER`` (one of them), a
bundled dataset name (``sp500``, ``nasdaq``) or an OHLCV file path.

Benchmark anchors (``--anchor``): each instrument's benchmark weights are computed on its own member market (its
own closes; ``vol_target`` scaled by its own training rows) and stacked like the arrays
(:func:`pool_anchor_config`), so the benchmark at a stacked row never reads another instrument's bars.

What the concatenated env does not support yet: cost models with estimated inputs (spread, impact, participation
caps: their rolling estimates would read across the seam between two instruments), action masks and token blocks;
:func:`check_pool_env` refuses them in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sentio_lab.data import (
    CLOSE_ONLY_OPTIONAL,
    DataValidationError,
    MarketData,
    StaleOpensPolicy,
    load_market,
    to_market,
)
from sentio_lab.data.panel import SP500_PANEL, load_sp500_panel
from sentio_lab.env.anchor import AnchorConfig
from sentio_lab.env.arrays import FillPrice, MarketArrays
from sentio_lab.env.benchmarks import anchor_config
from sentio_lab.env.market import PreparedMarket, prepare_fold_market, prepare_market
from sentio_lab.env.splits import Fold, PurgeEmbargo, SegmentEpisodeSampler
from sentio_lab.features import FeatureConfig


@dataclass(frozen=True)
class PoolQuality:
    """The data-quality report of a pool: one line per instrument and the calendar rule (printed at the start of a
    run, stored in checkpoints like :class:`~sentio_lab.data.DataQuality`)."""

    members: dict[str, Any]
    """Instrument -> its :class:`~sentio_lab.data.DataQuality` (None where the member has none)."""
    calendar_note: str

    def __str__(self) -> str:
        """One line per instrument: bars, range, stale stretches; then the calendar rule."""
        lines = [f"pooled market: {len(self.members)} instruments; {self.calendar_note}"]
        for name, quality in self.members.items():
            if quality is None:
                lines.append(f"  {name}: no quality report")
                continue
            lines.append(f"  {name}: {quality.bars} bars, {len(quality.stale_stretches)} stale-open stretch(es), "
                         f"longest unchanged-close run {quality.longest_unchanged_close_run}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint: each member's report and the calendar rule."""
        return {"calendar_note": self.calendar_note,
                "members": {k: None if q is None else q.to_dict() for k, q in self.members.items()}}


@dataclass
class PooledMarket(PreparedMarket):
    """Several instruments on one calendar, stacked for one training env (module doc).

    The inherited fields describe the stacked market: ``arrays`` (rows of every instrument, end to end), ``splits``
    (only ``"train"``, spanning every row: train through :meth:`episode_sampler`, never through the span) and
    ``train_segments`` (every member's training segments, moved to its rows). ``features.state`` maps each
    instrument to its own fitted feature state. Evaluate per instrument on :attr:`members`
    (:func:`sentio_lab.evaluation.pooled.evaluate_pool`).
    """

    members: dict[str, PreparedMarket] = field(default_factory=dict)
    """Instrument name -> its own market (own features and normaliser, the pool's ranges)."""
    offsets: tuple[int, ...] = ()
    """First stacked row of each instrument, in :attr:`instruments` order."""
    calendar_note: str = ""
    """Which dates the pool kept (the common span of every instrument)."""

    @property
    def instruments(self) -> tuple[str, ...]:
        """Instrument names, in stacking order."""
        return tuple(self.members)

    def instrument_of(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The instrument number (index into :attr:`instruments`) of each stacked row."""
        return np.searchsorted(np.asarray(self.offsets), np.asarray(rows), side="right") - 1

    def episode_sampler(self, window: int, episode_length: int) -> SegmentEpisodeSampler:
        """Episode starts over every instrument's training segments (module doc): segment ``[s, e)`` of instrument
        ``k`` becomes ``[o_k + max(s, f_k + window - 1), o_k + e)`` with ``o_k`` its offset and ``f_k`` its
        warm-up, so a window never reads a row before the instrument's own first valid feature row."""
        segments = []
        for offset, member in zip(self.offsets, self.members.values(), strict=True):
            first_start = member.arrays.first_valid + window - 1
            for start, stop in member.training_segments():
                segments.append((offset + min(max(start, first_start), stop - 1), offset + stop))
        return SegmentEpisodeSampler(segments, window, episode_length, first_valid=self.arrays.first_valid,
                                     n_bars=len(self.arrays.close))


# ================================================================================================= loading
def _expand(pool: Sequence[str]) -> list[str]:
    """``--pool`` items (each may list several, comma-separated) with ``sp500_20`` expanded to its 20 tickers
    (``sp500_20:TICKER`` each); an instrument named twice is an error."""
    items: list[str] = []
    for item in pool:
        for part in str(item).split(","):
            part = part.strip()
            if part == SP500_PANEL:
                from skfolio.datasets import load_sp500_dataset  # the panel's tickers (no network)

                items += [f"{SP500_PANEL}:{ticker}" for ticker in load_sp500_dataset().columns]
            elif part:
                items.append(part)
    if not items:
        raise DataValidationError("--pool names no instrument; give e.g. --pool sp500_20 or --pool FILE1 FILE2",
                                  flag="--pool")
    duplicated = sorted({i for i in items if items.count(i) > 1})
    if duplicated:
        raise DataValidationError(f"--pool names {duplicated} more than once; list each instrument once",
                                  flag="--pool")
    return items


def _load_all(items: Sequence[str], *, start: Any, end: Any, stale_opens: StaleOpensPolicy, fill_price: FillPrice
              ) -> dict[str, MarketData]:
    """Each pool instrument: a ticker of the bundled sp500_20 panel (the panel read once), a bundled dataset or a
    file (:func:`~sentio_lab.data.load_market`)."""
    tickers = [item.split(":", 1)[1] for item in items if item.startswith(f"{SP500_PANEL}:")]
    panel = None
    if tickers:
        if fill_price != "next_close":
            raise DataValidationError(f"--pool {SP500_PANEL}: the panel has closes only; pass --fill-price "
                                      "next_close (and --feature-bank close or slow)", flag="--fill-price",
                                      value="next_close")
        panel = load_sp500_panel(start=start, end=end)  # every ticker (a panel needs two), then pick
        unknown = [t for t in tickers if t not in panel.assets]
        if unknown:
            raise DataValidationError(f"--pool: {SP500_PANEL} has no ticker(s) {unknown}; choose from "
                                      f"{list(panel.assets)}", flag="--pool")
    out = {}
    for item in items:
        if item.startswith(f"{SP500_PANEL}:"):
            out[item] = to_market(panel.frames[item.split(":", 1)[1]], name=item, optional=CLOSE_ONLY_OPTIONAL)
        else:
            out[item] = load_market(item, start=start, end=end, stale_opens=stale_opens, fill_price=fill_price)
    return out


def load_pool(pool: Sequence[str], *, start: Any = None, end: Any = None, stale_opens: StaleOpensPolicy = "refuse",
              fill_price: FillPrice = "next_close") -> tuple[dict[str, MarketData], str]:
    """Every instrument of ``pool`` (module doc: sources), cut to the dates all of them cover; raises
    :class:`~sentio_lab.data.DataValidationError` where an instrument's dates differ inside that span.
    Returns ``(instrument -> data, the calendar note)``."""
    loaded = _load_all(_expand(pool), start=start, end=end, stale_opens=stale_opens, fill_price=fill_price)
    first = max(d.frame.index[0] for d in loaded.values())
    last = min(d.frame.index[-1] for d in loaded.values())
    if first > last:
        raise DataValidationError(f"--pool: the instruments share no dates (the latest start {first} is after the "
                                  f"earliest end {last}); choose instruments that overlap", flag="--pool")
    reference = None
    out: dict[str, MarketData] = {}
    for name, data in loaded.items():
        frame = data.frame.loc[first:last]
        if reference is None:
            reference = (name, frame.index)
        elif not frame.index.equals(reference[1]):
            missing = reference[1].difference(frame.index)
            extra = frame.index.difference(reference[1])
            date, kind = (missing[0], "has no bar at") if len(missing) else (extra[0], "has a bar the others lack at")
            raise DataValidationError(
                f"--pool: instrument {name!r} {kind} {date} (compared with {reference[0]!r}; {len(missing)} missing, "
                f"{len(extra)} extra date(s) in {first} .. {last}); pooled ranges are cut on one calendar: give "
                "instruments of the same calendar, or narrow it with --data-start / --data-end", flag="--pool")
        out[name] = data if len(frame) == len(data.frame) else dataclasses.replace(
            data, frame=frame, fingerprint=_hash([data.fingerprint, str(first), str(last)]))
    note = f"common dates {first.date()} .. {last.date()} ({len(reference[1])} bars)"
    return out, note


def _hash(parts: Sequence[str]) -> str:
    digest = hashlib.sha256("|".join(parts).encode())
    return digest.hexdigest()[:16]


# ================================================================================================= building
def stack_members(members: Mapping[str, PreparedMarket], *, calendar_note: str = "") -> PooledMarket:
    """The :class:`PooledMarket` of prepared members on one calendar (same bars, same ranges, same feature columns;
    anything else is a ``ValueError`` naming the instrument)."""
    members = dict(members)
    if not members:
        raise ValueError("a pool needs at least one instrument")
    names = list(members)
    head = members[names[0]]
    for name in names[1:]:
        member = members[name]
        if not member.data.frame.index.equals(head.data.frame.index):
            raise ValueError(f"pool: instrument {name!r} is not on the calendar of {names[0]!r}")
        if {k: (s.start, s.stop) for k, s in member.splits.items()} != \
                {k: (s.start, s.stop) for k, s in head.splits.items()}:
            raise ValueError(f"pool: instrument {name!r} has other ranges than {names[0]!r}")
        if member.features.names != head.features.names:
            raise ValueError(f"pool: instrument {name!r} has other feature columns than {names[0]!r} (--prune-corr "
                             "drops columns per instrument: leave it out with --pool)")
        if member.arrays.fill_price != head.arrays.fill_price:
            raise ValueError(f"pool: instrument {name!r} fills at {member.arrays.fill_price}, {names[0]!r} at "
                             f"{head.arrays.fill_price}")
    n = len(head.arrays.close)
    offsets = tuple(k * n for k in range(len(names)))
    arrays = _stack_arrays([m.arrays for m in members.values()])
    frame = pd.concat([m.data.frame for m in members.values()])
    data = MarketData(frame=frame, name="pool:" + ",".join(names), bar_freq=head.data.bar_freq,
                      fingerprint=_hash([f"{k}={m.data.fingerprint}" for k, m in members.items()]),
                      quality=PoolQuality({k: m.data.quality for k, m in members.items()}, calendar_note),
                      session_close=head.data.session_close)
    features = dataclasses.replace(head.features, values=arrays.features, first_valid=arrays.first_valid,
                                   state={k: m.features.state for k, m in members.items()})
    train = tuple((o + s, o + e) for o, m in zip(offsets, members.values(), strict=True)
                  for s, e in m.training_segments())
    first = head.splits["train"]
    splits = {"train": dataclasses.replace(first, start=0, stop=len(frame), first_timestamp=frame.index[0],
                                           last_timestamp=frame.index[-1])}
    return PooledMarket(data=data, splits=splits, features=features, arrays=arrays, feature_config=head.feature_config,
                        fold=head.fold, train_segments=train, members=members, offsets=offsets,
                        calendar_note=calendar_note)


def _stack_arrays(parts: Sequence[MarketArrays]) -> MarketArrays:
    """One :class:`MarketArrays` of every member's rows end to end (warm-up rows are the features' zeros, never
    observed: :meth:`PooledMarket.episode_sampler` starts each instrument after its own warm-up)."""
    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    kinds = {p.volume_kind for p in parts}
    n = len(parts[0].close)
    return MarketArrays(
        open=np.concatenate([p.open for p in parts]), close=np.concatenate([p.close for p in parts]),
        features=np.concatenate([p.features for p in parts]), first_valid=parts[0].first_valid,
        year_fraction=joined("year_fraction"),  # each member's first entry is 0: no span across the seam
        high=joined("high"), low=joined("low"), volume=joined("volume"),
        bars_per_day=np.concatenate([np.broadcast_to(np.asarray(p.bars_per_day, dtype=np.float64), (n,))
                                     for p in parts]),
        volume_kind="ticks" if "ticks" in kinds else "quantity", fill_price=parts[0].fill_price,
    )


def prepare_pool(
    pool: Sequence[str],
    feature_config: FeatureConfig,
    *,
    start: Any = None,
    end: Any = None,
    stale_opens: StaleOpensPolicy = "refuse",
    train_fraction: float = 0.6,
    validation_fraction: float = 0.2,
    feature_state: Mapping[str, dict] | None = None,
    window: int | None = None,
    episode_length: int | None = None,
    fill_price: FillPrice = "next_close",
) -> PooledMarket:
    """Load every instrument of ``pool`` on one calendar (:func:`load_pool`) and prepare each as
    :func:`~sentio_lab.env.market.prepare_market` would alone: the same chronological ranges (cut on the common
    dates), features fitted on the instrument's own training rows (or its entry of a saved ``feature_state``:
    instrument -> state). Then stack them (:func:`stack_members`)."""
    loaded, note = load_pool(pool, start=start, end=end, stale_opens=stale_opens, fill_price=fill_price)
    if feature_state is not None:
        unknown = sorted(set(loaded) ^ set(feature_state))
        if unknown:
            raise ValueError(f"the saved feature states do not match the pool's instruments (differing: {unknown})")
    members = {}
    for name, data in loaded.items():
        state = None if feature_state is None else feature_state[name]
        members[name] = prepare_market(data, feature_config, train_fraction=train_fraction,
                                       validation_fraction=validation_fraction, feature_state=state, window=window,
                                       episode_length=episode_length, fill_price=fill_price)
    return stack_members(members, calendar_note=note)


def pool_purge_embargo(pool: PooledMarket, window: int, **kwargs: Any) -> PurgeEmbargo:
    """The purge / embargo of the pool's folds: the longest reach of any instrument (``kwargs`` go to
    :meth:`sentio_lab.env.splits.PurgeEmbargo.for_features`, e.g. ``extra_embargo``)."""
    gaps = [PurgeEmbargo.for_features(window, m.feature_config or FeatureConfig(), m.data.frame, **dict(kwargs))
            for m in pool.members.values()]
    return max(gaps, key=lambda g: (g.embargo, g.feature_span))


def pool_first_valid(pool: PooledMarket) -> int:
    """The latest warm-up of any instrument: the first row every instrument can observe (for fold construction)."""
    return max(m.arrays.first_valid for m in pool.members.values())


def prepare_pool_fold(pool: PooledMarket, fold: Fold, *, validation_bars: int = 0) -> PooledMarket:
    """The pool on one purged walk-forward or CPCV fold (built on the common calendar, e.g. by
    :func:`~sentio_lab.env.splits.combinatorial_purged` with :func:`pool_purge_embargo`): every instrument refitted
    on the fold's training segments only (:func:`~sentio_lab.env.market.prepare_fold_market`), then stacked."""
    members = {name: prepare_fold_market(member, fold, validation_bars=validation_bars)
               for name, member in pool.members.items()}
    return stack_members(members, calendar_note=pool.calendar_note)


def pool_anchor_config(baseline: str, pool: PooledMarket, **options: Any) -> AnchorConfig:
    """The :class:`~sentio_lab.env.anchor.AnchorConfig` of an anchored env on the stacked pool: every instrument's
    benchmark weights from its own member market (:func:`~sentio_lab.env.benchmarks.anchor_config`), end to end in
    stacking order; ``options`` (tilts, excess reward, deviation penalty, no-trade band) as for one market."""
    configs = [anchor_config(baseline, member, **options) for member in pool.members.values()]
    return dataclasses.replace(configs[0], benchmark=np.concatenate([c.benchmark for c in configs]))


def check_pool_env(market: PreparedMarket, costs: Any, env_kwargs: Mapping[str, Any]) -> None:
    """Refuse, in one line, what the stacked env cannot do yet (module doc); nothing for a non-pooled market."""
    if not isinstance(market, PooledMarket):
        return
    if not costs.is_flat:
        raise ValueError("--pool with --spread / --impact / --participation: their estimates would read across two "
                         "instruments' rows; use the flat cost model (--fee-bps, --slippage-bps, --borrow-bps)")
    refused = [flag for key, flag in (("masks", "masks (ppo_masked)"),
                                      ("token_blocks", "token blocks (ppo_transformer)"))
               if env_kwargs.get(key)]
    if refused:
        raise ValueError(f"--pool does not support {', '.join(refused)} yet; train without them")
