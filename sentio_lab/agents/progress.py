"""Progress bars that reach the user wherever the code runs: terminal, JupyterLab, or a notebook under papermill.

``tqdm.auto`` picks a widget inside any Jupyter kernel. A widget is live in JupyterLab, but under papermill no
browser renders it: ``papermill --log-output`` relays only the widget's first frame (``0%``) and a long training
cell looks dead. The text bar (``tqdm.std``) writes to the kernel's stderr stream instead, which papermill relays
line by line. Every long loop in the package builds its bar through :func:`tqdm` here, so one call to
:func:`set_progress_mode` (the notebooks' ``progress`` parameter) switches all of them.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from tqdm import std as tqdm_std
from tqdm.auto import tqdm as tqdm_auto

ProgressMode = Literal["auto", "text"]
MODES: tuple[str, ...] = ("auto", "text")
#: Seconds between two refreshes of the text bar: a 9-minute cell then logs a few hundred lines, not thousands.
TEXT_MININTERVAL = 2.0

_mode: str = os.environ.get("SENTIO_PROGRESS", "auto")
if _mode not in MODES:
    raise ValueError(f"SENTIO_PROGRESS={_mode!r}: choose one of {', '.join(MODES)}")


def set_progress_mode(mode: ProgressMode) -> None:
    """Choose the bar of every later :func:`tqdm`: ``auto`` (tqdm.auto: a widget in Jupyter, text in a terminal)
    or ``text`` (always the text bar: what ``papermill --log-output`` shows). ``SENTIO_PROGRESS`` sets the default."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode


def progress_mode() -> str:
    """The mode :func:`tqdm` builds its bars in now."""
    return _mode


def tqdm(*args: Any, **kwargs: Any) -> tqdm_std.tqdm:
    """A tqdm bar (same arguments as ``tqdm.tqdm``) of the current mode (see :func:`set_progress_mode`)."""
    if _mode == "text":
        kwargs.setdefault("mininterval", TEXT_MININTERVAL)
        kwargs["dynamic_ncols"] = False  # a kernel's stderr has no terminal width to follow
        kwargs.setdefault("ncols", 100)
        return tqdm_std.tqdm(*args, **kwargs)
    return tqdm_auto(*args, **kwargs)
