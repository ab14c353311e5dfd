import pytest

from sentio_lab.experiment.config import BASELINE_NAMES, AgentSpec, ExperimentConfig, load_config

TOML = """
name = "toy"
dataset = "nasdaq"
split = "walk_forward"
n_groups = 4
seeds = [3, 4]
baselines = ["buy_and_hold", "random"]
common_args = ["--fee-bps", "2"]

[agents.small]
variant = "ppo"
args = ["--hidden-size", "16"]

[agents.wide]
args = ["--hidden-size", "128"]
"""


def write(tmp_path, text, name="toy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_config_reads_every_field(tmp_path):
    config = load_config(write(tmp_path, TOML))
    assert config.name == "toy" and config.dataset == "nasdaq" and config.split == "walk_forward"
    assert config.n_groups == 4 and config.seeds == (3, 4)
    assert config.baselines == ("buy_and_hold", "random") and config.common_args == ("--fee-bps", "2")
    assert config.agents == (AgentSpec("small", "ppo", ("--hidden-size", "16")),
                             AgentSpec("wide", "ppo", ("--hidden-size", "128")))
    assert config.n_trials == 2  # configurations, not seeds


def test_defaults_name_and_overrides(tmp_path):
    path = write(tmp_path, '[agents.a]\nvariant = "ppo"\n', name="named_after_file.toml")
    config = load_config(path, seeds=(9,), dataset=None)
    assert config.name == "named_after_file" and config.seeds == (9,) and config.dataset == "sp500"
    assert config.baselines == BASELINE_NAMES and config.split == "cpcv"


@pytest.mark.parametrize(("text", "match"), [
    ('x = 1\n[agents.a]\n', "unknown keys \\['x'\\]"),
    ('[agents.a]\nvariant = "ppo"\nlr = 1\n', "unknown keys \\['lr'\\]"),
    ('agents = 3\n', "tables expected"),
    ('name = "n"\n', "no \\[agents"),
    ('split = "kfold"\n[agents.a]\n', "split 'kfold'"),
    ('baselines = ["oracle"]\n[agents.a]\n', "unknown baselines \\['oracle'\\]"),
    ('seeds = [1, 1]\n[agents.a]\n', "distinct"),
    ('seeds = []\n[agents.a]\n', "distinct"),
    ('validation_bars = -1\n[agents.a]\n', ">= 0"),
    ('select_every = 2\n[agents.a]\n', "needs a validation slice"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file_and_repeated_agent_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such experiment file"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ValueError, match="agent names repeat"):
        ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo"), AgentSpec("a", "ppo")))
