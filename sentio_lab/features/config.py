"""What to compute and how to normalise it (:class:`FeatureConfig`), recovered from a fitted state or logged."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from sentio_lab.data import canonical_session_close
from sentio_lab.data.exogenous import BUNDLED_EXOGENOUS, is_csv_spec
from sentio_lab.features.normalise import NORMALISERS
from sentio_lab.features.registry import BANKS


@dataclass(frozen=True)
class FeatureConfig:
    """What to compute and how to normalise it. Hashable; recorded in the fitted state."""

    bank: str = "basic"
    """``"basic"`` (fast hand-written features), ``"talib"`` (the full TA-Lib bank plus the basic ones), ``"close"``
    (the basic ones from closes only) or ``"slow"`` (regime-normalised multi-horizon,
    :mod:`sentio_lab.features.slow`)."""
    timeframes: tuple[str, ...] = ()
    """Extra higher timeframes (pandas offset aliases, e.g. ``("4h", "1D")`` or ``("W-FRI",)``)."""
    regimes: int = 0
    """Number of Gaussian-HMM states; 0 = no regime features (1 is meaningless and rejected)."""
    normalise: str = "robust"
    """``"robust"``: (x - median) / (IQR / 1.349); ``"rank"``: empirical CDF of the training range mapped
    to [-1, 1]; ``"none"``: raw values (and no clipping)."""
    clip: float = 5.0
    """Normalised values are clipped to ``[-clip, clip]`` (not applied with ``normalise="none"``)."""
    prune_corr: float | None = None
    """Drop a feature whose |correlation| on the training range with an earlier kept feature of the same
    block exceeds this."""
    cache_dir: str | None = None
    """Directory for a Parquet cache of raw features keyed by data fingerprint and config."""
    seed: int = 0
    """Seed of the HMM restarts."""
    regime_restarts: int = 4
    """Number of seeded HMM restarts (the best converged one by likelihood is kept)."""
    session_close: str | None = None
    """When a trading day ends ("HH:MM Area/City", e.g. "17:00 America/New_York"): daily, weekly and monthly
    timeframes run from one close to the next (see :mod:`sentio_lab.data.timeframes`). None: the UTC calendar.
    :func:`sentio_lab.env.market.prepare_market` fills it from the market (``MarketData.session_close``) when
    left None; pass ``"00:00 UTC"`` to keep UTC days for a market that has a session close."""
    exogenous: tuple[str, ...] = ()
    """Point-in-time alternative data joined as the ``"exogenous"`` block: bundled series names (``"vix"``,
    ``"credit_spread"``, ...: :data:`sentio_lab.data.exogenous.BUNDLED_EXOGENOUS`) or CSV files
    (``"file.csv"`` with a ``released_at`` column, ``"file.csv@1D"`` with a publication lag); see
    :mod:`sentio_lab.features.exogenous`."""

    def __post_init__(self) -> None:
        if self.bank not in BANKS:
            raise ValueError(f"FeatureConfig.bank must be one of {BANKS}, got {self.bank!r}")
        if isinstance(self.timeframes, str):
            raise ValueError(
                f"FeatureConfig.timeframes must be a tuple of rules, got the string {self.timeframes!r}"
            )
        tfs = tuple(self.timeframes)
        object.__setattr__(self, "timeframes", tfs)
        if len(set(tfs)) != len(tfs) or not all(isinstance(t, str) and t for t in tfs):
            raise ValueError(f"FeatureConfig.timeframes must be distinct non-empty strings, got {tfs}")
        if any(t in ("base", "regime", "exogenous") for t in tfs):
            raise ValueError("'base', 'exogenous' and 'regime' are block names, not timeframes")
        if isinstance(self.exogenous, str):
            raise ValueError(f"FeatureConfig.exogenous must be a tuple of series, got the string {self.exogenous!r}")
        # "vix,credit_spread" as one entry (the flag's comma form) is two series.
        exo = tuple(part.strip() for spec in self.exogenous for part in str(spec).split(","))
        object.__setattr__(self, "exogenous", exo)
        if len(set(exo)) != len(exo):
            raise ValueError(f"FeatureConfig.exogenous names a series twice: {exo}")
        for spec in exo:
            if not (spec in BUNDLED_EXOGENOUS or is_csv_spec(spec)):
                raise ValueError(f"FeatureConfig.exogenous: unknown series {spec!r}; choose from "
                                 f"{sorted(BUNDLED_EXOGENOUS)} or give a CSV file 'file.csv' / 'file.csv@1D'")
        if not isinstance(self.regimes, int) or self.regimes < 0 or self.regimes == 1:
            raise ValueError(f"FeatureConfig.regimes must be 0 or >= 2, got {self.regimes!r}")
        if self.normalise not in NORMALISERS:
            raise ValueError(f"FeatureConfig.normalise must be one of {NORMALISERS}, got {self.normalise!r}")
        if not (self.clip > 0):
            raise ValueError(f"FeatureConfig.clip must be > 0, got {self.clip}")
        if self.prune_corr is not None and not (0 < self.prune_corr <= 1):
            raise ValueError(f"FeatureConfig.prune_corr must be in (0, 1] or None, got {self.prune_corr}")
        if self.regime_restarts < 1:
            raise ValueError(f"FeatureConfig.regime_restarts must be >= 1, got {self.regime_restarts}")
        try:
            object.__setattr__(self, "session_close", canonical_session_close(self.session_close))
        except ValueError as err:
            raise ValueError(f"FeatureConfig.{err}") from err

    def fitted_fields(self) -> dict:
        """The fields a fitted state depends on (a state is only valid for the same values)."""
        # "exogenous" only when set, so states fitted before the field existed still match a config without it.
        exogenous = {"exogenous": list(self.exogenous)} if self.exogenous else {}
        return {**exogenous,
            "bank": self.bank,
            "timeframes": list(self.timeframes),
            "regimes": self.regimes,
            "normalise": self.normalise,
            "clip": float(self.clip),
            "prune_corr": None if self.prune_corr is None else float(self.prune_corr),
            # Only timeframe views depend on it: a state without timeframes fits every session close.
            "session_close": self.session_close if self.timeframes else None,
        }


def config_from_state(state: dict, **overrides: object) -> FeatureConfig:
    """The :class:`FeatureConfig` a fitted state was built with (cache_dir / seed from ``overrides``)."""
    fields = dict(state["config"])
    fields["timeframes"] = tuple(fields["timeframes"])
    fields["exogenous"] = tuple(fields.get("exogenous", ()))
    fields.update(overrides)
    return FeatureConfig(**fields)


def describe_config(config: FeatureConfig) -> str:
    """One-line JSON of a config (for logs and run records)."""
    return json.dumps(asdict(config), sort_keys=True, default=list)
