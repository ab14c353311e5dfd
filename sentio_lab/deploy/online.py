"""Gated online learning: every K new bars, fine-tune the champion on a rolling recent window and let the
challenger replace it only when an A/B gate on bars neither model trained on says it is better.

``python -m sentio_lab.deploy.online --model NAME --feed bars.csv --start-bar N [--ledger L --account A]``.

One refresh at bar ``t`` (``t`` bars seen; all positions below are rows of the feed):

* **Fine-tune** (:func:`fine_tune`): the champion's checkpoint (from the registry) is *rebased* onto the window
  ``[t - E - W, t - E)`` -- its arguments point at a CSV of those bars, its data fingerprint becomes theirs, its
  env state is a fresh env's on them -- and continued through the variant's own resume path (``train`` with
  ``--resume`` and a larger ``--total-timesteps``): the weights, observation normaliser, optimizer and RNG go on
  from where the champion stopped. **The feature state is not refitted**: the champion's fitted normaliser (and
  regime model) is kept, so challenger and champion see identical observations and the feature-state hash of
  the lineage never changes (the simple, honest default: refitting on a short window would move every input).
* **Evaluate** (:func:`evaluation_returns`): both models run greedily, net of the model's costs, over the last
  ``E`` bars ``[t - E, t)``, which neither trained on (checked against each model's ``trained_until``); their
  features are computed from the window's first bar, as the challenger's were in training.
* **Gate** (:func:`~sentio_lab.deploy.online_gate.judge`): the paired stationary-bootstrap Sharpe A/B test
  (:func:`sentio_lab.evaluation.inference.sharpe_difference_test`) must find the challenger better (difference
  > 0, two-sided p < ``ab_alpha``); the deflated Sharpe ratio of the challenger's per-bar excess returns over the
  champion, deflated over **every trial so far** (``n_trials`` grows with each refresh and rollback check), must
  exceed ``min_dsr``; and the SPA test against the champion must not find the champion better (reverse p >=
  ``spa_alpha``). Under the null (no real difference) the A/B condition alone passes with probability about
  ``ab_alpha / 2`` (one side of a two-sided test); the gate's stated false-positive rate per refresh is at most
  ``ab_alpha`` (measured by :func:`~sentio_lab.deploy.online_gate.null_pass_rate`).
* **Register** the challenger with its lineage (tags ``online.parent_version``, ``online.trained_until``,
  ``online.trial``, the A/B numbers, the trigger) and the alias ``challenger``; promote it to ``champion`` through
  :func:`sentio_lab.deploy.registry.promote` (whose :class:`~sentio_lab.deploy.verdict.Gate` re-checks DSR and SPA)
  only when the gate passed.
* **Rollback** (:meth:`OnlineLearner.check_rollback`): a champion promoted here is judged against its predecessor
  by the same gate on the last ``E`` bars after its promotion; when the predecessor passes, it becomes champion
  again and the demoted version is retired.

A refresh is due every ``every_bars`` bars, or earlier when a drift alert (a row of the paper ledger's ``alerts``
table, :mod:`sentio_lab.deploy.drift_monitor`) arrived after the last refresh and ``alert_cooldown_bars`` have
passed. Progress (last refresh, the trial Sharpe ratios) lives in ``<work-dir>/online_state.json``: a rerun on a
longer feed goes on from there. Supported: the single-asset variants (``ppo``, ``ppo_masked``, ``ppo_risk``,
``ppo_transformer`` without token timeframes: their normaliser is fitted on the training rows of the market they
run on); ``vol_target``-anchored models are refused for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sentio_lab.agents.checkpoint import load_checkpoint, save_checkpoint
from sentio_lab.agents.training import cost_model_from
from sentio_lab.agents.variants import action_masking, env_options, load_trained, load_variant
from sentio_lab.data import load_market
from sentio_lab.deploy import registry
from sentio_lab.deploy.export import load_bundle
from sentio_lab.deploy.ledger import Ledger
from sentio_lab.deploy.online_gate import GateDecision, OnlineConfig, judge, null_pass_rate
from sentio_lab.deploy.verdict import Gate, Verdict
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import periods_per_year, simple_returns

#: Prefix of the version tags this module writes.
TAG = "online."
#: Variants whose fine-tuning is tested.
SUPPORTED: tuple[str, ...] = ("ppo", "ppo_masked", "ppo_risk", "ppo_transformer")
#: Bars at the end of a window file that only close the chronological split (its "test" range, never used).
SPLIT_TAIL = 2
STATE_FILE = "online_state.json"
__all__ = ["GateDecision", "OnlineConfig", "OnlineEvent", "OnlineLearner", "evaluation_returns", "fine_tune", "judge",
           "ledger_alert_times", "main", "null_pass_rate", "rebase", "trained_until"]


# ------------------------------------------------------------------------------------------ fine-tune, evaluate
def rebase(checkpoint: str | Path, window: pd.DataFrame, folder: str | Path) -> Path:
    """A copy of ``checkpoint`` that continues on the bars of ``window`` (module doc); returns its path.

    Written to ``folder/checkpoint.pt`` with the bars in ``folder/window.csv``. The arguments point at that file
    (training on all of it but the last :data:`SPLIT_TAIL` bars, no validation, no selection, no feature cache);
    the data fingerprint is the file's; the env state is a freshly reset env's on it. Weights, optimizer, feature
    state (not refitted), RNG and step counters are the champion's.
    """
    bundle = load_checkpoint(checkpoint)
    if bundle["variant"] not in SUPPORTED:
        raise ValueError(f"{checkpoint}: online fine-tuning supports {list(SUPPORTED)}, not {bundle['variant']!r}")
    if bundle["args"].get("token_timeframes"):
        raise ValueError(f"{checkpoint}: token timeframes are refused: the token normaliser is fitted on the training "
                         "rows of the market it runs on, which in a fine-tuning window are not the champion's")
    if (bundle["args"].get("env") or {}).get("anchor") == "vol_target":
        raise ValueError(f"{checkpoint}: the vol_target anchor scales by the volatility of the training segments, "
                         "which in a fine-tuning window's evaluation would reach into the bars it is judged on")
    variant = load_variant(bundle["variant"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = (folder / "window.csv").resolve()
    window.to_csv(data_file)
    n = len(window)
    args = variant.Args.from_dict(bundle["args"]).replace(
        dataset=str(data_file), data_start=None, data_end=None, train_fraction=(n - SPLIT_TAIL) / n,
        validation_fraction=0.0, select_on="none", feature_cache_dir=None)
    market = variant.market_for(args, bundle["feature_state"])
    env = variant.make_env(args, market)
    env.reset()
    n_envs = args.ppo.num_envs
    bundle.update(args=dataclasses.asdict(args), env_state=env.state_dict(), data_fingerprint=market.data.fingerprint,
                  data_name=market.data.name)
    bundle["extra"] = {**bundle["extra"], "next_done": torch.zeros(n_envs),
                       "episode_return": torch.zeros(n_envs, dtype=torch.float64), "recent_returns": []}
    if "episode_cost" in bundle["extra"]:  # ppo_risk: the episodes restart, so does their drawdown cost; its
        bundle["extra"]["episode_cost"] = torch.zeros(n_envs, dtype=torch.float64)  # multiplier and KL state go on
    bundle.pop("selection", None)
    return save_checkpoint(folder / "checkpoint.pt", bundle)


def fine_tune(checkpoint: str | Path, window: pd.DataFrame, folder: str | Path, steps: int) -> Path:
    """Fine-tune ``checkpoint`` on ``window`` for ``steps`` more env steps through the variant's resume path
    (:func:`rebase`, then ``train(--resume, --total-timesteps old + steps)``); returns the new checkpoint."""
    rebased = rebase(checkpoint, window, folder)
    bundle = load_checkpoint(rebased)
    variant = load_variant(bundle["variant"])
    saved = variant.Args.from_dict(bundle["args"])
    batch = saved.ppo.batch_size
    total = saved.ppo.total_timesteps + max(1, math.ceil(steps / batch)) * batch
    if total == variant.Args().ppo.total_timesteps:  # the default cannot be told from an omitted value on resume
        total += batch
    args = variant.Args.from_flat(resume=str(rebased), total_timesteps=total, progress=False, track=False,
                                  checkpoint_every=0, checkpoint_path=str(rebased), run_dir=str(Path(folder)))
    result = variant.train(args)
    if not result.finished or result.checkpoint_path is None:
        raise RuntimeError(f"fine-tuning {checkpoint} stopped early at step {result.global_step}")
    return Path(result.checkpoint_path)


def evaluation_returns(checkpoint: str | Path, history: pd.DataFrame, first: int, folder: str | Path) -> pd.Series:
    """Per-bar simple returns (net of the model's costs) of the greedy model deciding from row ``first`` of
    ``history`` to its end; features are computed from ``history``'s first row with the model's fitted state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "history.csv"
    history.to_csv(data_file)
    trained = load_trained(checkpoint, dataset=data_file)
    args, market = trained.args, trained.market
    evaluation = evaluate_policy(trained.agent, market, window=args.features.window,
                                 positions=tuple(args.env.positions), costs=cost_model_from(args),
                                 range_name="online", bars=(first, len(market.data.frame)), **action_masking(args),
                                 env_options=env_options(args, market))
    if evaluation.start != first:
        raise ValueError(f"the evaluation bars start at row {first} but the first complete observation is at row "
                         f"{evaluation.start}: give a longer --window so the features are warm by then")
    return simple_returns(evaluation.equity)


def trained_until(checkpoint: str | Path, tags: dict[str, str]) -> pd.Timestamp:
    """The last bar a model trained on: its ``online.trained_until`` tag, else its own run's training range."""
    if TAG + "trained_until" in tags:
        return pd.Timestamp(tags[TAG + "trained_until"])
    return pd.Timestamp(load_trained(checkpoint).market.splits["train"].last_timestamp)


# ------------------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class OnlineEvent:
    """What one refresh or rollback check did."""

    bar: int
    """Bars seen when it ran."""
    kind: str
    """``promoted``, ``challenger`` (registered, not promoted), ``rolled_back`` or ``kept`` (rollback refused)."""
    version: str
    """The version judged (the challenger, or the predecessor of a rollback check)."""
    against: str
    """The champion version it was judged against."""
    decision: GateDecision
    trigger: str = "schedule"


@dataclass
class OnlineLearner:
    """The refresh loop of one registered model (module doc). ``work_dir`` keeps checkpoints and state."""

    name: str
    work_dir: Path
    config: OnlineConfig = field(default_factory=OnlineConfig)
    registry_uri: str | None = None

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / STATE_FILE
        self.state: dict[str, Any] = (json.loads(path.read_text()) if path.exists()
                                      else {"last_refresh": None, "trials": [], "events": []})

    def _save(self) -> None:
        path = self.work_dir / STATE_FILE
        with open(path.with_suffix(".tmp"), "w") as out:  # durable before it replaces the old state
            out.write(json.dumps(self.state, indent=1))
            out.flush()
            os.fsync(out.fileno())
        path.with_suffix(".tmp").replace(path)

    def _checkpoint(self, version: Any) -> Path:
        uri = f"models:/{self.name}/{version.version}"
        return load_bundle(registry.resolve(uri, registry_uri=self.registry_uri)).checkpoint

    def _judge(self, bars: pd.DataFrame, candidate: Path, incumbent: Path, folder: Path) -> GateDecision:
        """Both models over the last ``eval_bars`` of ``bars`` (features from the window before them)."""
        cfg = self.config
        t = len(bars)
        history = bars.iloc[t - cfg.eval_bars - cfg.window_bars:t]
        mine = evaluation_returns(candidate, history, cfg.window_bars, folder)
        theirs = evaluation_returns(incumbent, history, cfg.window_bars, folder)
        decision = judge(mine, theirs, self.state["trials"], cfg)
        self.state["trials"].append(decision.excess_sharpe if np.isfinite(decision.excess_sharpe) else None)
        return decision

    def _record(self, event: OnlineEvent) -> OnlineEvent:
        self.state["events"].append({"bar": event.bar, "kind": event.kind, "version": event.version,
                                     "against": event.against, "trigger": event.trigger,
                                     "failures": list(event.decision.failures)})
        self._save()
        return event

    def _gate(self) -> Gate:
        return Gate(spa_alpha=self.config.spa_alpha, min_dsr=self.config.min_dsr)

    def refresh(self, bars: pd.DataFrame, trigger: str = "schedule") -> OnlineEvent:
        """Fine-tune the champion on the window before the last ``eval_bars`` of ``bars`` (all bars seen so far,
        oldest first), judge and register the challenger, promote it if the gate passes."""
        cfg = self.config
        t = len(bars)
        if t < cfg.window_bars + cfg.eval_bars:
            raise ValueError(f"{t} bars seen; a refresh needs --window {cfg.window_bars} + --eval-bars "
                             f"{cfg.eval_bars}")
        champion = registry.model_version(self.name, "champion", registry_uri=self.registry_uri)
        parent = self._checkpoint(champion)
        eval_first = bars.index[t - cfg.eval_bars]
        if trained_until(parent, champion.tags) >= eval_first:
            raise ValueError(f"champion version {champion.version} trained on bars up to "
                             f"{trained_until(parent, champion.tags)}, after the evaluation bars start ({eval_first}); "
                             "start the online loop later (--start-bar)")
        folder = self.work_dir / f"refresh-{t:06d}"
        window = bars.iloc[t - cfg.eval_bars - cfg.window_bars:t - cfg.eval_bars]
        pending = self.state.get("pending")
        if pending is not None and pending["bar"] == t:  # a run killed during this refresh: finish it, once
            recovered = [v for v in registry.list_versions(self.name, registry_uri=self.registry_uri)
                         if dict(v.tags or {}).get(TAG + "eval_end") == str(bars.index[t - 1])]
            if recovered:  # registered before the kill: its trial is counted; do not register it twice
                version = recovered[-1]
                self.state.pop("pending")
                self.state["last_refresh"] = t
                self.state["events"].append({"bar": t, "kind": "recovered", "version": str(version.version),
                                             "against": pending["against"], "trigger": trigger, "failures": []})
                self._save()
                raise RuntimeError(f"refresh at bar {t} was interrupted after registering version "
                                   f"{version.version}; its trial is counted and nothing is registered twice: check "
                                   f"its alias (`python -m sentio_lab.deploy.registry show {self.name} "
                                   f"{version.version}`) and run again")
            self.state["trials"] = self.state["trials"][:pending["trials_before"]]  # judged again below
        challenger = fine_tune(parent, window, folder / "train", cfg.finetune_steps)
        trials_before = len(self.state["trials"])
        decision = self._judge(bars, challenger, parent, folder / "eval")
        # Saved before the registry is touched: a kill from here on keeps the trial (the DSR of later challengers
        # counts it) and the rerun finds the version it registered instead of registering it twice.
        self.state["pending"] = {"bar": t, "trials_before": trials_before, "against": str(champion.version)}
        self._save()
        returns_index = bars.index[t - cfg.eval_bars:t]
        verdict = Verdict(median_sharpe=float(decision.ab.sharpe_a * math.sqrt(periods_per_year(bars.index)))
                          if decision.ab is not None else math.nan, dsr=decision.dsr, pbo=math.nan,
                          spa_p_value=decision.spa_p_value, spa_reverse_p_value=decision.spa_reverse_p_value,
                          benchmark=f"champion v{champion.version}",
                          source=f"online A/B against {self.name} v{champion.version} on bars "
                                 f"{returns_index[0]}..{returns_index[-1]} ({decision.n_trials} trials)")
        report = folder / "gate.json"
        report.write_text(json.dumps(decision.to_dict(), indent=1, default=str))
        tags = {TAG + "parent_version": str(champion.version), TAG + "trained_until": str(window.index[-1]),
                TAG + "eval_start": str(returns_index[0]), TAG + "eval_end": str(returns_index[-1]),
                TAG + "trial": str(decision.n_trials), TAG + "trigger": trigger,
                TAG + "excess_sharpe": str(decision.excess_sharpe), TAG + "feature_state": "kept",
                TAG + "ab_p_value": "" if decision.ab is None else str(decision.ab.p_value),
                TAG + "ab_difference": "" if decision.ab is None else str(decision.ab.difference)}
        version = registry.register(challenger, self.name, verdict=verdict, report=report, alias="challenger",
                                    registry_uri=self.registry_uri, tags=tags)
        kind = "challenger"
        if decision.passed:
            registry.promote(self.name, version.version, gate=self._gate(), registry_uri=self.registry_uri)
            kind = "promoted"
        self.state["last_refresh"] = t
        self.state.pop("pending", None)
        return self._record(OnlineEvent(t, kind, str(version.version), str(champion.version), decision, trigger))

    def check_rollback(self, bars: pd.DataFrame) -> OnlineEvent | None:
        """Judge a champion promoted here against its predecessor on the last ``eval_bars`` bars after its
        promotion (None while there are fewer, or when it has no online predecessor); roll back when the
        predecessor passes the gate."""
        cfg = self.config
        champion = registry.model_version(self.name, "champion", registry_uri=self.registry_uri)
        parent_version = champion.tags.get(TAG + "parent_version")
        if parent_version is None:
            return None
        since = int((bars.index > pd.Timestamp(champion.tags[TAG + "eval_end"])).sum())
        if since < cfg.eval_bars:
            return None
        predecessor = registry.model_version(self.name, parent_version, registry_uri=self.registry_uri)
        if predecessor.tags.get("status") == "retired":
            return None
        t = len(bars)
        decision = self._judge(bars, self._checkpoint(predecessor), self._checkpoint(champion),
                               self.work_dir / f"rollback-{t:06d}")
        kind = "kept"
        if decision.passed:
            registry.promote(self.name, predecessor.version, gate=self._gate(), registry_uri=self.registry_uri)
            registry.retire(self.name, champion.version, registry_uri=self.registry_uri)
            kind = "rolled_back"
        return self._record(OnlineEvent(t, kind, str(predecessor.version), str(champion.version), decision,
                                        "rollback"))

    def step(self, bars: pd.DataFrame, trigger: str = "schedule") -> list[OnlineEvent]:
        """A due refresh: the rollback check first (when on), then a refresh from the champion it leaves."""
        events = []
        if self.config.rollback:
            found = self.check_rollback(bars)
            if found is not None:
                events.append(found)
        events.append(self.refresh(bars, trigger))
        return events

    def run(self, feed: pd.DataFrame, start_bar: int, alert_times: Iterable[pd.Timestamp] = ()) -> list[OnlineEvent]:
        """Replay ``feed``: bars are seen one at a time from ``start_bar`` on (or from the last refresh of a
        previous run); a refresh is due every ``every_bars`` bars or after a drift alert (module doc)."""
        cfg = self.config
        alerts = sorted(_feed_time(a, feed.index) for a in alert_times)
        last = self.state["last_refresh"] if self.state["last_refresh"] is not None else start_bar
        events: list[OnlineEvent] = []
        for t in range(last + 1, len(feed) + 1):
            alerted = any(feed.index[last - 1] < a <= feed.index[t - 1] for a in alerts) if last >= 1 else False
            if t - last >= cfg.every_bars:
                trigger = "schedule"
            elif alerted and t - last >= cfg.alert_cooldown_bars:
                trigger = "drift"
            else:
                continue
            events += self.step(feed.iloc[:t], trigger)
            last = t
        return events


def _feed_time(moment: Any, index: pd.Index) -> pd.Timestamp:
    """``moment`` as a timestamp comparable with the feed's index (a ledger writes times with their offset)."""
    stamp = pd.Timestamp(moment)
    tz = getattr(index, "tz", None)
    if tz is None and stamp.tz is not None:
        return stamp.tz_convert(None)
    if tz is not None and stamp.tz is None:
        return stamp.tz_localize(tz)
    return stamp


def ledger_alert_times(ledger: str | Path, account: str) -> list[pd.Timestamp]:
    """The times of the drift alerts recorded for ``account`` in a paper ledger (:mod:`sentio_lab.deploy.ledger`)."""
    path = Path(ledger)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ledger")
    return [pd.Timestamp(t) for t in Ledger(path).table("alerts", account)["time"]]


# ------------------------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sentio_lab.deploy.online",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model", required=True, help="registered model name (its champion is refreshed)")
    parser.add_argument("--feed", required=True, help="OHLCV CSV / Parquet file of the bars seen so far")
    parser.add_argument("--start-bar", type=int, required=True,
                        help="bars of the feed already seen when the loop starts (the first refresh comes after)")
    parser.add_argument("--work-dir", default=None, help="checkpoints and state (default runs/online/<model>)")
    parser.add_argument("--registry-uri", default=None)
    parser.add_argument("--ledger", default=None, help="paper ledger whose drift alerts trigger refreshes")
    parser.add_argument("--account", default=None, help="the ledger's account (with --ledger)")
    defaults = OnlineConfig()
    for item in dataclasses.fields(OnlineConfig):
        flag = "--" + item.name.replace("_", "-")
        if item.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, item.name))
        else:
            kind = int if isinstance(getattr(defaults, item.name), int) else float
            parser.add_argument(flag, type=kind, default=getattr(defaults, item.name))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m sentio_lab.deploy.online``; errors are one line on stderr and exit 2."""
    args = _parser().parse_args(argv)
    try:
        config = OnlineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(OnlineConfig)})
        feed = load_market(args.feed).frame
        alerts: list[pd.Timestamp] = []
        if args.ledger is not None:
            if args.account is None:
                raise ValueError("--ledger needs --account")
            alerts = ledger_alert_times(args.ledger, args.account)
        learner = OnlineLearner(args.model, Path(args.work_dir or Path("runs") / "online" / args.model), config,
                                args.registry_uri)
        for event in learner.run(feed, args.start_bar, alerts):
            print(f"bar {event.bar} ({event.trigger}): {event.kind} version {event.version} against champion "
                  f"v{event.against}" + ("" if event.decision.passed else f": {'; '.join(event.decision.failures)}"))
    except (ValueError, LookupError, OSError, registry.PromotionRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
