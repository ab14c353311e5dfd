"""When a market's trading day ends (:class:`SessionClose`, "HH:MM Area/City").

A market may say when its trading day ends (:attr:`sentio_lab.data.MarketData.session_close`, parsed by
:func:`parse_session_close`). ``eurusd_1h`` ends its days at 17:00 New York, the FX convention; the other
bundled datasets and user files have none (UTC days). :func:`sentio_lab.env.market.prepare_market` hands it to the
features, whose daily / weekly / monthly views then run from one close to the next (:mod:`sentio_lab.data.timeframes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd

_SESSION_CLOSE_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s+(\S+)\s*$")


@dataclass(frozen=True)
class SessionClose:
    """When a trading day ends: a wall-clock time in an IANA time zone (``str()`` gives "HH:MM Area/City").

    Daily (and weekly, monthly) higher-timeframe bars of :mod:`sentio_lab.data.timeframes` run from one session
    close to the next, following the zone's daylight-saving rules; e.g. FX's "17:00 America/New_York" is
    22:00 UTC in winter and 21:00 UTC in summer.
    """

    hour: int
    minute: int
    zone: str

    def __str__(self) -> str:
        """The canonical text form, e.g. ``17:00 America/New_York``."""
        return f"{self.hour:02d}:{self.minute:02d} {self.zone}"

    @property
    def tzinfo(self) -> ZoneInfo:
        """The time zone."""
        return ZoneInfo(self.zone)

    @property
    def offset(self) -> pd.Timedelta:
        """Time of day of the close, as a duration after local midnight."""
        return pd.Timedelta(hours=self.hour, minutes=self.minute)


def parse_session_close(value: str | SessionClose | None) -> SessionClose | None:
    """Parse ``"HH:MM Area/City"`` (e.g. ``"17:00 America/New_York"``, ``"00:00 UTC"``); None stays None.

    Raises :class:`ValueError` naming the value when the time or the zone is not valid.
    """
    if value is None or isinstance(value, SessionClose):
        return value
    if not isinstance(value, str):
        raise ValueError(f"session_close must be a string like '17:00 America/New_York', got {value!r}")
    match = _SESSION_CLOSE_RE.match(value)
    if match is None:
        raise ValueError(f"session_close {value!r}: expected 'HH:MM Area/City', e.g. '17:00 America/New_York'")
    hour, minute, zone = int(match.group(1)), int(match.group(2)), match.group(3)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ValueError(f"session_close {value!r}: {hour:02d}:{minute:02d} is not a time of day (00:00 .. 23:59)")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"session_close {value!r}: unknown time zone {zone!r} (use an IANA name such as "
                         "'America/New_York' or 'UTC')") from err
    return SessionClose(hour, minute, zone)


def canonical_session_close(value: str | SessionClose | None) -> str | None:
    """The canonical text of a session close (validated), None for None."""
    parsed = parse_session_close(value)
    return None if parsed is None else str(parsed)
