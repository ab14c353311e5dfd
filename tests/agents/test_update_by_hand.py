"""Every PPO variant's update against a hand computation of the same step, from a recorded rollout.

Why: the variants share their loss helpers (sentio_lab.agents.rollout) and are compared with ``ppo`` bit for bit, so a
mistake made in all of them at once (advantage normalisation dropped, the entropy bonus's sign flipped, the clipped
surrogate broken, the value clip dropped, GAE miscounted) would pass every comparison. Here nothing of the
variants' maths is reused: the test

1. runs one iteration of the variant through its public ``train(args, env=...)`` and records what happened:
   the env's rewards, terminations, truncations and final observations (a wrapper around the env), the
   observations, actions, masks, log-probabilities and values of the rollout (a recording
   ``get_action_and_value`` on the agent's class) and the parameters and gradients at every optimizer step
   (a global optimizer step pre-hook, whatever optimizer the variant uses);
2. recomputes from those records, with the formulas written out below (CleanRL's PPO; for ``ppo_risk`` the
   quantile Huber loss of sentio_lab/agents/nets/quantile.py's docstring and per-quantile lambda-returns), the
   truncation bootstrap, GAE, the normalised advantages, the ratio, the clipped surrogate, the entropy term, the
   (clipped) value loss, their gradient at the recorded parameters and the global gradient-norm clip;
3. compares the gradient with the one the optimizer stepped on (relative error per parameter tensor).

Only the network is shared with the variant (the agent's ``get_action_and_value`` / ``get_value`` give the
log-probabilities, values and quantiles the formulas read). ``num_minibatches = 1``: the one minibatch is a
permutation of the whole batch, and every loss term is a mean (the advantage normalisation's mean and standard
deviation too), so the hand computation works on the batch in rollout order. ``update_epochs = 2``: at the second
step the policy and the value have moved (a large learning rate, a small ``clip_coef``), the ratio is not 1 and
both clips bind on part of the batch -- asserted, and each test also checks that the hand gradient of every
mutation it guards against is far from the recorded one, so the comparison can see it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sentio_lab import ppo, ppo_masked, ppo_risk, ppo_transformer
from sentio_lab.env.masks import MaskConfig

#: The recorded gradient must equal the hand one to this relative error (per parameter tensor, in norm): the
#: variant computes in float32, the hand computation in float64, so they agree to ~1e-6.
RTOL = 1e-5
#: A mutation's hand gradient must be at least this far (relative, over all parameters) from the recorded one.
MUTANT_GAP = 1e-3

F64 = torch.float64

#: The algorithm's settings, read by the hand computation from here (not from a variant's Args, whose layout may
#: change): one iteration of 8 envs x 16 steps, one minibatch, two epochs; a large learning rate and a small clip_coef
#: so that the second step's ratio and value clips bind; an entropy coefficient large enough to see its sign.
HYPER = dict(
    num_envs=8, num_steps=16, num_minibatches=1, update_epochs=2, gamma=0.99, gae_lambda=0.95, reward_scale=100.0,
    learning_rate=0.002, clip_coef=0.02, ent_coef=0.1, vf_coef=0.5, max_grad_norm=0.5, positions=(-1.0, 0.0, 1.0),
)
#: The rest of a run: episodes of at most 5 steps (truncated several times in the rollout, and the last step of most
#: envs is not: both the truncation bootstrap and the next-value bootstrap are in play), raw observations (the
#: normaliser is not under test here), nothing written.
RUN = dict(total_timesteps=8 * 16, window=8, episode_length=5, norm_obs=False, track=False, progress=False,
           run_name="hand", checkpoint_every=0, feature_cache_dir=None)


def settings(**extra: Any) -> SimpleNamespace:
    """:data:`HYPER` plus the variant's own settings (clip_vloss; num_quantiles and kappa for ppo_risk)."""
    return SimpleNamespace(**HYPER, **extra)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tiny networks only lose to thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- recording


@dataclass
class Record:
    """What one training run did: the env's side of each step, the agent's rollout calls, the optimizer steps."""

    env_steps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    rollout: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    agent: torch.nn.Module | None = None
    initial_agent: torch.nn.Module | None = None  # a copy taken at the first rollout call (before any update)


class RecordingEnv:
    """Passes everything to the variant's env and records what each step returned."""

    def __init__(self, env: Any, record: Record) -> None:
        self.env, self.record = env, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def step(self, action: torch.Tensor):
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        self.record.env_steps.append({
            "action": action.clone(), "next_obs": next_obs.clone(), "reward": reward.clone(),
            "terminated": terminated.clone(), "truncated": truncated.clone(), "final_obs": info["final_obs"].clone(),
        })
        return next_obs, reward, terminated, truncated, info


@pytest.fixture()
def recorded(monkeypatch, tmp_path):
    """``run(variant, args, env, agent_class)``: train one iteration, return its :class:`Record`."""
    handles = []

    def run(variant, args, env, agent_class) -> tuple[Record, Any]:
        record = Record()
        original = agent_class.get_action_and_value

        def recording(self, obs, action=None, mask=None, **options):  # options: e.g. masked PPO's mask_checked
            out = original(self, obs, action, mask, **options)
            if action is None and self is not record.initial_agent:  # a rollout decision of the trained agent
                if record.agent is None:
                    record.agent = self
                    record.initial_agent = copy.deepcopy(self)
                record.rollout.append({"obs": obs.clone(), "mask": None if mask is None else mask.clone(),
                                       "action": out[0].clone(), "logprob": out[1].detach().clone(),
                                       "value": out[3].detach().clone()})
            return out

        def on_step(optimizer, *_):
            names = {id(p): name for name, p in record.agent.named_parameters()}
            params = [p for group in optimizer.param_groups for p in group["params"]]
            record.updates.append({
                "params": {names[id(p)]: p.detach().clone() for p in params},
                "grads": {names[id(p)]: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                          for p in params},
            })

        monkeypatch.setattr(agent_class, "get_action_and_value", recording)
        handles.append(register_optimizer_step_pre_hook(on_step))
        try:
            # its own run folder: under pytest-xdist another worker may train a "hand" run at the same time
            result = variant.train(args.replace(run_dir=str(tmp_path / "runs")), env=RecordingEnv(env, record))
        finally:
            handles.pop().remove()
            monkeypatch.setattr(agent_class, "get_action_and_value", original)
        assert result.agent is record.agent
        return record, result

    yield run
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------- the maths, written out


def gae(rewards, values, ended, next_value, gamma, lam):
    """Generalised advantage estimation over (T, N, ...) tensors; ``ended[t]`` says the episode ended at step t
    (terminated or truncated: no link from t to t + 1). Returns (advantages, returns = advantages + values)."""
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(steps)):
        following = next_value if t == steps - 1 else values[t + 1]
        keep = 1.0 - ended[t]
        delta = rewards[t] + gamma * following * keep - values[t]
        running = delta + gamma * lam * keep * running
        advantages[t] = running
    return advantages, advantages + values


def quantile_huber_per_sample(predicted, targets, taus, kappa):
    """sentio_lab/agents/nets/quantile.py's docstring: u_ij = target_j - predicted_i, L = u^2 / 2 inside kappa, else
    kappa (|u| - kappa / 2); per sample mean_i mean_j |tau_i - 1{u_ij < 0}| L(u_ij) / kappa."""
    u = targets[:, None, :] - predicted[:, :, None]
    huber = torch.where(u.abs() <= kappa, 0.5 * u**2, kappa * (u.abs() - 0.5 * kappa))
    weight = (taus[None, :, None] - (u.detach() < 0).to(u.dtype)).abs()
    return (weight * huber / kappa).mean(dim=(1, 2))


@dataclass
class Batch:
    """The rollout as one flat batch in rollout order (float64), with its hand-computed targets."""

    obs: torch.Tensor
    actions: torch.Tensor
    masks: torch.Tensor | None
    old_logprobs: torch.Tensor
    old_values: torch.Tensor  # scalar values (ppo) or quantiles (B, N) (ppo_risk)
    advantages: torch.Tensor
    returns: torch.Tensor  # value targets: (B,) or per-quantile (B, N)


def hand_batch(record: Record, hp: SimpleNamespace, quantiles: bool) -> Batch:
    """Truncation bootstrap and GAE by hand from the recorded rollout (values: the rollout's own estimates)."""
    steps, rollout = record.env_steps, record.rollout
    assert len(steps) == len(rollout) == hp.num_steps
    # what the agent saw at step t + 1 is what the env returned at step t (the variant feeds it the right obs)
    for t in range(hp.num_steps - 1):
        assert torch.equal(rollout[t + 1]["obs"], steps[t]["next_obs"])
        assert torch.equal(rollout[t]["action"], steps[t]["action"])
    net = copy.deepcopy(record.initial_agent).double()
    gamma, lam = hp.gamma, hp.gae_lambda

    def estimate(obs):  # V(s) (ppo) or the quantiles (ppo_risk) of the rollout's (not yet updated) agent
        with torch.no_grad():
            return (net.get_quantiles(obs.to(F64)) if quantiles else net.get_value(obs.to(F64))).to(F64)

    values = torch.stack([r["value"] for r in rollout]).to(F64)
    torch.testing.assert_close(values, torch.stack([estimate(r["obs"]) for r in rollout]), rtol=1e-5, atol=1e-5)
    rewards = torch.stack([s["reward"] for s in steps]).to(F64) * hp.reward_scale
    truncated = torch.stack([s["truncated"] for s in steps]).to(F64)
    ended = torch.maximum(truncated, torch.stack([s["terminated"] for s in steps]).to(F64))
    assert truncated.any() and not truncated[-1].all()  # both bootstraps below are in play
    final_values = torch.stack([estimate(s["final_obs"]) for s in steps])  # what the agent would have seen next
    next_value = estimate(steps[-1]["next_obs"])
    if quantiles:  # risk neutral: the scalar value is the quantiles' mean; each quantile is bootstrapped itself
        scalar_rewards = rewards + gamma * final_values.mean(-1) * truncated
        advantages, _ = gae(scalar_rewards, values.mean(-1), ended, next_value.mean(-1), gamma, lam)
        quantile_rewards = rewards[..., None] + gamma * final_values * truncated[..., None]
        _, returns = gae(quantile_rewards, values, ended[..., None], next_value, gamma, lam)
    else:
        advantages, returns = gae(rewards + gamma * final_values * truncated, values, ended, next_value, gamma, lam)
    flat = lambda x: x.reshape(hp.num_steps * hp.num_envs, *x.shape[2:])  # noqa: E731
    masks = None if rollout[0]["mask"] is None else flat(torch.stack([r["mask"] for r in rollout]))
    return Batch(
        obs=flat(torch.stack([r["obs"] for r in rollout])), actions=flat(torch.stack([r["action"] for r in rollout])),
        masks=masks, old_logprobs=flat(torch.stack([r["logprob"] for r in rollout])).to(F64),
        old_values=flat(values), advantages=flat(advantages), returns=flat(returns),
    )


#: The mistakes the hand gradient must tell apart from the right one (each one of the formulas below, broken).
MUTATIONS = ("no_adv_norm", "entropy_sign", "unclipped_surrogate", "min_surrogate", "no_value_clip", "value_clip")


def hand_gradient(record: Record, step: int, batch: Batch, hp: SimpleNamespace, quantiles: bool,
                  mutation: str | None = None):
    """The gradient of CleanRL's PPO loss at the parameters of optimizer step ``step``, after the global norm clip;
    with ``mutation`` the same with one formula broken (:data:`MUTATIONS`). Also returns the clip diagnostics."""
    net = copy.deepcopy(record.initial_agent)
    params = record.updates[step]["params"]
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name])
    net = net.double()
    obs = batch.obs.to(F64)
    # log pi(k | s) of every action k, scored through the network; the one taken, the values, and the entropy
    per_action = []
    for k in range(len(hp.positions)):
        _, logp_k, _, out = net.get_action_and_value(obs, torch.full_like(batch.actions, k), batch.masks)
        per_action.append(logp_k.to(F64))
    logp_all = torch.stack(per_action, dim=-1)
    new_values = out.to(F64)
    new_logprob = logp_all.gather(-1, batch.actions[:, None]).squeeze(-1)
    valid = torch.ones_like(logp_all, dtype=torch.bool) if batch.masks is None else batch.masks
    entropy = -torch.where(valid, logp_all.exp() * logp_all, 0.0).sum(-1)

    ratio = torch.exp(new_logprob - batch.old_logprobs)
    adv = batch.advantages
    if mutation != "no_adv_norm":
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # sample std (Bessel), as CleanRL
    eps = hp.clip_coef
    surrogate = -adv * ratio
    clipped_surrogate = -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    if mutation == "unclipped_surrogate":
        pg_loss = surrogate.mean()
    elif mutation == "min_surrogate":
        pg_loss = torch.minimum(surrogate, clipped_surrogate).mean()
    else:
        pg_loss = torch.maximum(surrogate, clipped_surrogate).mean()

    clip_value = hp.clip_vloss
    if mutation == "no_value_clip":
        clip_value = False
    elif mutation == "value_clip":
        clip_value = True
    moved = batch.old_values + torch.clamp(new_values - batch.old_values, -eps, eps)
    if quantiles:
        taus = (2 * torch.arange(hp.num_quantiles, dtype=F64) + 1) / (2 * hp.num_quantiles)
        v_each = quantile_huber_per_sample(new_values, batch.returns, taus, hp.kappa)
        if clip_value:
            v_each = torch.maximum(v_each, quantile_huber_per_sample(moved, batch.returns, taus, hp.kappa))
        v_loss = v_each.mean()
    else:
        v_each = (new_values - batch.returns) ** 2
        if clip_value:
            v_each = torch.maximum(v_each, (moved - batch.returns) ** 2)
        v_loss = 0.5 * v_each.mean()

    ent_coef = -hp.ent_coef if mutation == "entropy_sign" else hp.ent_coef
    loss = pg_loss - ent_coef * entropy.mean() + hp.vf_coef * v_loss
    names = [name for name, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()], allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(grads, net.named_parameters(), strict=True)]
    total_norm = torch.sqrt(sum((g**2).sum() for g in grads))
    scale = min(1.0, hp.max_grad_norm / (float(total_norm) + 1e-6))  # torch's clip_grad_norm_
    diagnostics = {
        "ratio_clipped": float(((ratio - 1).abs() > eps).double().mean()),
        "value_clipped": float(((new_values - batch.old_values).abs() > eps).double().mean()),
    }
    return {name: g * scale for name, g in zip(names, grads, strict=True)}, diagnostics


def relative_error(recorded: dict[str, torch.Tensor], hand: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter tensor: ||recorded - hand|| / (||hand|| + 1e-3 ||whole hand gradient||); the floor keeps a
    tensor whose true gradient is 0 (the transformer's fusion query over a single timeframe: a softmax over one key)
    from dividing rounding noise by nothing, while a large critic gradient still cannot hide an actor error."""
    floor = 1e-3 * float(torch.sqrt(sum((g**2).sum() for g in hand.values())))
    return {name: float((recorded[name].to(F64) - g).norm()) / (float(g.norm()) + floor) for name, g in hand.items()}


def overall_error(recorded: dict[str, torch.Tensor], hand: dict[str, torch.Tensor]) -> float:
    diff = torch.sqrt(sum(((recorded[n].to(F64) - g) ** 2).sum() for n, g in hand.items()))
    return float(diff / torch.sqrt(sum((g**2).sum() for g in hand.values())))


def check_update(record: Record, hp: SimpleNamespace, quantiles: bool = False) -> None:
    """Both optimizer steps match the hand gradient; at the second both clips bind and every mutation shows."""
    assert len(record.updates) == hp.update_epochs == 2
    batch = hand_batch(record, hp, quantiles)
    for step in range(2):
        hand, diagnostics = hand_gradient(record, step, batch, hp, quantiles)
        errors = relative_error(record.updates[step]["grads"], hand)
        assert max(errors.values()) < RTOL, f"optimizer step {step + 1}: {errors}"
    # at the second step the clips bind: the ratio leaves [1 - eps, 1 + eps] on part of the batch, the value moves by
    # more than eps
    assert 0.0 < diagnostics["ratio_clipped"] < 1.0 and diagnostics["value_clipped"] > 0.0, diagnostics
    # and each mistake moves the gradient far beyond the tolerance: the comparison above would catch it
    recorded = record.updates[1]["grads"]
    for mutation in MUTATIONS:
        if mutation == ("value_clip" if hp.clip_vloss else "no_value_clip"):
            continue  # that one is no change
        wrong, _ = hand_gradient(record, 1, batch, hp, quantiles, mutation)
        assert overall_error(recorded, wrong) > MUTANT_GAP, mutation


# ---------------------------------------------------------------- the variants


@pytest.mark.parametrize("clip_vloss", [True, False], ids=["clip_vloss", "no_clip_vloss"])
def test_ppo_update_matches_the_hand_computation(recorded, synthetic_market, clip_vloss):
    hp = settings(clip_vloss=clip_vloss)
    args = ppo.Args.from_flat(**RUN, **vars(hp))
    env = ppo.make_env(args, synthetic_market)
    record, _ = recorded(ppo, args, env, type(ppo.build_agent(args, env.obs_dim, env.num_actions)))
    check_update(record, hp)


#: Rules that bind on the announced market: action 0 (short) is never valid, and a 2-step holding period.
RULES = MaskConfig(long_only=True, cooldown=2)


@pytest.mark.parametrize("clip_vloss", [True, False], ids=["clip_vloss", "no_clip_vloss"])
def test_ppo_masked_update_matches_the_hand_computation(recorded, synthetic_market, clip_vloss):
    hp = settings(clip_vloss=clip_vloss)
    args = ppo_masked.Args.from_flat(**RUN, **vars(hp), masks=RULES)
    env = ppo_masked.make_env(args, synthetic_market)
    record, _ = recorded(ppo_masked, args, env, type(ppo_masked.build_agent(args, env.obs_dim, env.num_actions)))
    masks = torch.stack([r["mask"] for r in record.rollout])
    assert not masks[..., 0].any() and not masks.all(-1).all()  # the masks restrict the policy
    check_update(record, hp)


@pytest.mark.parametrize("clip_vloss", [False, True], ids=["no_clip_vloss", "clip_vloss"])
def test_ppo_risk_update_matches_the_hand_computation(recorded, synthetic_market, clip_vloss):
    # kappa 1 with rewards scaled to ~1: both branches of the Huber loss are in play (checked below)
    hp = settings(clip_vloss=clip_vloss, num_quantiles=8, kappa=1.0)
    args = ppo_risk.Args.from_flat(**RUN, **vars(hp))
    env = ppo_risk.make_env(args, synthetic_market)
    record, _ = recorded(ppo_risk, args, env, type(ppo_risk.build_agent(args, env.obs_dim, env.num_actions)))
    batch = hand_batch(record, hp, quantiles=True)
    td = (batch.returns[:, None, :] - batch.old_values[:, :, None]).abs()
    assert 0.05 < float((td > hp.kappa).double().mean()) < 0.95
    check_update(record, hp, quantiles=True)


#: A small transformer over the base window only (the token blocks are the env's business, not the update's).
TRANSFORMER = dict(token_timeframes=(), token_counts=(), d_model=16, n_heads=2, ff_size=32, hidden_size=16)


@pytest.mark.parametrize("clip_vloss", [True, False], ids=["clip_vloss", "no_clip_vloss"])
def test_ppo_transformer_update_matches_the_hand_computation(recorded, synthetic_market, clip_vloss):
    hp = settings(clip_vloss=clip_vloss)
    args = ppo_transformer.Args.from_flat(**RUN, **vars(hp), **TRANSFORMER)
    env = ppo_transformer.make_env(args, synthetic_market)
    agent_class = type(ppo_transformer.build_agent(args, env.obs_dim, env.num_actions))
    record, _ = recorded(ppo_transformer, args, env, agent_class)
    check_update(record, hp)


# ---------------------------------------------------------------- the value clip changes training


def weights(agent: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


@pytest.mark.parametrize("variant", ["ppo", "ppo_masked", "ppo_transformer"])
def test_value_clip_binds_and_changes_the_trained_weights(synthetic_market, variant):
    """Where the value moves more than clip_coef in an update, training with and without clip_vloss ends with other
    weights (in the default tiny configurations it never does, so they cannot tell the two apart)."""
    module = {"ppo": ppo, "ppo_masked": ppo_masked, "ppo_transformer": ppo_transformer}[variant]
    extra = TRANSFORMER if variant == "ppo_transformer" else {}
    trained = {}
    for clip in (True, False):
        args = module.Args.from_flat(**{**RUN, "total_timesteps": 8 * 16 * 2}, **HYPER, clip_vloss=clip, **extra)
        trained[clip] = weights(module.train(args, env=module.make_env(args, synthetic_market)).agent)
    assert not torch.equal(trained[True], trained[False])
