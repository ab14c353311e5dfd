"""PPO over a portfolio of assets: one readable file, modelled on ``sentio_lab/ppo.py``.

Run ``python -m sentio_lab.ppo_portfolio --help``. The algorithm is ``ppo``'s (rollout, GAE, the clipped surrogate,
the truncation bootstrap, checkpoints, exact resume through :mod:`sentio_lab.run_loop`); what differs, and why:

* the data is a panel (:mod:`sentio_lab.data.panel`; ``--dataset sp500_20``: skfolio's 20 S&P 500 stocks, close-only,
  so fills are at the next close and features come from the close-only bank), features fitted on the first
  ``--train-fraction`` of the bars only (:func:`sentio_lab.env.portfolio_arrays.build_portfolio_arrays`);
* the env is :class:`~sentio_lab.env.portfolio.PortfolioEnv`; the network treats the assets alike (a shared per-asset
  encoder with attention across assets and no positional encoding:
  :class:`~sentio_lab.agents.nets.portfolio.PortfolioActorCritic`, whose module doc states each log-probability);
  the observation normaliser pools its statistics over the assets. Three action distributions:

  - long-only (default): a Dirichlet over the ``A + 1`` target weights on the simplex, cash last; its log-probability
    is ``Dirichlet.log_prob`` of the stored weights (no change of variables: they are drawn on the simplex);
  - ``--long-short --gross-limit G``: a Dirichlet over ``2A + 1`` legs (each asset's long and short leg, and the
    unused gross); the env gets ``w_i = G (long_i - short_i)``, so ``sum |w| < G`` by construction (cash
    ``1 - sum w``); the log-probability is the Dirichlet's of the stored ``2A + 1`` legs, exact;
  - ``--anchor NAME``: a diagonal Gaussian tilt ``tau`` over the ``A + 1`` weights; the env trades
    ``P(b_t + tau)``, ``b_t`` the benchmark's weights and ``P`` the Euclidean projection onto the simplex
    (:mod:`sentio_lab.env.portfolio_anchor`); the log-probability is the Gaussian's of the raw tilt (the projection is
    the env's, as CleanRL's continuous PPO leaves clipping to the env). The mean tilt starts at 0 for every
    observation: the untrained greedy agent *is* the benchmark, bit for bit. ``--excess-reward`` rewards the log
    return over the benchmark's own (a shadow account with the same fills and costs). The benchmark is equal weight
    or a skfolio portfolio refitted at each bar on training returns up to it only
    (:mod:`sentio_lab.env.portfolio_benchmarks`); with ``--anchor-rebalance K`` it re-targets every K steps and
    drifts in between, and the zero tilt is the runner's baseline of the same name, bit for bit.

* ``--num-quantiles``, ``--risk cvar``, ``--cost-limit``: ``ppo_risk``'s quantile critic, CVaR and PID-Lagrangian
  drawdown constraint (:mod:`sentio_lab.agents.portfolio_risk`); off by default (the variant as before, bit for bit).

Not here: the end-of-run W&B summary (``run_summary`` is single-asset): ``--track`` is refused. Tune scores a trial by
:func:`validation_equity`; a fold market (``train_segments``) keeps training episodes inside its training segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from sentio_lab.agents import training
from sentio_lab.agents.arguments import (
    DataArgs,
    EnvArgs,
    FeatureArgs,
    Flat,
    RiskCriticArgs,
    RunArgs,
    SharedArgs,
    TrackingArgs,
)
from sentio_lab.agents.nets.portfolio import PortfolioActorCritic
from sentio_lab.agents.portfolio_risk import PortfolioRisk, check_risk_args, risk_aware
from sentio_lab.agents.rollout import (
    bootstrap_truncated,
    compute_gae,
    gather_minibatch,
    kl_early_stop,
    ppo_objective,
    value_loss,
)
from sentio_lab.agents.training import TrainResult, resolve_device
from sentio_lab.data.panel import SP500_PANEL, PanelData, load_sp500_panel
from sentio_lab.env.anchor import DEFAULT_TILTS
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_anchor import PortfolioAnchor, equal_weight_benchmark
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.env.portfolio_benchmarks import fitted_benchmark
from sentio_lab.env.portfolio_market import (
    FeatureInfo,
    PanelInfo,
    PanelQuality,
    PortfolioMarket,
    panel_fingerprint,
)
from sentio_lab.env.splits import SegmentEpisodeSampler, fit_rows
from sentio_lab.run_loop import run_cli, start_run

VARIANT = "ppo_portfolio"


@dataclass
class PortfolioEnvArgs(EnvArgs):
    """Environment and costs (ppo's group), with the portfolio's benchmark for ``--anchor``."""

    anchor: Literal["equal_weight", "inverse_volatility", "minimum_variance", "maximum_diversification", "hrp"] | None \
        = None
    """benchmark the actions tilt around: target = projection onto the simplex of benchmark weights + a Gaussian tilt
    (sentio_lab.env.portfolio_anchor); a skfolio portfolio is fitted on training returns <= t only; the untrained
    agent's greedy action is the zero tilt (the benchmark)"""


@dataclass
class Args(SharedArgs):
    """PPO over a long-only portfolio (Dirichlet weights, assets encoded alike): ppo's argument groups (skfolio's
    S&P 500 panel, close-only, by default), plus the encoder's size."""

    data: Flat[DataArgs] = field(default_factory=lambda: DataArgs(dataset=SP500_PANEL, fill_price="next_close"))
    features: Flat[FeatureArgs] = field(default_factory=lambda: FeatureArgs(feature_bank="close", window=16))
    run: Flat[RunArgs] = field(default_factory=lambda: RunArgs(exp_name=VARIANT))
    env: Flat[PortfolioEnvArgs] = field(default_factory=PortfolioEnvArgs)
    tracking: Flat[TrackingArgs] = field(default_factory=lambda: TrackingArgs(track=False))
    risk_critic: Flat[RiskCriticArgs] = field(default_factory=RiskCriticArgs)
    long_short: bool = False
    """long-short allocation: signed weights with sum |w| <= --gross-limit, cash 1 - sum w (default: long-only)"""
    gross_limit: float = 1.0
    """with --long-short: the gross exposure limit G (sum |w| <= G)"""
    anchor_rebalance: int = 1
    """with --anchor: episode steps between the benchmark's re-targets; it drifts with prices in between (the zero
    tilt then equals the runner's baseline at that frequency); 1: re-target every step (a constant mix)"""
    tilt_std: float = 0.05
    """with --anchor: the Gaussian tilt's starting standard deviation (learned; one for every weight)"""
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
    check_risk_args(args.risk_critic)
    env = args.env
    single_asset = [flag for flag, value, default in (("--deviation-penalty", env.deviation_penalty, 0.0),
        ("--no-trade-band", env.no_trade_band, 0.0), ("--tilts", tuple(env.tilts), DEFAULT_TILTS),
        ("--zero-tilt-prob", env.zero_tilt_prob, 0.5)) if value != default]
    if single_asset:
        raise ValueError(f"{', '.join(single_asset)}: single-asset anchor options; the portfolio tilt is continuous "
                         "(--tilt-std); drop them")
    if env.excess_reward and env.anchor is None:
        raise ValueError("--excess-reward only acts with --anchor (a benchmark to beat); add --anchor equal_weight")
    if args.anchor_rebalance != 1 and env.anchor is None:
        raise ValueError(f"--anchor-rebalance {args.anchor_rebalance} only acts with --anchor; add one or drop it")
    if env.anchor is not None and args.long_short:
        raise ValueError("--anchor with --long-short: the tilt is projected onto the long-only simplex; drop one")
    if args.gross_limit != 1.0 and not args.long_short:
        raise ValueError(f"--gross-limit {args.gross_limit} only acts with --long-short; add it or drop the limit")


def policy_of(args: Args) -> str:
    """The action distribution ``args`` ask for (:data:`sentio_lab.agents.nets.portfolio.POLICIES`)."""
    return "tilt" if args.env.anchor is not None else "long_short" if args.long_short else "dirichlet"


def anchor_for(args: Args, market: PortfolioMarket) -> PortfolioAnchor | None:
    """The benchmark of ``--anchor`` on ``market``, with ``--excess-reward`` and ``--anchor-rebalance``: equal weight
    reads no bar; a skfolio portfolio is refitted at each bar on the training returns up to it (the ``train`` range,
    or a fold market's ``train_segments``: :mod:`sentio_lab.env.portfolio_benchmarks`)."""
    name, arrays = args.env.anchor, market.arrays
    if name is None:
        return None
    n_bars = len(arrays.close)
    if name == "equal_weight":
        benchmark = equal_weight_benchmark(n_bars, arrays.num_assets)
    else:
        rows = fit_rows(market.train_segments or [market.range("train")], n_bars)
        first = arrays.first_valid + args.features.window - 1  # no decision before: fit nothing there
        benchmark = fitted_benchmark(name, arrays.close, rows, first, market.panel.assets)
    return PortfolioAnchor(benchmark, args.env.excess_reward, name, args.anchor_rebalance)


def make_env(args: Args, market: PortfolioMarket, range_name: str = "train") -> PortfolioEnv:
    """Training env: ``num_envs`` random windows inside the named range (on a fold market, inside its training
    segments only), with the run's allocation, anchor and costs (evaluation builds its env here too)."""
    start, stop = market.range(range_name)
    sampler = None
    if range_name == "train" and market.train_segments is not None:  # a fold: the training segments only
        sampler = SegmentEpisodeSampler(market.train_segments, args.features.window, args.env.episode_length,
                                        first_valid=market.arrays.first_valid, n_bars=len(market.arrays.close))
    return PortfolioEnv(market.arrays, num_envs=args.ppo.num_envs, window=args.features.window,
                        episode_length=args.env.episode_length, start=start, stop=stop,
                        allocation="long_short" if args.long_short else "long_only", gross_limit=args.gross_limit,
                        costs=cost_model(args), device=resolve_device(args.run.device), seed=args.run.seed,
                        start_sampler=sampler, anchor=anchor_for(args, market))


def validation_equity(agent: PortfolioActorCritic, args: Args, market: PortfolioMarket,
                      range_name: str = "validation") -> pd.Series:
    """The greedy agent's equity over ``range_name`` (one account from the range's first decision bar to its end, net
    of costs, indexed by the bars it is marked on): Tune's fitness (:mod:`sentio_lab.scale.tune`)."""
    start, stop = market.range(range_name)
    first = max(start, market.arrays.first_valid + args.features.window - 1)
    env = make_env(args.replace(num_envs=1, episode_length=stop - 1 - first), market, range_name)
    obs, equity = env.reset([first]), [1.0]
    for _ in range(stop - 1 - first):
        obs, _, terminated, _, info = env.step(agent.act_greedy(obs))
        equity.append(float(info["equity"][0]))
        if bool(terminated[0]):  # ruined: the account stops there
            break  # (an episode as long as the range never truncates)
    return pd.Series(equity, index=market.panel.index[first:first + len(equity)], name="equity")


def build_agent(args: Args, obs_dim: int, num_actions: int) -> PortfolioActorCritic:
    """The actor-critic for ``A`` assets (``num_actions``: the env's action width, ``A + 1`` long-only, ``A``
    long-short) over observations ``obs_dim = A x token + 1`` wide."""
    num_assets, risk = num_actions if args.long_short else num_actions - 1, args.risk_critic
    token_dim, rest = divmod(obs_dim - 1, num_assets)
    if rest:
        raise ValueError(f"obs_dim {obs_dim} is not {num_assets} asset blocks + the cash weight")
    return PortfolioActorCritic(num_assets, token_dim, d_model=args.d_model, heads=args.n_heads,
                                layers=args.n_layers, ff=args.ff_size, hidden=args.ppo.hidden_size,
                                norm_obs=args.ppo.norm_obs, min_concentration=args.min_concentration,
                                policy=policy_of(args), gross_limit=args.gross_limit, tilt_std=args.tilt_std,
                                num_quantiles=risk.num_quantiles, risk=risk.risk, cvar_alpha=risk.cvar_alpha,
                                cost_critic=risk.cost_limit is not None)


def restore_trained(args: Args, bundle: dict[str, Any]) -> tuple[PortfolioActorCritic, PortfolioMarket]:
    """Agent and market of a checkpoint (:func:`sentio_lab.agents.variants.load_trained`): the panel reloaded, its
    fingerprint checked, the features and an anchor's benchmark refitted on the same training bars (the benchmark
    checked against the checkpoint's record)."""
    market = market_for(args)
    if market.data.fingerprint != bundle["data_fingerprint"]:
        raise ValueError(f"panel {market.data.name!r} now has fingerprint {market.data.fingerprint}, the model was "
                         f"trained on {bundle['data_fingerprint']}")
    recorded, anchor = bundle["extra"].get("anchor_benchmark"), anchor_for(args, market)
    if recorded is not None and (anchor is None or not torch.equal(recorded, torch.tensor(anchor.benchmark))):
        raise ValueError(f"--anchor {args.env.anchor}: the benchmark refitted on the training bars differs from the "
                         "one the checkpoint recorded (another panel, or another skfolio version)")
    arrays = market.arrays
    obs_dim = arrays.num_assets * (args.features.window * arrays.features.shape[2] + 1) + 1
    agent = build_agent(args, obs_dim, arrays.num_assets + (0 if args.long_short else 1))
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
    optimizer = training.make_optimizer(agent, hp)  # Adam, AdamW with --weight-decay
    shape = (hp.num_steps, n_envs)
    obs = torch.zeros((*shape, env.obs_dim), device=device)
    actions = torch.zeros((*shape, agent.action_dim), device=device)
    logprobs, rewards, dones, values, cash_weights = (torch.zeros(shape, device=device) for _ in range(5))
    risk = PortfolioRisk(args.risk_critic, hp.num_steps, n_envs, device) if risk_aware(args.risk_critic) else None
    state = run.restore(agent, optimizer)
    next_obs, next_done = state.next_obs, state.next_done
    if risk is not None and run.bundle is not None:
        risk.load_state_dict(run.bundle["extra"]["risk"])

    anchor = getattr(env, "anchor", None)  # the fitted benchmark joins the checkpoint (restore_trained compares it)
    fitted = {} if anchor is None else {"anchor_benchmark": torch.from_numpy(anchor.benchmark.copy())}

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        return run.save(iteration, agent, optimizer, state, extra={
            **fitted, **({} if risk is None else {"risk": risk.state_dict()})})

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
                values[step] = value if risk is None else risk.value(agent, step, value, norm_obs)
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(agent.env_action(action))
            cash_weights[step] = 1.0 - info["weights"].sum(-1)  # the cash weight the env filled
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            if risk is not None:  # per-quantile rewards and drawdown costs, bootstrapped on truncation
                risk.observe(agent, step, reward, info, truncated, hp.gamma)
            if bool(truncated.any()):  # the window ended, the market did not: bootstrap
                with torch.no_grad():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, hp.gamma)
            rewards[step] = reward
            done = terminated | truncated
            next_done = done.to(torch.float32)
            run.end_episodes(state, done)

        # ---- the multiplier (one PID step on the measured drawdown), bootstrap value and GAE
        risk_record = {} if risk is None else risk.end_rollout()
        with torch.no_grad():
            next_value = agent.get_value(agent.normalise(next_obs))
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value)
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, hp.gamma, hp.gae_lambda)
            if risk is not None:  # per-quantile lambda-returns, cost advantages
                risk.targets(agent, agent.normalise(next_obs), dones, next_done, hp.gamma, hp.gae_lambda)

        # ---- flatten the batch
        b_obs, b_actions = obs.reshape((-1, env.obs_dim)), actions.reshape((-1, agent.action_dim))
        b_logprobs, b_advantages, b_returns, b_values = (x.reshape(-1) for x in (logprobs, advantages, returns,
                                                                                    values))

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = 0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values = gather_minibatch(
                    (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values), mb_inds)
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
                if risk is None:
                    v_loss = value_loss(newvalue, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
                    objective = ppo_objective(newlogprob, mb_logprobs, mb_advantages, entropy, v_loss, hp)
                else:  # quantile Huber / cost value losses; (A_r - lambda A_c) / (1 + lambda) with a constraint
                    v_loss, c_loss = risk.critic_loss(agent, newvalue, mb_obs, mb_inds, mb_returns, mb_values, hp)
                    mb_advantages, mb_hp = risk.advantages(mb_advantages, mb_inds, hp)
                    objective = ppo_objective(newlogprob, mb_logprobs, mb_advantages, entropy, v_loss, mb_hp)
                    objective.loss = objective.loss + c_loss
                clipfracs.append(objective.clip_fraction)

                optimizer.zero_grad()
                objective.loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                run.check_update(iteration, epoch, minibatch, objective.loss, grad_norm, **objective.parts())
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(objective.approx_kl, hp.target_kl):
                break

        record = run.record(state, optimizer, objective.losses(), clipfracs, b_values, b_returns, epochs_run,
                            updates_run)
        # the mean weight on cash the env filled over the rollout: how invested the policy is
        record["charts/mean_cash_weight"] = float(cash_weights.mean())
        record.update(risk_record if risk is None else {**risk_record, **risk.record(values)})
        run.log(record, state)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state)


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_portfolio`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo_portfolio")


if __name__ == "__main__":
    main()
