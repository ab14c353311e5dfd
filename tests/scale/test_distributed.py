"""Data-parallel PPO on CPU with gloo and 2 processes: identical ranks, the single-process maths, any-world resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from sentio_lab import ppo
from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.scale import distributed

TINY = dict(num_envs=16, num_steps=32, hidden_size=8, window=16, episode_length=64, num_minibatches=2,
            update_epochs=2, track=False, progress=False, checkpoint_every=0)
SEEDS = (1, 2, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def _worker(rank: int, world: int, port: int, out: str, task: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    assert ctx.world_size == world and ctx.rank == rank and distributed.init_from_env("cpu") == ctx
    out_dir = Path(out)
    try:
        if task == "grad":
            torch.manual_seed(0)
            agent = ppo.build_agent(ppo.Args.from_flat(hidden_size=8), 5, 3)
            data = torch.load(out_dir / "batch.pt")
            half = slice(rank * 8, rank * 8 + 8)
            _, logp, ent, value = agent.get_action_and_value(data["obs"][half], data["actions"][half])
            loss = (logp * data["adv"][half]).mean() + value.square().mean() - 0.01 * ent.mean()
            loss.backward()
            distributed.average_gradients(agent, ctx)
            torch.save([p.grad for p in agent.parameters()], out_dir / f"grad{rank}.pt")
            assert distributed.any_rank(rank == 1, ctx) and not distributed.any_rank(False, ctx)
            assert float(distributed.mean_over_ranks(torch.tensor(float(rank)), ctx)) == 0.5
            return
        market = ppo.market_for(ppo.Args.from_flat(window=16))
        steps: list[torch.Tensor] = []
        original = torch.optim.Adam.step

        def recording_step(self, *a, **k):  # the weights after every optimizer update
            result = original(self, *a, **k)
            steps.append(torch.cat([p.detach().reshape(-1).clone() for g in self.param_groups for p in g["params"]]))
            return result

        torch.optim.Adam.step = recording_step
        if task == "train":
            finals = {}
            for seed in SEEDS:
                steps.clear()
                args = ppo.Args.from_flat(**TINY, seed=seed, total_timesteps=4096, run_dir=str(out_dir / "runs"),
                                run_name=f"s{seed}")
                result = ppo.train(args, market=market)
                finals[seed] = {"entropy": result.history[-1]["losses/entropy"],
                                "moved": float((steps[-1] - steps[0]).norm()),
                                "value_loss": result.history[-1]["losses/value_loss"],
                                "path": None if result.checkpoint_path is None else str(result.checkpoint_path)}
                torch.save({"steps": torch.stack(steps), "obs_norm": {k: v.clone() for k, v in
                                                                       result.agent.obs_norm.state_dict().items()}},
                           out_dir / f"rank{rank}_seed{seed}.pt")
            torch.save(finals, out_dir / f"finals{rank}.pt")
        elif task == "resume":
            args = ppo.Args.from_flat(**TINY, seed=5, total_timesteps=2048, resume=str(out_dir / "single.pt"),
                                      max_iterations=1,
                            checkpoint_path=str(out_dir / "from_single.pt"))
            result = ppo.train(args, market=market)
            path = None if result.checkpoint_path is None else str(result.checkpoint_path)
            torch.save({"finished": result.finished, "step": result.global_step, "n": len(steps), "path": path},
                       out_dir / f"resume{rank}.pt")
    finally:
        distributed.shutdown()


def _spawn(tmp_path: Path, task: str, world: int = 2) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), task), nprocs=world, join=True)


def test_helpers_in_a_world_of_one():
    ctx = distributed.context()
    assert ctx == distributed.DistContext() and not ctx.enabled and ctx.is_main
    assert distributed.init_from_env("cpu") == ctx  # no WORLD_SIZE: nothing is initialised
    assert not dist.is_initialized()
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(x, ctx) is x
    assert distributed.mean_over_ranks(x, ctx) is x and distributed.any_rank(True, ctx)
    assert distributed.local_envs(8, ctx) == 8 and distributed.rank_seed(7, 0) == 7 != distributed.rank_seed(7, 1)
    with pytest.raises(ValueError, match="evenly"):
        distributed.local_envs(7, distributed.DistContext(rank=0, world_size=2))
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:0") == "nccl"
    assert distributed.backend_for("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    agent = ppo.build_agent(ppo.Args.from_flat(hidden_size=4), 3, 2)
    before = _flat(agent)
    distributed.average_gradients(agent, ctx)
    distributed.broadcast_module(agent, ctx)
    distributed.shutdown()
    assert torch.equal(before, _flat(agent))


def test_averaged_gradients_equal_the_single_process_gradient(tmp_path):
    # the update is the single-process update: the mean over ranks of per-rank mean losses over equal halves has
    # the gradient of the mean loss over the whole minibatch (up to float rounding)
    g = torch.Generator().manual_seed(3)
    data = {"obs": torch.randn(16, 5, generator=g), "actions": torch.randint(0, 3, (16,), generator=g),
            "adv": torch.randn(16, generator=g)}
    torch.save(data, tmp_path / "batch.pt")
    _spawn(tmp_path, "grad")
    torch.manual_seed(0)
    agent = ppo.build_agent(ppo.Args.from_flat(hidden_size=8), 5, 3)
    _, logp, ent, value = agent.get_action_and_value(data["obs"], data["actions"])
    ((logp * data["adv"]).mean() + value.square().mean() - 0.01 * ent.mean()).backward()
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1)]
    for mine, g0, g1 in zip((p.grad for p in agent.parameters()), *grads, strict=True):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, mine, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_process_training_identical_ranks_and_equivalent_to_one_process(tmp_path, monkeypatch):
    _spawn(tmp_path, "train")
    market = ppo.market_for(ppo.Args.from_flat(window=16))
    steps: list[torch.Tensor] = []
    original = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        result = original(self, *a, **k)
        steps.append(torch.cat([p.detach().reshape(-1).clone() for g in self.param_groups for p in g["params"]]))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    single = {}
    for seed in SEEDS:
        steps.clear()
        ppo.train(ppo.Args.from_flat(**TINY, seed=seed, total_timesteps=4096, run_dir=str(tmp_path / "one"),
                                    run_name=f"s{seed}"), market=market)
        single[seed] = float((steps[-1] - steps[0]).norm())
    finals = [torch.load(tmp_path / f"finals{r}.pt") for r in (0, 1)]
    for seed in SEEDS:
        ranks = [torch.load(tmp_path / f"rank{r}_seed{seed}.pt") for r in (0, 1)]
        # 8 iterations x 2 epochs x 2 minibatches updates, identical weights on both ranks after every one
        assert ranks[0]["steps"].shape[0] == 8 * 2 * 2
        assert torch.equal(ranks[0]["steps"], ranks[1]["steps"])
        assert all(torch.equal(ranks[0]["obs_norm"][k], ranks[1]["obs_norm"][k]) for k in ranks[0]["obs_norm"])
        # the normaliser saw every episode of both ranks: 16 x 32 x 8 observations (plus its tiny prior count)
        assert float(ranks[0]["obs_norm"]["count"]) == pytest.approx(16 * 32 * 8, abs=1e-3)
        assert finals[0][seed]["path"] is not None and finals[1][seed]["path"] is None  # only rank 0 writes
        assert finals[0][seed]["value_loss"] != finals[1][seed]["value_loss"]  # each rank's own minibatches
        bundle = load_checkpoint(finals[0][seed]["path"])
        assert bundle["extra"]["world_size"] == 2 and bundle["global_step"] == 4096
    # Statistical equivalence with one process stepping all 16 episodes (the check): over the seeds, how far training
    # moved the weights (L2 distance between the weights after the first and the last of the 32 updates) does not
    # differ between the two setups by a Welch t-test at the 1% level, and the two means agree within 25%. (Same
    # number of episodes, steps and updates; the runs differ only by which episodes each minibatch holds.)
    multi = [finals[0][s]["moved"] for s in SEEDS]
    one = [single[s] for s in SEEDS]
    assert stats.ttest_ind(multi, one, equal_var=False).pvalue > 0.01
    assert abs(np.mean(multi) - np.mean(one)) < 0.25 * np.mean(one)
    print(f"weight displacement: 2 processes {multi}, 1 process {one}")


@pytest.mark.slow
def test_checkpoints_resume_at_any_world_size(tmp_path):
    market = ppo.market_for(ppo.Args.from_flat(window=16))
    # one process, stopped after 2 of 4 iterations, resumed by 2 processes
    first = ppo.train(ppo.Args.from_flat(**TINY, seed=5, total_timesteps=2048, max_iterations=2,
                               checkpoint_path=str(tmp_path / "single.pt")), market=market)
    assert not first.finished and first.global_step == 1024
    _spawn(tmp_path, "resume")
    done = [torch.load(tmp_path / f"resume{r}.pt") for r in (0, 1)]
    assert all(not d["finished"] and d["step"] == 1536 and d["n"] == 1 * 2 * 2 for d in done)
    assert done[1]["path"] is None
    two = load_checkpoint(tmp_path / "from_single.pt")
    assert two["extra"]["world_size"] == 2 and two["iteration"] == 3 and two["global_step"] == 1536
    # and the 2-process checkpoint resumed by one process (fresh seeded episodes, same weights and counters)
    args = ppo.Args.from_flat(**{**TINY, "seed": 5}, total_timesteps=2048, resume=str(tmp_path / "from_single.pt"),
                    checkpoint_path=str(tmp_path / "back.pt"))
    back = ppo.train(args, market=market)
    assert back.finished and back.global_step == 2048 and len(back.history) == 1
    assert back.history[0]["charts/learning_rate"] == pytest.approx(0.25 * 2.5e-4)  # iteration 4 of 4, annealed
    assert "world_size" not in load_checkpoint(tmp_path / "back.pt")["extra"]  # a single-process bundle as before
    again = ppo.train(args.replace(resume=str(tmp_path / "single.pt"),
                                          checkpoint_path=str(tmp_path / "again.pt")), market=market)
    assert again.finished and len(again.history) == 2


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "sentio_lab.ppo", "--total-timesteps", "1024", "--num-envs", "8",
               "--num-steps", "32", "--hidden-size", "8", "--window", "16", "--episode-length", "64",
               "--no-track", "--no-progress", "--checkpoint-path", str(tmp_path / "ddp.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("finished at step 1024") == 1  # rank 0 alone prints
    assert load_checkpoint(tmp_path / "ddp.pt")["extra"]["world_size"] == 2


def test_collectives_in_process_with_a_simulated_second_rank(monkeypatch):
    # the multi-rank branches, in this process: torch.distributed's collectives replaced by what a second rank
    # holding the same tensors would make of them (the real 2-process runs are the tests above)
    ctx = distributed.DistContext(rank=0, world_size=2)

    def all_gather(parts, x):
        for part in parts:
            part.copy_(x)

    def all_reduce(t, op=None):
        if op == dist.ReduceOp.MAX:
            return
        t.mul_(2)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "broadcast", lambda t, src: None)
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(distributed.all_gather_rows(x, ctx), torch.cat([x, x]))
    assert torch.equal(distributed.mean_over_ranks(x, ctx), x)
    assert distributed.any_rank(True, ctx) and not distributed.any_rank(False, ctx)
    agent = ppo.build_agent(ppo.Args.from_flat(hidden_size=4), 3, 2)
    agent.get_value(torch.randn(5, 3)).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in agent.parameters()]
    distributed.average_gradients(agent, ctx)  # the mean of two equal gradients is the gradient
    for p, g in zip(agent.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    before = _flat(agent)
    distributed.broadcast_module(agent, ctx)
    assert torch.equal(_flat(agent), before)
    assert distributed.local_envs(8, ctx) == 4


def test_init_from_env_joins_a_one_process_gloo_group_and_context_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    calls, real_init = [], dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    assert distributed.init_from_env("cpu") == distributed.DistContext()  # not initialised by the stub
    assert calls == ["gloo"]
    real_init("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert distributed.context() == distributed.DistContext(rank=0, world_size=1, local_rank=0)
        assert distributed.init_from_env("cpu") == distributed.context()  # already initialised: joined as is
    finally:
        distributed.shutdown()
    assert not dist.is_initialized()
