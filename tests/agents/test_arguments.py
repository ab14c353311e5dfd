"""The variants' command line: argument groups, flag names kept, choices checked up front, computed fields hidden,
one-line errors (tracebacks with --debug), flat-keyword construction and checkpoints written before the groups."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from sentio_lab import ppo, ppo_masked, ppo_risk, ppo_transformer
from sentio_lab.agents import training
from sentio_lab.agents.arguments import GROUPS, RUN_CONTROL_FIELDS, saved_fields
from sentio_lab.agents.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sentio_lab.env.masks import MaskConfig
from sentio_lab.run_loop import run_cli
from sentio_lab.scale import tune

VARIANTS = {"ppo": ppo, "ppo_masked": ppo_masked, "ppo_risk": ppo_risk, "ppo_transformer": ppo_transformer}


def _help(module, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(module.Args, module.train, prog=f"python -m {module.__name__}", argv=["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_help_shows_one_box_per_group_the_choices_and_the_module_usage(name, capsys):
    text = _help(VARIANTS[name], capsys)
    assert f"usage: python -m sentio_lab.{name}" in text
    declared = {spec.name for spec in dataclasses.fields(VARIANTS[name].Args)}
    for group in GROUPS:  # every shared group; the opt-in one (risk_critic: ppo_risk, ppo_portfolio) where declared
        if group != "risk_critic" or group in declared:
            assert f"{group.replace('_', '-')} options" in text, group
    for choices in ("{cpu,cuda,auto}", "{offline,online,disabled}", "{refuse,allow}", "{basic,talib,close,slow}",
                    "{next_open,next_close}",
                    "{robust,rank,none}", "{none,corwin_schultz,abdi_ranaldo}", "{none,sqrt,almgren_chriss}",
                    "{cancel,carry}", "{bar,forecast}"):
        assert choices in text, choices
    # the flags keep their flat names; computed fields are no flags
    for flag in ("--total-timesteps", "--fee-bps", "--data-start", "--window", "--seed", "--wandb-mode", "--debug"):
        assert flag in text
    for computed in ("--batch-size", "--minibatch-size", "--num-iterations", "--ppo.", "--env.", "--run."):
        assert computed not in text


def test_each_variants_own_arguments_keep_their_names(capsys):
    assert "--masks.cooldown" in _help(ppo_masked, capsys)
    assert "{nearest,refuse}" in _help(ppo_masked, capsys)
    assert "--risk {neutral,cvar}" in _help(ppo_risk, capsys)
    text = _help(ppo_transformer, capsys)
    assert "--amp {off,bf16,fp16}" in text and "{attention,gated}" in text and "--token-counts" in text


def test_documented_flags_parse_into_their_groups():
    import tyro

    args = tyro.cli(ppo_masked.Args, args=[
        "--dataset", "nasdaq", "--total-timesteps", "512", "--fee-bps", "2.5", "--window", "8", "--seed", "3",
        "--wandb-mode", "disabled", "--no-track", "--masks.cooldown", "5", "--invalid-action", "refuse",
        "--positions", "0", "1", "--stale-opens", "allow"])
    assert args.data.dataset == "nasdaq" and args.data.stale_opens == "allow"
    assert args.ppo.total_timesteps == 512 and args.env.fee_bps == 2.5 and args.env.positions == (0.0, 1.0)
    assert args.features.window == 8 and args.run.seed == 3 and args.run.exp_name == "ppo_masked"
    assert args.tracking.wandb_mode == "disabled" and not args.tracking.track
    assert args.masks == MaskConfig(cooldown=5) and args.invalid_action == "refuse"
    # the variants' own defaults live in their groups
    assert ppo_transformer.Args().data.dataset == "eurusd_1h" and not ppo_risk.Args().ppo.clip_vloss
    assert ppo.Args().ppo.clip_vloss and ppo.Args().data.dataset == "sp500"


@pytest.mark.parametrize("argv, flag", [(["--wandb-mode", "onlin"], "--wandb-mode"),
                                        (["--device", "gpu"], "--device"),
                                        (["--batch-size", "64"], "--batch-size")])
def test_a_bad_choice_or_a_computed_field_fails_up_front_with_tyros_message(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(ppo.Args, lambda args: pytest.fail("must not train"), prog="python -m sentio_lab.ppo", argv=argv)
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def test_argument_errors_are_one_line_naming_the_flag_and_debug_raises(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(ppo.Args, ppo.train, prog="python -m sentio_lab.ppo", argv=["--num-envs", "0", "--no-track"])
    assert str(exit_.value) == "error: --num-envs 0: must be at least 1 (--debug shows the traceback)"
    with pytest.raises(ValueError, match="--num-envs 0: must be at least 1"):
        run_cli(ppo.Args, ppo.train, prog="python -m sentio_lab.ppo", argv=["--num-envs", "0", "--debug"])
    with pytest.raises(SystemExit, match=r"^error: --num-minibatches 9000 must be in \[1, batch_size=8192\]"):
        run_cli(ppo.Args, ppo.train, prog="python -m sentio_lab.ppo", argv=["--num-minibatches", "9000", "--no-track"])


def test_a_data_error_from_the_command_line_is_one_line_without_traceback_and_a_traceback_with_debug(tmp_path):
    # sp500 before its default start holds stale-open stretches: the data layer refuses the range
    argv = [sys.executable, "-m", "sentio_lab.ppo", "--data-start", "2010-01-04", "--no-track", "--no-progress",
            "--feature-cache-dir", "None", "--run-dir", str(tmp_path)]
    env = {**os.environ, "WANDB_MODE": "offline"}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 1
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stale" in lines[0], plain.stderr
    assert "Traceback" not in plain.stderr
    # --debug lets the error propagate (so Python prints its traceback): checked in process, the subprocess above
    # already proved what the command line prints.
    with pytest.raises(ValueError, match="stale") as raised:
        run_cli(ppo.Args, ppo.train, prog="python -m sentio_lab.ppo", argv=[*argv[3:], "--debug"])
    assert raised.traceback  # the real exception with its frames, not a SystemExit


def test_flat_keywords_route_to_their_groups_and_unknown_names_are_refused():
    args = ppo_risk.Args.from_flat(learning_rate=1e-3, fee_bps=3.0, window=4, seed=9, wandb_mode="disabled",
                                   data_end="2020-01-01", num_quantiles=4)
    assert args.ppo.learning_rate == 1e-3 and args.env.fee_bps == 3.0 and args.features.window == 4
    assert args.run.seed == 9 and args.tracking.wandb_mode == "disabled" and args.data.data_end == "2020-01-01"
    assert args.risk_critic.num_quantiles == 4 and args.run.exp_name == "ppo_risk" and not args.ppo.clip_vloss
    with pytest.raises(TypeError, match="learning_rat"):
        ppo.Args.from_flat(learning_rat=1e-3)
    with pytest.raises(TypeError, match="masks"):
        ppo.Args.from_flat(masks=MaskConfig())  # ppo_masked's own field, not ppo's
    copy = args.replace(seed=10)
    assert copy.run.seed == 10 and args.run.seed == 9  # a copy: the original's groups are untouched
    assert copy.flat()["seed"] == 10 and ppo_risk.Args.from_flat(**copy.flat()) == copy


def test_leaf_names_are_unique_across_groups_and_run_control_is_in_the_groups():
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert RUN_CONTROL_FIELDS <= set(names)
    for module in VARIANTS.values():
        own = set(module.Args.routes()) - set(names)
        assert not own & set(names)


def test_a_checkpoint_with_flat_args_loads_resumes_bit_identically_and_refuses_changes(tiny_args, synthetic_market):
    whole = ppo.train(tiny_args.replace(run_name="whole"), market=synthetic_market)
    part = ppo.train(tiny_args.replace(run_name="old", max_iterations=1), market=synthetic_market)
    bundle = load_checkpoint(part.checkpoint_path)
    bundle["args"] = part.args.flat()  # what a checkpoint written before the argument groups holds
    assert "ppo" not in bundle["args"] and bundle["args"]["num_envs"] == 8
    save_checkpoint(part.checkpoint_path, bundle)
    assert ppo.Args.from_dict(bundle["args"]) == part.args
    resumed = ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.finished and resumed.args.ppo.num_envs == 8
    for key, value in whole.agent.state_dict().items():
        assert torch.equal(value, resumed.agent.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="learning_rate: given 0.001"):
        ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), learning_rate=1e-3), market=synthetic_market)


def test_checkpoint_args_of_another_shape_are_refused_with_the_unknown_name(tiny_args):
    saved = {**tiny_args.flat(), "no_such_argument": 1}
    with pytest.raises(CheckpointError, match="no_such_argument"):
        training.resume_args(tiny_args, saved, "old.pt")


def test_nested_own_groups_are_rebuilt_from_a_checkpoints_dicts():
    args = ppo_masked.Args.from_flat(masks=MaskConfig(long_only=True, cooldown=2), invalid_action="refuse")
    for saved in (dataclasses.asdict(args), {**args.flat(), "masks": dataclasses.asdict(args.masks)}):
        assert ppo_masked.Args.from_dict(saved) == args


def test_pbt_writes_into_a_nested_or_a_flat_bundle(tmp_path, tiny_args, synthetic_market):
    result = ppo.train(tiny_args.replace(run_name="pbt", anneal_lr=False), market=synthetic_market)
    for form in ("nested", "flat"):
        bundle = load_checkpoint(result.checkpoint_path)
        if form == "flat":
            bundle["args"] = result.args.flat()
        path = tmp_path / f"{form}.pt"
        save_checkpoint(path, bundle)
        assert tune.apply_mutation(path, {"learning_rate": 1e-3}) == {"learning_rate": (2.5e-4, 1e-3)}
        after = load_checkpoint(path)
        assert saved_fields(after["args"], "learning_rate")["learning_rate"] == 1e-3
        assert ppo.Args.from_dict(after["args"]).ppo.learning_rate == 1e-3
        assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [1e-3]
    with pytest.raises(KeyError, match="nothing_here"):
        saved_fields({"ppo": {}}, "nothing_here")


def test_fill_price_flag_reaches_the_market_and_the_evaluation(tmp_path, tiny_args):
    import tyro

    from sentio_lab.agents.variants import load_trained

    args = tyro.cli(ppo.Args, args=["--fill-price", "next_close", "--data-start", "2010-01-04", "--window", "8"])
    assert args.data.fill_price == "next_close" and ppo.Args().data.fill_price == "next_open"
    # next-close fills read no open: the stale stretches before 2013 no longer refuse the range
    market = ppo.market_for(args.replace(feature_cache_dir=None))
    assert market.arrays.fill_price == "next_close" and market.data.frame.index[0].year == 2010
    result = ppo.train(tiny_args.replace(fill_price="next_close", data_start="2010-01-04", max_iterations=1,
                                         checkpoint_every=0), market=market)
    assert load_trained(result.checkpoint_path).market.arrays.fill_price == "next_close"
