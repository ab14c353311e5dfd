"""Seed ensembles: one configuration's seed members, trained per fold, acting together as one more strategy.

An experiment's agent table with ``ensemble = true`` (:class:`~sentio_lab.experiment.config.AgentSpec`) adds the
strategy ``<name>_ensemble`` (:func:`ensemble_name`): on every fold it is the cells already trained for that
configuration, one per seed, wrapped in a :class:`SeedEnsemble`. At each decision every member gives its action
probabilities for the same observation (through its own observation normaliser, under the same mask); the
ensemble takes their plain mean and acts greedily on it (the most probable valid action; ties to the lowest
level). Averaging probabilities, not logits: a member sure of one action and unsure between the others weighs
as much as a member with the opposite view, and a member's near-zero probability does not veto an action the
way a geometric (logit) mean lets it.

It is evaluated by the runner's own code on the fold's test groups, through the same env, costs and masks as
every cell, and written as one more evaluation (seed :data:`ENSEMBLE_SEED`). For the deflated Sharpe ratio and
PBO it is one more trial: :attr:`~sentio_lab.experiment.config.ExperimentConfig.n_trials` counts it beside the
configurations, whose members still count as their own configuration's runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sentio_lab.agents.nets.core import check_mask

#: Name suffix of a configuration's seed ensemble in the results.
ENSEMBLE_SUFFIX = "_ensemble"
#: ``seed`` of an ensemble's rows in the results (baselines have -1): it is no single seed's run.
ENSEMBLE_SEED = -2


def ensemble_name(agent: str) -> str:
    """The results name of configuration ``agent``'s seed ensemble."""
    return f"{agent}{ENSEMBLE_SUFFIX}"


def action_probabilities(member: nn.Module, obs: torch.Tensor, num_actions: int,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, num_actions)`` probabilities of ``member``'s policy for raw observations ``obs`` ``(B, D)``.

    Read through the interface every variant's agent has -- ``normalise`` and ``get_action_and_value(obs, action,
    mask)`` -- by scoring each action once (one batched call): exactly the distribution the member samples from
    in training (under ``mask``, invalid actions have probability 0).
    """
    batch = obs.shape[0]
    norm = member.normalise(obs).repeat(num_actions, 1)  # row k * B + b: observation b, action k
    actions = torch.arange(num_actions, device=obs.device).repeat_interleave(batch)
    masks = None if mask is None else mask.repeat(num_actions, 1)
    _, log_prob, _, _ = member.get_action_and_value(norm, actions, masks)
    return log_prob.view(num_actions, batch).T.exp()


class SeedEnsemble(nn.Module):
    """Greedy on the mean of its members' action probabilities (module docstring); ``act_greedy`` as an agent's."""

    def __init__(self, members: Sequence[nn.Module], num_actions: int) -> None:
        """``members``: trained agents of one configuration (any variant's net), evaluated in ``eval`` mode."""
        super().__init__()
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.num_actions = int(num_actions)

    @torch.no_grad()
    def probabilities(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, num_actions)``: the mean over members of :func:`action_probabilities`."""
        return torch.stack([action_probabilities(m, obs, self.num_actions, mask) for m in self.members]).mean(0)

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The most probable (valid, with ``mask``) action of the averaged distribution, for raw observations."""
        probs = self.probabilities(obs, mask)
        if mask is not None:
            probs = torch.where(check_mask(mask.to(probs.device), self.num_actions), probs, -1.0)
        return probs.argmax(-1)
