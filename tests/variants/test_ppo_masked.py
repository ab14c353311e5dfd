"""The masked PPO variant: ppo bit for bit without masks, valid actions only with masks, exact resume, evaluation."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from sentio_lab import ppo, ppo_masked
from sentio_lab.agents.checkpoint import CheckpointError, load_checkpoint
from sentio_lab.agents.nets import MaskedCategorical, MLPActorCritic
from sentio_lab.agents.variants import VARIANTS, action_masking, load_variant
from sentio_lab.env.masks import MaskConfig, Masker
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policy

#: rules that bind often on the announced market: no shorts, a 3-bar holding period, at most 2 trades per 8 steps
RULES = MaskConfig(long_only=True, cooldown=3, max_trades=2, period_bars=8)


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def masked_args(tiny_args):
    """tiny_args (conftest) as ppo_masked arguments, every rule off."""
    return ppo_masked.Args.from_flat(**tiny_args.flat())


class RecordingEnv:
    """Passes everything to a TradingEnv and records, per step, the env's masks and the actions it was given."""

    def __init__(self, env):
        self.env, self.masks, self.actions = env, [], []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.masks.append(self.env.action_masks().clone())
        self.actions.append(action.clone())
        return self.env.step(action)


def test_help_lists_the_mask_arguments():
    out = subprocess.run([sys.executable, "-m", "sentio_lab.ppo_masked", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--masks.long-only", "--masks.cooldown", "--masks.risk-budget", "--invalid-action", "--resume"):
        assert flag in out
    assert VARIANTS["ppo_masked"] == "sentio_lab.ppo_masked" and load_variant("ppo_masked") is ppo_masked


def test_every_action_valid_reproduces_ppo_bit_for_bit(tiny_args, masked_args, synthetic_market):
    # the masked code path runs (masks stored, passed to sampling and update), with all-True masks
    plain = ppo.train(tiny_args.replace(total_timesteps=8 * 16 * 4), market=synthetic_market)
    masked = ppo_masked.train(masked_args.replace(total_timesteps=8 * 16 * 4, run_name="masked"),
                              market=synthetic_market)
    assert weights_equal(plain.agent, masked.agent)
    p_opt = load_checkpoint(plain.checkpoint_path)["optimizer"]["state"]
    m_opt = load_checkpoint(masked.checkpoint_path)["optimizer"]["state"]
    assert all(torch.equal(p_opt[k][s], m_opt[k][s]) for k in p_opt for s in ("exp_avg", "exp_avg_sq"))
    for p, m in zip(plain.history, masked.history, strict=True):
        assert m["charts/masked_fraction"] == 0.0
        assert {k: v for k, v in p.items() if k != "charts/SPS"} == {
            k: v for k, v in m.items() if k not in ("charts/SPS", "charts/masked_fraction")}
    # and the comparison can fail: another seed gives other weights
    other = ppo_masked.train(masked_args.replace(seed=2, run_name="other"), market=synthetic_market)
    assert not weights_equal(other.agent, masked.agent)


def test_training_with_mask_rules_never_takes_a_masked_action(masked_args, synthetic_market):
    args = masked_args.replace(masks=RULES, invalid_action="refuse")
    env = RecordingEnv(ppo_masked.make_env(args.replace(num_envs=8), synthetic_market))
    result = ppo_masked.train(args, market=synthetic_market, env=env)
    masks, actions = torch.stack(env.masks), torch.stack(env.actions)  # (steps, envs, K), (steps, envs)
    assert masks.shape == (3 * 16, 8, 3)
    assert masks.gather(2, actions[..., None]).all()  # every action taken was valid when it was taken
    assert env.mask_counts == {"long_only": 0, "cooldown": 0, "max_trades": 0}  # nothing refused or remapped
    binding = env.mask_binding
    assert binding["long_only"] == 3 * 16 * 8 and binding["cooldown"] > 0  # the rules did restrict the choice
    assert not masks[..., 0].any() and (actions > 0).any()
    assert 0.3 < result.history[-1]["charts/masked_fraction"] < 1.0
    assert result.history[-1]["masks/long_only"] == 0.0


class _RecordingAgent(MLPActorCritic):
    """Records the rollout's (obs, action, log-prob, mask) and the first update minibatch's log-probabilities."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rollout, self.first_update = [], None

    def get_action_and_value(self, obs, action=None, mask=None, mask_checked=False):
        out = super().get_action_and_value(obs, action, mask, mask_checked)
        if action is None:
            self.rollout.append((obs.clone(), out[0].clone(), out[1].detach().clone(), mask.clone()))
        elif self.first_update is None:
            self.first_update = (obs.clone(), action.clone(), out[1].detach().clone(), mask.clone())
        return out


def test_update_scores_actions_under_the_masks_they_were_sampled_with(masked_args, synthetic_market, monkeypatch):
    monkeypatch.setattr(ppo_masked, "build_agent", lambda args, d, k: _RecordingAgent(d, k,
                                                                                      hidden=args.ppo.hidden_size))
    args = masked_args.replace(masks=RULES, total_timesteps=8 * 16, update_epochs=1)
    agent = ppo_masked.train(args, market=synthetic_market).agent
    obs = torch.cat([r[0] for r in agent.rollout])
    acts = torch.cat([r[1] for r in agent.rollout])
    logp = torch.cat([r[2] for r in agent.rollout])
    masks = torch.cat([r[3] for r in agent.rollout])
    mb_obs, mb_actions, mb_logp, mb_masks = agent.first_update
    restricted = 0
    for o, a, lp, m in zip(mb_obs, mb_actions, mb_logp, mb_masks, strict=True):
        (rows,) = torch.nonzero((obs == o).all(1) & (acts == a), as_tuple=True)
        # before the first optimizer step the new log-probability is the old one exactly: the same masked policy
        assert any(torch.equal(masks[r], m) and torch.equal(logp[r], lp) for r in rows.tolist())
        restricted += int(not m.all())
    assert restricted > 0  # masks that change the distribution were in play


def test_split_run_with_masks_resumes_exactly(masked_args, synthetic_market):
    args = masked_args.replace(masks=RULES, total_timesteps=8 * 16 * 5)
    whole = ppo_masked.train(args, market=synthetic_market)
    part = ppo_masked.train(args.replace(run_name="split", max_iterations=2), market=synthetic_market)
    assert not part.finished
    bundle = load_checkpoint(part.checkpoint_path, variant="ppo_masked")
    assert bundle["args"]["masks"]["cooldown"] == 3 and "mask:since_trade" in bundle["env_state"]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(part.checkpoint_path) == []
    resumed = ppo_masked.train(ppo_masked.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                               market=synthetic_market)
    assert resumed.args.masks == RULES and resumed.finished and resumed.global_step == whole.global_step
    assert weights_equal(whole.agent, resumed.agent)
    assert resumed.history[-1] == {**whole.history[-1], "charts/SPS": resumed.history[-1]["charts/SPS"]}
    # a changed rule is refused by name; a rule left at its default is taken from the checkpoint
    with pytest.raises(CheckpointError, match=r"masks\.cooldown: given 5, checkpoint 3"):
        ppo_masked.train(ppo_masked.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False,
                                         masks=MaskConfig(cooldown=5)), market=synthetic_market)
    with pytest.raises(CheckpointError, match="variant"):
        ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                  market=synthetic_market)


def test_checkpoint_evaluation_applies_the_runs_masks(masked_args, sp500_market):
    args = masked_args.replace(masks=MaskConfig(long_only=True, cooldown=2))
    result = ppo_masked.train(args, market=sp500_market)
    assert action_masking(result.args) == {"masks": args.masks, "invalid_action": "nearest"}
    live = evaluate_policy(result.agent, sp500_market, window=args.features.window, positions=args.env.positions,
                           costs=ppo_masked.cost_model(args), range_name="validation", **action_masking(args))
    restored = evaluate_checkpoint(result.checkpoint_path, "validation")
    assert restored.weights.equals(live.weights) and restored.equity.equals(live.equity)
    assert (live.weights >= 0).all()
    unmasked = evaluate_policy(result.agent, sp500_market, window=args.features.window, positions=args.env.positions,
                               costs=ppo_masked.cost_model(args), range_name="validation")
    assert (unmasked.weights < 0).any()  # the masks, not the agent, kept evaluation long-only


def test_args_round_trip_through_a_dict_and_reject_unknown_enforcement():
    args = ppo_masked.Args.from_flat(masks=RULES)
    assert ppo_masked.Args.from_dict(dataclasses.asdict(args)) == args
    with pytest.raises(ValueError, match="invalid-action"):
        ppo_masked.Args.from_flat(invalid_action="ignore")
    assert np.isclose(ppo_masked.Args().ppo.learning_rate, ppo.Args().ppo.learning_rate)


# ------------------------------------------------------------------------------------ host syncs (issue 18 s3)
#: Tensor methods that copy device data to the host (a sync on an accelerator): scalars, lists, arrays, moves.
_HOST_TRANSFERS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero"}


class SyncCounter(TorchFunctionMode):
    """Counts host transfers: the methods above, and indexing with a bool tensor (its shape depends on the data)."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.paused:
            pass
        elif name in _HOST_TRANSFERS or (name in ("__getitem__", "__setitem__") and len(args) > 1
                                       and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool):
            self.count += 1
        return func(*args, **(kwargs or {}))


class SyncsPerStep:
    """Wraps an env and notes the sync count at every return of ``step``: the differences are the host syncs of
    one rollout step (masks, policy, env step, bookkeeping), or of an update plus one step across iterations."""

    def __init__(self, env, counter):
        self.env, self.counter, self.marks, self.ended = env, counter, [], []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        out = self.env.step(action)
        self.marks.append(self.counter.count)
        self.counter.paused = True  # the test's own look at the episodes that ended is no sync of the run's
        self.ended.append(bool(out[4]["done"].any()))
        self.counter.paused = False
        return out


def _syncs(variant, args, market, num_steps):
    """(syncs of each rollout step inside an iteration, syncs from the last step of iteration 1 to the first of 2,
    whether an episode ended at the step that starts each of the first, whether one ended at the step that ends it)."""
    counter = SyncCounter()
    env = SyncsPerStep(variant.make_env(args, market), counter)
    with counter:
        variant.train(args, market=market, env=env)
    gaps = np.diff(env.marks)
    boundary = num_steps - 1  # the gap that holds iteration 1's update
    inside = np.delete(np.arange(len(gaps)), np.arange(boundary, len(gaps), num_steps))
    return (gaps[inside].tolist(), int(gaps[boundary]), [env.ended[i] for i in inside],
            [env.ended[i + 1] for i in inside])


def test_masks_add_no_host_sync_per_step_and_one_per_rollout(tiny_args, masked_args, synthetic_market, monkeypatch):
    # long episodes: several end inside the rollout (staggered starts), none by ruin; rules that bind
    plain_args = tiny_args.replace(total_timesteps=8 * 12 * 2, num_steps=12)
    args = masked_args.replace(total_timesteps=8 * 12 * 2, num_steps=12, masks=RULES)
    checks = []
    monkeypatch.setattr(ppo_masked, "check_rollout_masks",
                        lambda masks, check=ppo_masked.check_rollout_masks: checks.append(check(masks)))
    boundary = {}
    for minibatches in (2, 4):
        plain_steps, plain_boundary, _, _ = _syncs(ppo, plain_args.replace(num_minibatches=minibatches),
                                                synthetic_market, 12)
        masked_steps, masked_boundary, ended, resets = _syncs(ppo_masked, args.replace(num_minibatches=minibatches),
                                                      synthetic_market, 12)
        # per rollout step: ppo's syncs (was 5 more: mask AND check, policy check, range check, mask AND check
        # again, validity check): 3 in all (masks, env step, truncation / ends) where no episode ends or restarts;
        # after a step where one ended, one more than ppo (ppo's bookkeeping asks again whether one did)
        assert sum(ended) > 0 and not all(ended)
        assert [m - p for m, p in zip(masked_steps, plain_steps, strict=True)] == [int(e) for e in ended]
        assert {m for m, e, r in zip(masked_steps, ended, resets, strict=True) if not e and not r} == {3}
        boundary[minibatches] = masked_boundary - plain_boundary
    # per update: the masked extra does not grow with the number of minibatches (was one check_mask per minibatch)
    assert boundary[2] == boundary[4]
    assert len(checks) == 2 * 2  # the rows of the stored masks: checked once per rollout


def test_cached_masks_and_deferred_checks_give_the_eager_paths_results(masked_args, synthetic_market, monkeypatch):
    # bit-identical to the path that computes every mask twice and checks every row on every call (the code before
    # issue 18 s3): the golden is computed here from that path, not pasted
    args = masked_args.replace(masks=RULES, total_timesteps=8 * 16 * 2)
    fast = ppo_masked.train(args.replace(run_name="fast"), market=synthetic_market)
    with monkeypatch.context() as m:
        m.setattr(Masker, "_decision_masks", lambda self, t, level, equity: (
            masks := self.rule_masks(t, level), self.combine(masks, t, level, equity)))
        init = MaskedCategorical.__init__
        m.setattr(MaskedCategorical, "__init__", lambda self, logits, mask=None, mask_checked=False: init(
            self, logits, mask, mask_checked=False))
        eager = ppo_masked.train(args.replace(run_name="eager"), market=synthetic_market)
    assert weights_equal(fast.agent, eager.agent)
    assert [{k: v for k, v in h.items() if k != "charts/SPS"} for h in fast.history] == [
        {k: v for k, v in h.items() if k != "charts/SPS"} for h in eager.history]
    assert any(v > 0 for k, v in fast.history[-1].items() if k.startswith("masks_binding/"))  # rules did bind


def test_a_rollout_mask_without_a_valid_action_stops_the_run(masked_args, synthetic_market):
    class EmptyRowEnv(RecordingEnv):
        def action_masks(self):
            mask = self.env.action_masks().clone()
            mask[3] = False
            return mask

    args = masked_args.replace(masks=RULES)
    env = EmptyRowEnv(ppo_masked.make_env(args, synthetic_market))
    with pytest.raises(ValueError, match=r"\(rollout step, env\) \[\(0, 3\), \(1, 3\).*allow no action"):
        ppo_masked.train(args, market=synthetic_market, env=env)
