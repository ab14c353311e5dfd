import shlex
from pathlib import Path

import pytest
import tyro

from sentio_lab import ppo

CONFIGS = sorted((Path(__file__).parents[2] / "experiments" / "configs").glob("*.args"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_named_configs_parse_into_ppo_args(path):
    args = tyro.cli(ppo.Args, args=shlex.split(path.read_text()))
    assert args.ppo.total_timesteps > 0 and args.features.feature_bank in ("basic", "talib")
    ppo.feature_config(args)  # the feature pipeline accepts it


def test_there_are_named_configs():
    assert len(CONFIGS) >= 2
