"""Checkpoint selection and early stopping on an inner validation range, by a declared criterion.

``--select-on validation_sharpe --eval-every K --patience P`` (:class:`~sentio_lab.agents.arguments.RunArgs`):
every ``K`` iterations (and after the last one) the run scores its greedy agent on the market's ``"validation"``
range, net of costs (:mod:`sentio_lab.run_loop` evaluates; this module keeps the books). The agent state with the
best score so far is kept; after ``P`` evaluations in a row without a strictly better score the run stops. The
criterion is declared before training, so the choice among checkpoints is one trial, not a search over criteria.

Rules (decided here):

* a score must be strictly better than the best so far to replace it: ties keep the earlier, shorter-trained
  agent; a NaN score never wins;
* the scores of every criterion of :data:`CRITERIA` are recorded at each evaluation, the declared one decides;
* the state (best weights, best score and iteration, counters, history) goes into every checkpoint under
  ``"selection"``, so a resumed run selects and stops exactly as the uninterrupted one; a run stopped by
  patience is finished: resuming it trains no further;
* consumers of a checkpoint (evaluation, the experiment runner) take the selected weights through
  :func:`selected_weights`, never the last ones by accident.

Which bars the validation range holds is the market's business: the chronological split's ``"validation"``
fraction, or on a CPCV / walk-forward fold the slice the runner carves from the end of the fold's training
segments, purged from them (:func:`sentio_lab.env.market.prepare_fold_market` with ``validation_bars``): never a
test bar.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Criteria a run can select on: per-period Sharpe ratio of the greedy validation episode's bar returns (0 when
#: the equity never moves), and its log return ``log(equity_end / equity_start)``, both net of costs.
CRITERIA: tuple[str, ...] = ("validation_sharpe", "validation_log_return")
#: ``--select-on`` value that turns selection off.
NO_SELECTION = "none"


@dataclass
class Selection:
    """The books of one run's checkpoint selection (see the module docstring for the rules)."""

    criterion: str
    """one of :data:`CRITERIA`"""
    eval_every: int
    """evaluate every this many iterations (and after the last)"""
    patience: int | None
    """stop after this many evaluations without improvement; None: never stop early"""
    best_score: float | None = None
    best_iteration: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    """the selected agent's ``state_dict`` (CPU copies)"""
    since_best: int = 0
    """evaluations since the best one"""
    stopped: bool = False
    """patience ran out: the run is over"""
    history: list[dict[str, float]] = field(default_factory=list)
    """one entry per evaluation: ``iteration`` and the score of every criterion"""

    def __post_init__(self) -> None:
        """Reject what cannot run, naming the flag."""
        if self.criterion not in CRITERIA:
            raise ValueError(f"--select-on {self.criterion!r}: choose from {[NO_SELECTION, *CRITERIA]}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every {self.eval_every}: must be at least 1")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience {self.patience}: must be at least 1 (leave it out to never stop early)")

    def due(self, iteration: int, last_iteration: int) -> bool:
        """True when ``iteration`` is scored: every ``eval_every`` iterations and the run's last one."""
        return iteration % self.eval_every == 0 or iteration == last_iteration

    def update(self, iteration: int, scores: dict[str, float], agent: nn.Module) -> bool:
        """Record the scores of ``iteration``, keep ``agent``'s state when the declared criterion improved; True
        when patience has run out (the run should stop)."""
        missing = sorted(set(CRITERIA) - set(scores))
        if missing:
            raise KeyError(f"selection scores lack {missing}")
        self.history.append({"iteration": iteration, **{name: float(scores[name]) for name in CRITERIA}})
        score = float(scores[self.criterion])
        if not math.isnan(score) and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_iteration, self.since_best = score, iteration, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in agent.state_dict().items()}
        else:
            self.since_best += 1
        self.stopped = self.patience is not None and self.since_best >= self.patience
        return self.stopped

    def summary(self) -> dict[str, Any]:
        """What a run reports about its selection: criterion, selected iteration and score, stop, history."""
        return {"criterion": self.criterion, "selected_iteration": self.best_iteration,
                "best_score": self.best_score, "stopped_early": self.stopped, "history": copy.deepcopy(self.history)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue the selection exactly (tensors and plain python)."""
        return {**self.summary(), "eval_every": self.eval_every, "patience": self.patience,
                "since_best": self.since_best, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (its criterion must be this run's)."""
        if state["criterion"] != self.criterion:
            raise ValueError(f"the checkpoint selected on {state['criterion']!r}, this run on {self.criterion!r}")
        self.best_score, self.best_iteration = state["best_score"], state["selected_iteration"]
        self.best_state, self.since_best = state["best_state"], int(state["since_best"])
        self.stopped, self.history = bool(state["stopped_early"]), copy.deepcopy(list(state["history"]))


def selection_from(run_args: Any) -> Selection | None:
    """The :class:`Selection` a variant's run arguments ask for (``args.run``), or None with ``--select-on none``."""
    if run_args.select_on == NO_SELECTION:
        return None
    return Selection(run_args.select_on, run_args.eval_every, run_args.patience)


def selected_weights(bundle: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The agent weights a checkpoint stands for: the selected state when the run selected on validation (and had
    scored at least once), else the last trained weights."""
    selection = bundle.get("selection")
    if selection is not None and selection.get("best_state") is not None:
        return selection["best_state"]
    return bundle["agent"]
