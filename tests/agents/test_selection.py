"""Checkpoint selection and early stopping on the validation range (``--select-on``, issue 19 s3).

Planted scores (``run_loop.validation_scores`` replaced by a table) make the right choice known in advance; with
``anneal_lr`` off, the weights after k iterations of a longer run are those of a k-iteration run, which is what the
selected agent is compared with. The fold perturbation proof (the inner slice never reads test bars) is in
tests/experiment/test_selection_folds.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from sentio_lab import ppo, run_loop
from sentio_lab.agents import variants
from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.selection import CRITERIA, Selection, selected_weights

BATCH = 8 * 16


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def planted(monkeypatch, sharpe_by_iteration: dict[int, float]) -> list[int]:
    """Replace the validation scoring by planted Sharpe ratios per iteration; returns the iterations scored."""
    scored: list[int] = []

    def scores(agent, args, market):
        iteration = len(scored) + 1  # with eval_every 1 the n-th call scores iteration n of a fresh run
        scored.append(iteration)
        return {"validation_sharpe": sharpe_by_iteration[iteration], "validation_log_return": -float(iteration)}

    monkeypatch.setattr(run_loop, "validation_scores", scores)
    return scored


@pytest.fixture()
def args(tiny_args):
    return tiny_args.replace(total_timesteps=BATCH * 5, anneal_lr=False)


# ------------------------------------------------------------------------------------------ the books
def test_the_best_strict_improvement_wins_and_patience_counts_evaluations():
    agent = torch.nn.Linear(2, 1)
    books = Selection("validation_sharpe", eval_every=1, patience=3)
    stops = []
    for iteration, score in enumerate([0.1, 0.5, float("nan"), 0.5, 0.2], start=1):
        with torch.no_grad():
            agent.weight.fill_(iteration)
        stops.append(books.update(iteration, {"validation_sharpe": score, "validation_log_return": 0.0}, agent))
    # the tie at 4 keeps the earlier agent, NaN never wins; three evaluations without improvement stop the run
    assert books.best_iteration == 2 and books.best_score == 0.5 and stops == [False] * 4 + [True]
    assert torch.equal(books.best_state["weight"], torch.full((1, 2), 2.0))
    again = Selection("validation_sharpe", eval_every=1, patience=3)
    again.load_state_dict(books.state_dict())
    assert again.summary() == books.summary() and again.since_best == 3
    assert [h["iteration"] for h in books.history] == [1, 2, 3, 4, 5] and set(books.history[0]) == {"iteration",
                                                                                                   *CRITERIA}
    assert books.due(10, 12) and books.due(12, 12)
    every_four = Selection("validation_log_return", eval_every=4, patience=None)
    assert [i for i in range(1, 11) if every_four.due(i, 10)] == [4, 8, 10]
    with pytest.raises(ValueError, match="the checkpoint selected on 'validation_sharpe'"):
        every_four.load_state_dict(books.state_dict())


@pytest.mark.parametrize(("kwargs", "flag"), [({"criterion": "test_sharpe"}, "--select-on 'test_sharpe'"),
                                              ({"eval_every": 0}, "--eval-every 0"), ({"patience": 0}, "--patience 0")])
def test_bad_settings_name_their_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Selection(**{"criterion": "validation_sharpe", "eval_every": 1, "patience": None, **kwargs})


def test_missing_scores_are_an_error():
    with pytest.raises(KeyError, match="validation_log_return"):
        Selection("validation_sharpe", 1, None).update(1, {"validation_sharpe": 1.0}, torch.nn.Linear(1, 1))


# ------------------------------------------------------------------------------------------ in a run
def test_the_planted_best_iteration_is_selected_and_recorded(args, synthetic_market, monkeypatch):
    scored = planted(monkeypatch, {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.9, 5: 0.3})
    result = ppo.train(args.replace(select_on="validation_sharpe", eval_every=1), market=synthetic_market)
    assert scored == [1, 2, 3, 4, 5] and result.finished and result.global_step == BATCH * 5
    two = ppo.train(args.replace(total_timesteps=BATCH * 2, run_name="two"), market=synthetic_market)
    five = ppo.train(args.replace(run_name="five"), market=synthetic_market)
    assert same_weights(result.agent.state_dict(), two.agent.state_dict())  # the selected agent is the result
    assert not same_weights(two.agent.state_dict(), five.agent.state_dict())
    bundle = load_checkpoint(result.checkpoint_path, variant="ppo")
    assert same_weights(bundle["agent"], five.agent.state_dict())  # the checkpoint keeps the last state to resume
    assert same_weights(selected_weights(bundle), two.agent.state_dict())
    record = bundle["selection"]
    assert record["criterion"] == "validation_sharpe" and record["selected_iteration"] == 2
    assert record["best_score"] == 0.9 and [h["validation_sharpe"] for h in record["history"]] == [0.1, 0.9, 0.2, 0.9,
                                                                                                    0.3]
    assert result.selection["selected_iteration"] == 2 and not result.selection["stopped_early"]
    assert result.history[1]["selection/validation_sharpe"] == 0.9
    # evaluation rebuilds the selected agent (its market: the synthetic one, which no file reloads)
    monkeypatch.setattr(variants, "prepare_market", lambda *a, **k: synthetic_market)
    assert same_weights(variants.load_trained(result.checkpoint_path).agent.state_dict(), two.agent.state_dict())


def test_another_declared_criterion_selects_another_iteration(args, synthetic_market, monkeypatch):
    planted(monkeypatch, {i: float(i) for i in range(1, 6)})  # log return planted as -iteration: 1 is best
    result = ppo.train(args.replace(select_on="validation_log_return", eval_every=1), market=synthetic_market)
    assert result.selection["selected_iteration"] == 1 and result.selection["best_score"] == -1.0


def test_patience_stops_the_run_and_a_resume_trains_no_further(args, synthetic_market, monkeypatch):
    planted(monkeypatch, {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1})
    result = ppo.train(args.replace(select_on="validation_sharpe", eval_every=1, patience=2), market=synthetic_market)
    assert result.finished and result.global_step == BATCH * 3  # iteration 1 best, 2 and 3 without improvement
    assert result.selection["stopped_early"] and result.selection["selected_iteration"] == 1
    one = ppo.train(args.replace(total_timesteps=BATCH, run_name="one"), market=synthetic_market)
    assert same_weights(result.agent.state_dict(), one.agent.state_dict())
    resumed = ppo.train(ppo.Args.from_flat(resume=str(result.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.finished and resumed.global_step == BATCH * 3
    assert same_weights(resumed.agent.state_dict(), one.agent.state_dict())


def test_scoring_leaves_training_alone_and_a_resume_selects_as_the_uninterrupted_run(args, synthetic_market):
    plain = ppo.train(args, market=synthetic_market)
    selecting = args.replace(select_on="validation_sharpe", eval_every=2, run_name="whole")
    whole = ppo.train(selecting, market=synthetic_market)
    assert same_weights(load_checkpoint(whole.checkpoint_path)["agent"], plain.agent.state_dict())
    history = whole.selection["history"]
    assert [h["iteration"] for h in history] == [2, 4, 5]  # every 2 iterations and the last
    assert all(math.isfinite(h[name]) for h in history for name in CRITERIA)
    best = max(history, key=lambda h: h["validation_sharpe"])  # the first of equals
    assert whole.selection["selected_iteration"] == best["iteration"]
    part = ppo.train(selecting.replace(run_name="part", max_iterations=3), market=synthetic_market)
    assert not part.finished and [h["iteration"] for h in part.selection["history"]] == [2]
    resumed = ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.selection == whole.selection
    assert same_weights(resumed.agent.state_dict(), whole.agent.state_dict())


def test_selection_without_a_validation_range_is_refused(args, synthetic_market):
    with pytest.raises(ValueError, match="--select-on validation_sharpe needs a validation range"):
        ppo.train(args.replace(select_on="validation_sharpe", validation_fraction=0.0))
