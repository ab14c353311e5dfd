"""PPO over a portfolio of assets: one readable file, modelled on ``sentio_lab/ppo.py``.

Run ``python -m sentio_lab.ppo_portfolio --help``. The algorithm is ``ppo``'s (rollout, GAE, the clipped surrogate,
the truncation bootstrap, checkpoints, exact resume through :mod:`sentio_lab.run_loop`); what differs, and why:

* the data is a panel (:mod:`sentio_lab.data.panel`; ``--dataset sp500_20``: skfolio's 20 S&P 500 stocks, close-only,
  so fills are at the next close and features come from the close-only bank), features fitted on the first
  ``--train-fraction`` of the bars only (:func:`sentio_lab.env.portfolio_arrays.build_portfolio_arrays`);
* the env is :class:`~sentio_lab.env.portfolio.PortfolioEnv`, long-only: the action is a vector of ``A + 1`` target
  weights on the simplex, cash last;
* the policy is a Dirichlet over those weights, from a network that treats the assets alike (a shared per-asset
  encoder with attention across assets and no positional encoding:
  :class:`~sentio_lab.agents.nets.portfolio.PortfolioActorCritic`, whose module doc states the log-probability);
  the observation normaliser pools its statistics over the assets.

Not (yet) here: long-short allocation, benchmark anchoring (a tilt around equal weight), the risk-aware critic, and
the end-of-run W&B evaluation summary (``run_summary`` is single-asset): ``--track`` is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn, optim

from sentio_lab.agents import training
from sentio_lab.agents.arguments import DataArgs, FeatureArgs, Flat, RunArgs, SharedArgs, TrackingArgs
from sentio_lab.agents.nets.portfolio import PortfolioActorCritic
from sentio_lab.agents.rollout import (
    approx_kl,
    bootstrap_truncated,
    clip_fraction,
    compute_gae,
    kl_early_stop,
    normalise_advantages,
    policy_loss,
    value_loss,
)
from sentio_lab.agents.training import TrainResult, resolve_device
from sentio_lab.data.panel import SP500_PANEL, PanelData, load_sp500_panel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import PortfolioArrays, build_portfolio_arrays
from sentio_lab.env.splits import SegmentEpisodeSampler
from sentio_lab.run_loop import run_cli, start_run

VARIANT = "ppo_portfolio"


@dataclass
class Args(SharedArgs):
    """PPO over a long-only portfolio (Dirichlet weights, assets encoded alike): ppo's argument groups (skfolio's
    S&P 500 panel, close-only, by default), plus the encoder's size."""

    data: Flat[DataArgs] = field(default_factory=lambda: DataArgs(dataset=SP500_PANEL, fill_price="next_close"))
    features: Flat[FeatureArgs] = field(default_factory=lambda: FeatureArgs(feature_bank="close", window=16))
    run: Flat[RunArgs] = field(default_factory=lambda: RunArgs(exp_name=VARIANT))
    tracking: Flat[TrackingArgs] = field(default_factory=lambda: TrackingArgs(track=False))
    cross_sectional: bool = False
    """append each feature's rank across the assets at bar t (scaled to [-1, 1]) to every asset's features"""
    d_model: int = 32
    """width of an asset's encoding"""
    n_heads: int = 2
    """attention heads across assets (d_model must divide by it)"""
    n_layers: int = 1
    """transformer blocks across assets"""
    ff_size: int = 64
    """feed-forward width inside each transformer block"""
    min_concentration: float = 1.0
    """floor of every Dirichlet concentration (1: a bounded, log-concave density; below 1 mass may pile on faces)"""


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


def portfolio_market(panel: PanelData, args: Args) -> PortfolioMarket:
    """Split ``panel`` by ``--train-fraction`` / ``--validation-fraction`` and build its arrays, features fitted on
    the training bars only (refitting on the same bars gives the same state: a checkpoint's is kept as a record)."""
    data = args.data
    bars = len(panel.index)
    train_stop = int(bars * data.train_fraction)
    valid_stop = int(bars * (data.train_fraction + data.validation_fraction))
    arrays, states = build_portfolio_arrays(panel, training.feature_config_from(args), train_stop=train_stop,
                                            cross_sectional=args.cross_sectional, fill_price=data.fill_price)
    if train_stop - max(arrays.first_valid, args.features.window - 1) <= args.env.episode_length:
        raise ValueError(f"{panel.name}: {train_stop} training bars cannot hold an episode of --episode-length "
                         f"{args.env.episode_length} after the --window {args.features.window} warm-up; load more "
                         "bars (--data-start) or shorten the episodes")
    ranges = {"train": (0, train_stop), "validation": (train_stop, valid_stop), "test": (valid_stop, bars)}
    return PortfolioMarket(panel=panel, arrays=arrays, ranges=ranges,
                           data=PanelInfo(panel.name, panel_fingerprint(panel), PanelQuality(panel.report())),
                           features=FeatureInfo(states, arrays.feature_names))


def market_for(args: Args, feature_state: dict | None = None) -> PortfolioMarket:
    """The panel ``args`` ask for (``--dataset sp500_20``, ``--data-start`` / ``--data-end``) as a market."""
    if args.data.dataset != SP500_PANEL:
        raise ValueError(f"--dataset {args.data.dataset!r}: ppo_portfolio reads the {SP500_PANEL!r} panel (user "
                         "panels: build one with sentio_lab.data.panel.load_panel and pass train(market=...))")
    panel = load_sp500_panel(start=args.data.data_start, end=args.data.data_end)
    return portfolio_market(panel, args)


feature_config = training.feature_config_from
cost_model = training.cost_model_from
resume_args = training.resume_args


def check_args(args: Args) -> None:
    """Reject settings this variant cannot run, naming the flag (before any data is loaded)."""
    if args.tracking.track:
        raise ValueError("--track: the end-of-run W&B evaluation summary is single-asset only; run with --no-track")
    if args.d_model % args.n_heads:
        raise ValueError(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")


def make_env(args: Args, market: PortfolioMarket, range_name: str = "train") -> PortfolioEnv:
    """Training env: ``num_envs`` random windows inside the named range, long-only, with the run's costs."""
    start, stop = market.range(range_name)
    sampler = None
    if range_name == "train" and market.train_segments is not None:  # a fold: the training segments only
        sampler = SegmentEpisodeSampler(market.train_segments, args.features.window, args.env.episode_length,
                                        first_valid=market.arrays.first_valid, n_bars=len(market.arrays.close))
    return PortfolioEnv(market.arrays, num_envs=args.ppo.num_envs, window=args.features.window,
                        episode_length=args.env.episode_length, start=start, stop=stop, allocation="long_only",
                        costs=cost_model(args), device=resolve_device(args.run.device), seed=args.run.seed,
                        start_sampler=sampler)


def build_agent(args: Args, obs_dim: int, num_actions: int) -> PortfolioActorCritic:
    """The actor-critic for ``num_actions = A + 1`` weights over observations ``obs_dim = A x token + 1`` wide."""
    num_assets = num_actions - 1
    token_dim, rest = divmod(obs_dim - 1, num_assets)
    if rest:
        raise ValueError(f"obs_dim {obs_dim} is not {num_assets} asset blocks + the cash weight")
    return PortfolioActorCritic(num_assets, token_dim, d_model=args.d_model, heads=args.n_heads,
                                layers=args.n_layers, ff=args.ff_size, hidden=args.ppo.hidden_size,
                                norm_obs=args.ppo.norm_obs, min_concentration=args.min_concentration)


def restore_trained(args: Args, bundle: dict[str, Any]) -> tuple[PortfolioActorCritic, PortfolioMarket]:
    """Agent and market of a checkpoint (:func:`sentio_lab.agents.variants.load_trained`): the panel reloaded, its
    fingerprint checked, the features refitted on the same training bars."""
    market = market_for(args)
    if market.data.fingerprint != bundle["data_fingerprint"]:
        raise ValueError(f"panel {market.data.name!r} now has fingerprint {market.data.fingerprint}, the model was "
                         f"trained on {bundle['data_fingerprint']}")
    arrays = market.arrays
    obs_dim = arrays.num_assets * (args.features.window * arrays.features.shape[2] + 1) + 1
    agent = build_agent(args, obs_dim, arrays.num_assets + 1)
    agent.load_state_dict(bundle["agent"])
    agent.eval()
    return agent, market


def train(args: Args, *, market: PortfolioMarket | None = None) -> TrainResult:
    """Run PPO over the portfolio as ``args`` say; ``market`` may be given (a user panel, tests).

    Raises :class:`~sentio_lab.agents.rollout.NonFiniteError` when a reward, value, loss or gradient is not finite.
    """
    run = start_run(VARIANT, args, market=market, env=None, market_for=market_for, make_env=make_env,
                    check=check_args)
    args, env, device = run.args, run.env, run.device
    hp, n_envs = args.ppo, run.n_envs
    agent = build_agent(args, env.obs_dim, env.action_dim).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=hp.learning_rate, eps=1e-5)
    shape = (hp.num_steps, n_envs)
    obs = torch.zeros((*shape, env.obs_dim), device=device)
    actions = torch.zeros((*shape, env.action_dim), device=device)
    logprobs, rewards, dones, values = (torch.zeros(shape, device=device) for _ in range(4))
    state = run.restore(agent, optimizer)
    next_obs, next_done = state.next_obs, state.next_done

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        return run.save(iteration, agent, optimizer, state)

    iteration = state.start_iteration - 1
    for iteration in range(state.start_iteration, hp.num_iterations + 1):
        run.anneal_learning_rate(optimizer, iteration)

        # ---- rollout: num_steps steps of all num_envs portfolios
        for step in range(hp.num_steps):
            state.global_step += hp.num_envs
            with torch.no_grad():
                agent.update_norm(next_obs)
                norm_obs = agent.normalise(next_obs)
                obs[step] = norm_obs
                dones[step] = next_done
                action, logprob, _, value = agent.get_action_and_value(norm_obs)
                values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            if bool(truncated.any()):  # the window ended, the market did not: bootstrap
                with torch.no_grad():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, hp.gamma)
            rewards[step] = reward
            done = terminated | truncated
            next_done = done.to(torch.float32)
            run.end_episodes(state, done)

        # ---- bootstrap value and GAE
        with torch.no_grad():
            next_value = agent.get_value(agent.normalise(next_obs))
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value)
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, hp.gamma, hp.gae_lambda)

        # ---- flatten the batch
        b_obs = obs.reshape((-1, env.obs_dim))
        b_actions = actions.reshape((-1, env.action_dim))
        b_logprobs, b_advantages, b_returns, b_values = (x.reshape(-1) for x in (logprobs, advantages, returns,
                                                                                    values))

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = 0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values = (
                    x.index_select(0, mb_inds) for x in batch
                )
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
                logratio = newlogprob - mb_logprobs
                ratio = logratio.exp()
                with torch.no_grad():
                    old_kl, kl = approx_kl(logratio, ratio)
                    clipfracs.append(clip_fraction(ratio, hp.clip_coef).item())

                if hp.norm_adv:
                    mb_advantages = normalise_advantages(mb_advantages)
                pg_loss = policy_loss(mb_advantages, ratio, hp.clip_coef)
                v_loss = value_loss(newvalue, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
                entropy_loss = entropy.mean()
                loss = pg_loss - hp.ent_coef * entropy_loss + v_loss * hp.vf_coef

                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                run.check_update(iteration, epoch, minibatch, loss, grad_norm, policy_loss=pg_loss,
                                 value_loss=v_loss, entropy=entropy_loss)
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(kl, hp.target_kl):
                break

        losses = {"value_loss": v_loss, "policy_loss": pg_loss, "entropy": entropy_loss, "old_approx_kl": old_kl,
                  "approx_kl": kl}
        record = run.record(state, optimizer, losses, clipfracs, b_values, b_returns, epochs_run, updates_run)
        # the policy's mean weight on cash over the rollout: how invested it is
        record["charts/mean_cash_weight"] = float(b_actions[:, -1].mean())
        run.log(record, state)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state)


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_portfolio`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo_portfolio")


if __name__ == "__main__":
    main()
