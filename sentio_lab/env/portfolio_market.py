"""The market a portfolio run trades: a panel, its arrays (features fitted on training bars only), its bar ranges, and
what a checkpoint records about the panel and the fitted features. Shared by ``ppo_portfolio``, the portfolio runner
(:mod:`sentio_lab.experiment.portfolio_runner`) and anything that restores a portfolio model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from sentio_lab.data.panel import PanelData
from sentio_lab.env.portfolio_arrays import PortfolioArrays


@dataclass
class PanelInfo:
    """What a checkpoint records about the panel (the ``data`` of :class:`PortfolioMarket`)."""

    name: str
    fingerprint: str
    """SHA-256 of the asset names, the calendar and every close"""
    quality: Any
    """The panel's report (:class:`PanelQuality`)."""


@dataclass
class PanelQuality:
    """The panel report as a checkpoint stores it and a run prints it."""

    report: dict

    def to_dict(self) -> dict:
        """The report (assets, calendar, the missing-bar policy, filled bars)."""
        return dict(self.report)

    def __str__(self) -> str:
        """One line: name, assets, bars, range, policy."""
        r = self.report
        return (f"panel {r['name']}: {len(r['assets'])} assets, {r['bars']} bars {r['first']} .. {r['last']}, "
                f"missing bars: {r['missing_policy']} ({sum(r['filled_bars'].values())} filled)")


@dataclass
class FeatureInfo:
    """The fitted feature state a checkpoint records (one per asset) and the feature names."""

    state: dict
    names: tuple[str, ...]


@dataclass
class PortfolioMarket:
    """A panel, its arrays (features fitted on the training bars only) and its bar ranges."""

    panel: PanelData
    arrays: PortfolioArrays
    ranges: dict[str, tuple[int, int]]
    """``train`` / ``validation`` / ``test``: ``[start, stop)`` bar indices"""
    data: PanelInfo
    features: FeatureInfo
    train_segments: tuple[tuple[int, int], ...] | None = None
    """a CPCV / walk-forward fold's training segments (the runner's fold market): episodes start in these only,
    none crosses a test group; None: the whole ``train`` range"""

    @property
    def splits(self) -> dict:
        """Empty: the single-asset summaries (:func:`sentio_lab.evaluation.agent_report.training_summary`, printed
        by the command line) find no range of theirs here and say so; the portfolio's ranges are :attr:`ranges`."""
        return {}

    def range(self, name: str) -> tuple[int, int]:
        """``[start, stop)`` of the named range."""
        return self.ranges[name]


def panel_fingerprint(panel: PanelData) -> str:
    """SHA-256 of the asset names, the calendar and every close (what a resumed run must find again)."""
    digest = hashlib.sha256("|".join(panel.assets).encode())
    digest.update(np.asarray(panel.index.asi8).tobytes())
    digest.update(np.ascontiguousarray(panel.column("close")).tobytes())
    return digest.hexdigest()
