"""`make test` runs the suite on pytest-xdist workers with ``--dist loadgroup``: tests/conftest.py groups the tests of
a module that share a module-scoped fixture, so the fixture (often a tiny training run) is built once. Grouping
fails silently (the tests still pass, only slower), so it is checked here on a toy suite in a real xdist run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SHARED = '''
import os
import pytest


@pytest.fixture(scope="module")
def shared():
    return os.environ.get("PYTEST_XDIST_WORKER")


@pytest.mark.parametrize("i", range(4))
def test_shared(shared, i):
    with open(os.environ["GROUP_LOG"], "a") as log:
        log.write(f"{__name__} {i} {shared} {os.environ.get('PYTEST_XDIST_WORKER')}\\n")
'''

PLAIN = '''
import os
import pytest


@pytest.mark.parametrize("i", range(4))
def test_plain(i):
    with open(os.environ["GROUP_LOG"], "a") as log:
        log.write(f"{__name__} {i} - {os.environ.get('PYTEST_XDIST_WORKER')}\\n")
'''


def test_a_module_fixture_is_built_once_and_its_tests_stay_on_its_worker(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_one.py").write_text(SHARED)
    (suite / "test_two.py").write_text(SHARED)
    (suite / "test_plain.py").write_text(PLAIN)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = tmp_path / "groups.log"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "suite"],
        cwd=tmp_path, env={**os.environ, "GROUP_LOG": str(log)}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 12
    for module in ("test_one", "test_two"):
        workers = {(built, ran) for name, _, built, ran in rows if name == module}
        # One worker ran all four tests and built the fixture there, once.
        assert len(workers) == 1 and next(iter(workers))[0] == next(iter(workers))[1], (module, workers)
    # The ids the controller scheduled by carry the group; the ungrouped module's do not.
    assert "test_one.py::test_shared[0]@suite/test_one.py" in done.stdout
    assert "test_plain.py::test_plain[0]@" not in done.stdout
