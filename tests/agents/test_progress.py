"""Progress bars: a widget in Jupyter, a text bar that papermill --log-output relays, one switch for both."""

import importlib
import io

import pytest
from tqdm import notebook as tqdm_notebook
from tqdm import std as tqdm_std

from sentio_lab.agents import progress


@pytest.fixture(autouse=True)
def _restore_mode():
    before = progress.progress_mode()
    yield
    progress.set_progress_mode(before)


def test_text_mode_builds_a_text_bar_that_writes_its_frames():
    progress.set_progress_mode("text")
    out = io.StringIO()
    bar = progress.tqdm(total=3, unit="step", file=out, mininterval=0)
    bar.update(3)
    bar.close()
    assert type(bar) is tqdm_std.tqdm and not isinstance(bar, tqdm_notebook.tqdm_notebook)
    assert "3/3" in out.getvalue() and "step" in out.getvalue()


def test_auto_mode_is_tqdm_auto():
    from tqdm.auto import tqdm as tqdm_auto

    progress.set_progress_mode("auto")
    bar = progress.tqdm(total=1, disable=True)
    assert type(bar) is tqdm_auto


def test_an_unknown_mode_is_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="'widget'.*auto, text"):
        progress.set_progress_mode("widget")
    monkeypatch.setenv("SENTIO_PROGRESS", "loud")
    with pytest.raises(ValueError, match="SENTIO_PROGRESS='loud'"):
        importlib.reload(progress)
    monkeypatch.setenv("SENTIO_PROGRESS", "text")
    importlib.reload(progress)
    assert progress.progress_mode() == "text"
    monkeypatch.delenv("SENTIO_PROGRESS")
    importlib.reload(progress)
    assert progress.progress_mode() == "auto"


def test_the_runner_and_every_variant_build_their_bars_here():
    from sentio_lab import run_loop  # the variants' bars live in the shared run loop since the argument groups
    from sentio_lab.experiment import runner

    for module in (run_loop, runner):
        # (by name: another test reloads sentio_lab.agents.progress, which makes a new function object)
        assert (module.tqdm.__module__, module.tqdm.__name__) == ("sentio_lab.agents.progress", "tqdm"), module.__name__
