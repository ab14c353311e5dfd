"""Decision speed of the deployed policy (issue 21 s3): in process and over HTTP on loopback, against a forward pass.

What is measured (a script, not a timed test; ``--quick`` is a smoke test with tiny sizes, not a measurement):

* **in process, observations ready, batched**: :meth:`Policy.act <sentio_lab.deploy.policy.Policy.act>` on
  ``--batch`` real observations at once (decisions/s), for the MLP policy (``ppo`` on ``sp500``) and the
  multi-timeframe transformer (``ppo_transformer`` on ``eurusd_1h`` with 4h x 16 and 1D x 10 tokens). The floor is
  a forward pass of the same network on the same batch (``actor(normalise(obs))``: logits, no argmax, no tie
  guard), measured interleaved with it (experiments/benchmarks/_timing.py: A B A B, median of ``--repeats``
  runs, spread printed, no ratio from noisy runs);
* **in process, one decision**: p50 / p99 latency of ``Policy.act`` on one observation (``--single-calls``
  calls), beside the one-row forward pass; and of :meth:`Policy.decide` from a bar history (features computed
  from the bars: sp500 from its first bar, the history the backtest saw);
* **HTTP on loopback**: the service (:mod:`sentio_lab.deploy.service`) in its own process (uvicorn; ``--workers``
  processes),
  a load generator in this one: ``--connections`` keep-alive connections, each sending its next request when
  the previous answer is in (closed loop), bounded by ``--http-requests`` requests and ``--http-seconds``
  seconds per run, to 127.0.0.1 only. Single-decision requests (one ready observation), batches of
  ``--http-batch`` instruments (ready observations: a list of instrument objects, one ``observations`` matrix,
  and the same matrix as base64 float32, ``observations_b64``), and single requests carrying a bar history (the features
  computed by the server). Requests/s and decisions/s over the run's wall time; p50 / p99 of each request's
  time from sending to the last byte of its answer. Every answer's status must be 200, and the answers of the
  first requests are checked against the in-process policy.

The networks are untrained (seeded): speed does not depend on what they learnt. Torch runs on ``--threads``
threads in this process and in the server. The machine is shared: the printed spreads say how much the
runs disagreed. ``python experiments/benchmarks/bench_decisions.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_REPO = Path(__file__).resolve().parents[2]
for path in (_REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import interleave, median_run, ratio, summarise  # noqa: E402

from sentio_lab import ppo  # noqa: E402
from sentio_lab import ppo_transformer as pt  # noqa: E402
from sentio_lab.agents.variants import TrainedAgent, agent_obs_dim, env_options  # noqa: E402
from sentio_lab.deploy.policy import Policy  # noqa: E402
from sentio_lab.env import TradingEnv  # noqa: E402
from sentio_lab.env.market import prepare_market  # noqa: E402

#: The only address the load generator talks to.
LOOPBACK = "127.0.0.1"
QUICK = {"batch": 64, "repeats": 3, "single_calls": 50, "decide_calls": 2, "http_requests": 60, "http_seconds": 5.0,
         "http_batch": 10, "connections": 2, "transformer_end": "2017-02-28", "models": ["mlp"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"],
                   help="in-process measurements (HTTP always serves the MLP)")
    p.add_argument("--batch", type=int, default=4096, help="observations per in-process batch")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement (median and spread reported)")
    p.add_argument("--single-calls", type=int, default=3000, help="one-observation calls per latency run")
    p.add_argument("--decide-calls", type=int, default=20, help="decide-from-bars calls per latency run")
    p.add_argument("--http", action=argparse.BooleanOptionalAction, default=True, help="run the HTTP measurements")
    p.add_argument("--http-requests", type=int, default=5000, help="most requests per HTTP run")
    p.add_argument("--http-seconds", type=float, default=15.0, help="longest HTTP run (seconds)")
    p.add_argument("--http-batch", type=int, default=100, help="instruments per batched HTTP request")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections of the load")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (here and in the server)")
    p.add_argument("--workers", type=int, default=1, help="server processes (uvicorn workers)")
    p.add_argument("--transformer-end", default="2017-04-30", help="last day of eurusd_1h for the transformer")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


# ------------------------------------------------------------------------------------------------- set-up
def make_policy(model: str, transformer_end: str = "2017-04-30") -> Policy:
    """An untrained (seed 0) policy: ``ppo`` on sp500 or ``ppo_transformer`` on eurusd_1h with its default tokens."""
    if model == "mlp":
        args = ppo.Args.from_flat(track=False, progress=False)
        market = prepare_market("sp500", ppo.feature_config(args))
        variant = ppo
    else:
        args = pt.Args.from_flat(track=False, progress=False, data_end=transformer_end, feature_cache_dir=None)
        market = pt.market_for(args)
        variant = pt
    torch.manual_seed(0)
    agent = variant.build_agent(args, agent_obs_dim(args, market), len(args.env.positions))
    agent.eval()
    bundle = {"variant": "ppo" if model == "mlp" else "ppo_transformer", "feature_state": market.features.state,
              "data_fingerprint": market.data.fingerprint}
    return Policy(TrainedAgent(agent=agent, args=args, market=market, bundle=bundle), source=f"untrained {model}")


def real_observations(policy: Policy, n: int, seed: int = 0) -> np.ndarray:
    """``n`` observations the env shows at random bars of the training range, random positions held."""
    market, args = policy.market, policy.args
    start, stop = market.range("train")
    env = TradingEnv(market.arrays, num_envs=n, window=policy.window, episode_length=1, start=start, stop=stop,
                     positions=tuple(args.env.positions), seed=seed, **env_options(args, market))
    obs = env.reset().numpy()
    held = np.random.default_rng(seed).integers(0, len(policy.levels), n)
    obs[:, env.obs_layout["position"].start] = policy.levels[held].astype(np.float32)
    return obs


def forward(agent: Any) -> Any:
    """The floor: one forward pass of the policy network to its logits (no argmax, no tie guard)."""
    encode = getattr(agent, "_encode", None)

    def run(obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = agent.normalise(obs)
            return agent.actor(x if encode is None else encode(x))

    return run


# -------------------------------------------------------------------------------------------- in process
def batched(policy: Policy, obs: np.ndarray, repeats: int) -> dict[str, Any]:
    """Decisions/s of ``Policy.act`` on the whole batch vs the forward pass, interleaved."""
    tensor = torch.from_numpy(obs)
    floor = forward(policy.agent)
    policy.act(obs)  # warm-up (first kernels, allocations)
    floor(tensor)
    runs = interleave({"policy": lambda: both_clocks(lambda: policy.act(obs)),
                       "forward": lambda: both_clocks(lambda: floor(tensor))}, repeats)
    out = {}
    for name, pairs in runs.items():
        out[name] = median_run([{"decisions_per_s": len(obs) / wall, "decisions_per_cpu_s": len(obs) / cpu}
                                for wall, cpu in pairs], "decisions_per_s")
        out[name]["decisions_per_cpu_s"] = summarise([len(obs) / cpu for _, cpu in pairs])
    out["ratio"] = ratio(out["policy"], out["forward"], "decisions_per_s")
    out["batch"] = len(obs)
    return out


def both_clocks(call: Any) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``call()``. On a shared machine the CPU time is the
    load-robust figure: what the work costs on a core of its own."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def latencies(call: Any, inputs: list[Any]) -> np.ndarray:
    """Wall seconds of each ``call(x)`` over ``inputs`` (one after the other), and the CPU seconds of the whole
    series as the last element's companion: returns ``(len(inputs) + 1,)``, the CPU total last."""
    out = np.empty(len(inputs) + 1)
    cpu = time.process_time()
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        call(x)
        out[i] = time.perf_counter() - t0
    out[-1] = time.process_time() - cpu
    return out


def single(policy: Policy, obs: np.ndarray, calls: int, repeats: int) -> dict[str, Any]:
    """p50 / p99 latency of one-observation decisions and of the one-row forward pass, interleaved runs."""
    rows = [obs[i % len(obs)][None] for i in range(calls)]
    tensors = [torch.from_numpy(r) for r in rows]
    floor = forward(policy.agent)
    latencies(policy.act, rows[:50])
    runs = interleave({"policy": lambda: latencies(policy.act, rows), "forward": lambda: latencies(floor, tensors)},
                      repeats)
    out = {}
    for name, samples in runs.items():
        p50 = [float(np.percentile(s[:-1], 50)) * 1e3 for s in samples]
        p99 = [float(np.percentile(s[:-1], 99)) * 1e3 for s in samples]
        cpu = [float(s[-1]) / (len(s) - 1) * 1e3 for s in samples]
        out[name] = {"p50_ms": summarise(p50), "p99_ms": summarise(p99), "cpu_ms_per_call": summarise(cpu)}
    return out


def decide_latency(policy: Policy, calls: int, repeats: int) -> dict[str, Any]:
    """p50 latency of ``Policy.decide`` from the model's whole history (the backtest's), newest bars varied."""
    frame = policy.market.data.frame
    stops = np.linspace(policy.min_bars, len(frame), calls).astype(int)
    inputs = [frame.iloc[:s] for s in stops]
    samples = [latencies(policy.decide, inputs) for _ in range(repeats)]
    return {"bars": len(frame), "p50_ms": summarise([float(np.median(s[:-1])) * 1e3 for s in samples]),
            "max_ms": summarise([float(np.max(s[:-1])) * 1e3 for s in samples]),
            "cpu_ms_per_call": summarise([float(s[-1]) / (len(s) - 1) * 1e3 for s in samples])}


# ------------------------------------------------------------------------------------------------- HTTP
def request_bytes(body: dict) -> bytes:
    """A keep-alive ``POST /decide`` to 127.0.0.1 with ``body`` as JSON."""
    payload = json.dumps(body).encode()
    head = (f"POST /decide HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _load(port: int, requests: list[bytes], total: int, seconds: float, connections: int) -> dict[str, Any]:
    """Closed-loop load: ``connections`` connections share ``total`` requests (cycling through ``requests``), until
    they are sent or ``seconds`` have passed."""
    deadline = time.perf_counter() + seconds
    counter = iter(range(total))
    times: list[float] = []
    statuses: dict[int, int] = {}
    answers: dict[int, bytes] = {}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    break
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, body = await _read_response(reader)
                times.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if i < len(requests):
                    answers[i] = body
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    wall = time.perf_counter() - start
    samples = np.asarray(times)
    return {"requests": len(times), "wall_s": wall, "requests_per_s": len(times) / wall, "statuses": statuses,
            "p50_ms": float(np.percentile(samples, 50)) * 1e3, "p99_ms": float(np.percentile(samples, 99)) * 1e3,
            "answers": answers}


def start_server(port: int, threads: int, quick: bool, workers: int = 1) -> subprocess.Popen:
    """This script in ``--serve`` mode (the MLP policy behind uvicorn) as a child process; waits for /health."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--threads", str(threads),
               "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(command + (["--quick"] if quick else []), env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the server exited with {child.returncode}")
        try:
            import http.client

            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return child
        except OSError:
            time.sleep(0.5)
    child.kill()
    raise RuntimeError("the server did not answer /health within 180 s")


def http_runs(policy: Policy, obs: np.ndarray, opts: argparse.Namespace) -> dict[str, Any]:
    """Single, batched and bar-history requests against a server in another process, ``--repeats`` rounds."""
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    k = opts.http_batch
    frame = policy.market.data.frame
    kinds = {
        "single": ([request_bytes({"observation": row.tolist()}) for row in obs[:256]], 1, opts.http_requests),
        "batch": ([request_bytes({"batch": [{"instrument": f"i{j}", "observation": row.tolist()}
                                            for j, row in enumerate(obs[b * k:(b + 1) * k])]})
                   for b in range(max(1, min(16, len(obs) // k)))], k, max(1, opts.http_requests // 10)),
        "matrix": ([request_bytes({"observations": obs[b * k:(b + 1) * k].tolist()})
                    for b in range(max(1, min(16, len(obs) // k)))], k, max(1, opts.http_requests // 10)),
        "matrix_b64": ([request_bytes({"observations_b64": base64.b64encode(
            obs[b * k:(b + 1) * k].astype("<f4").tobytes()).decode()})
            for b in range(max(1, min(16, len(obs) // k)))], k, max(1, opts.http_requests // 10)),
        "bars": ([request_bytes({"instrument": "spx", "bars": {
            "time": [t.isoformat() for t in frame.index[:stop]],
            **{c: frame[c].iloc[:stop].tolist() for c in ("open", "high", "low", "close", "volume")}}})
            for stop in (len(frame), len(frame) - 1)], 1, max(1, opts.http_requests // 100)),
    }
    server = start_server(port, opts.threads, opts.quick, opts.workers)
    try:
        runs: dict[str, list[dict]] = {name: [] for name in kinds}
        for _ in range(opts.repeats):
            for name, (requests, per_request, total) in kinds.items():
                server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
                run = asyncio.run(_load(port, requests, total, opts.http_seconds, opts.connections))
                run["server_cpu_s"] = cpu_seconds(server.pid) - server_cpu
                run["client_cpu_s"] = time.process_time() - client_cpu
                run["requests_per_server_cpu_s"] = run["requests"] / max(run["server_cpu_s"], 1e-9)
                run["decisions_per_s"] = run["requests_per_s"] * per_request
                run["checked"] = check_answers(policy, obs, name, run.pop("answers"), k, frame)
                runs[name].append(run)
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = {}
    for name, samples in runs.items():
        out[name] = {**median_run(samples, "requests_per_s"),
                     "p50_ms": summarise([r["p50_ms"] for r in samples]),
                     "p99_ms": summarise([r["p99_ms"] for r in samples]),
                     "decisions_per_s": summarise([r["decisions_per_s"] for r in samples]),
                     "requests_per_server_cpu_s": summarise([r["requests_per_server_cpu_s"] for r in samples])}
    out["connections"], out["port"] = opts.connections, port
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process ``pid`` and its live children (``--workers``) have used: the server's
    cost per request, whatever the load."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def check_answers(policy: Policy, obs: np.ndarray, kind: str, answers: dict[int, bytes], k: int, frame: Any) -> int:
    """How many answers were checked against the in-process policy (raises on a wrong one)."""
    for i, body in answers.items():
        got = json.loads(body)
        if kind == "single":
            expected = [int(policy.act(obs[i][None])[0])]
            actions = [got["action"]]
        elif kind in ("batch", "matrix", "matrix_b64"):
            expected = policy.act(obs[i * k:(i + 1) * k]).tolist()
            actions = [d["action"] for d in got["decisions"]]
        else:
            expected = [policy.decide(frame.iloc[: len(frame) - i]).action]
            actions = [got["action"]]
        if actions != expected:
            raise AssertionError(f"HTTP {kind} answer {i}: {actions} != in-process {expected}")
    return len(answers)


def uvicorn_stack() -> str:
    """What uvicorn's ``auto`` settings pick here: httptools + uvloop when installed, else h11 + asyncio."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http} + {loop}"


def serve(port: int, threads: int, quick: bool, workers: int = 1) -> None:
    """``--serve``: the MLP policy behind uvicorn on 127.0.0.1:port (the HTTP measurements' server); with
    ``workers`` > 1, that many processes (uvicorn's supervisor), each building the same seeded policy."""
    import uvicorn

    torch.set_num_threads(threads)
    if workers > 1:
        os.environ[_THREADS_ENV] = str(threads)
        uvicorn.run(f"{Path(__file__).stem}:server_app", factory=True, workers=workers, host=LOOPBACK, port=port,
                    log_level="warning", access_log=False)
        return
    uvicorn.run(server_app(), host=LOOPBACK, port=port, log_level="warning", access_log=False)


_THREADS_ENV = "SENTIO_BENCH_THREADS"


def server_app() -> Any:
    """The served app: the untrained MLP policy of :func:`make_policy` (the same in every worker: seed 0)."""
    from sentio_lab.deploy.service import create_app

    if _THREADS_ENV in os.environ:
        torch.set_num_threads(int(os.environ[_THREADS_ENV]))
    return create_app(make_policy("mlp"))


# ------------------------------------------------------------------------------------------------- report
def _fmt(stats: dict) -> str:
    return f"{stats['median']:.3f} (spread {stats['spread']:.0%})"


def report(results: dict[str, Any]) -> None:
    """Print the figures."""
    print(f"machine: {results['machine']}")
    for model, r in results["in_process"].items():
        b = r["batched"]
        print(f"[{model}] batched act, {b['batch']} ready observations: {b['policy']['decisions_per_s']:,.0f} "
              f"decisions/s (spread {b['policy']['spread']:.0%}); forward pass "
              f"{b['forward']['decisions_per_s']:,.0f}/s (spread {b['forward']['spread']:.0%}); "
              f"policy/forward {b['ratio']['text']}; per CPU-second: policy "
              f"{b['policy']['decisions_per_cpu_s']['median']:,.0f}, "
              f"forward {b['forward']['decisions_per_cpu_s']['median']:,.0f}")
        s = r["single"]
        print(f"[{model}] one decision: p50 {_fmt(s['policy']['p50_ms'])} ms, p99 {_fmt(s['policy']['p99_ms'])} ms, "
              f"CPU {_fmt(s['policy']['cpu_ms_per_call'])} ms/call; forward p50 {_fmt(s['forward']['p50_ms'])} ms, "
              f"p99 {_fmt(s['forward']['p99_ms'])} ms, CPU {_fmt(s['forward']['cpu_ms_per_call'])} ms/call")
        d = r["decide"]
        print(f"[{model}] decide from {d['bars']} bars (features computed): p50 {_fmt(d['p50_ms'])} ms, "
              f"CPU {_fmt(d['cpu_ms_per_call'])} ms/call")
    for name, r in results.get("http", {}).items():
        if isinstance(r, dict):
            print(f"[http {name}] {r['requests_per_s']:,.0f} requests/s (spread {r['spread']:.0%}), "
                  f"{r['decisions_per_s']['median']:,.0f} decisions/s; p50 {_fmt(r['p50_ms'])} ms, "
                  f"p99 {_fmt(r['p99_ms'])} ms; statuses {r['statuses']}; requests per server CPU-second "
                  f"{r['requests_per_server_cpu_s']['median']:,.0f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the measurements (module doc), print them, write ``--json``; returns the results."""
    opts = parse_args(argv)
    if opts.serve is not None:
        serve(opts.serve, opts.threads, opts.quick, opts.workers)
        return {}
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": opts.threads,
                                               "platform": platform.platform(), "torch": torch.__version__,
                                               "load_1min": os.getloadavg()[0], "uvicorn": uvicorn_stack()},
                                   "in_process": {}}
        mlp = None
        for model in opts.models:
            policy = make_policy(model, opts.transformer_end)
            obs = real_observations(policy, opts.batch)
            results["in_process"][model] = {
                "batched": batched(policy, obs, opts.repeats),
                "single": single(policy, obs, opts.single_calls, opts.repeats),
                "decide": decide_latency(policy, opts.decide_calls, opts.repeats),
                "obs_dim": policy.obs_dim,
            }
            if model == "mlp":
                mlp = (policy, obs)
        if opts.http:
            policy, obs = mlp if mlp is not None else (make_policy("mlp"), None)
            obs = obs if obs is not None else real_observations(policy, opts.batch)
            results["http"] = http_runs(policy, obs, opts)
        report(results)
        if opts.json is not None:
            opts.json.write_text(json.dumps(results, indent=2, default=str))
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
