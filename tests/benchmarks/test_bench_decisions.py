"""Smoke test of the decision benchmark: structure of its output and its arithmetic, no timing assertions."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_decisions.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decisions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_process_measurements_compare_the_policy_with_its_forward_pass():
    bench = load_bench()
    policy = bench.make_policy("mlp")
    obs = bench.real_observations(policy, 32)
    assert obs.shape == (32, policy.obs_dim) and np.isfinite(obs).all()
    assert set(obs[:, policy.window * policy.market.arrays.features.shape[1]]) <= {-1.0, 0.0, 1.0}
    floor = bench.forward(policy.agent)(torch.from_numpy(obs))
    assert floor.argmax(-1).tolist() == policy.act(obs).tolist()  # the floor computes the same network
    b = bench.batched(policy, obs, repeats=3)
    assert b["batch"] == 32 and b["policy"]["n"] == 3 and len(b["policy"]["all_decisions_per_s"]) == 3
    assert b["ratio"]["ratio"] is None or abs(
        b["ratio"]["ratio"] - b["policy"]["decisions_per_s"] / b["forward"]["decisions_per_s"]) < 1e-9
    s = bench.single(policy, obs, calls=20, repeats=3)
    assert 0 < s["policy"]["p50_ms"]["median"] <= s["policy"]["p99_ms"]["max"]


def test_quick_run_serves_over_loopback_and_checks_the_answers(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    out = bench.main(["--quick", "--json", str(out_path)])
    assert torch.get_num_threads() == threads  # restored
    saved = json.loads(out_path.read_text())
    assert set(saved["in_process"]) == {"mlp"} and set(saved["http"]) >= {"single", "batch", "bars"}
    http = out["http"]
    for name, per_request in (("single", 1), ("batch", 10), ("bars", 1)):
        run = http[name]
        assert run["statuses"] == {200: run["requests"]} and run["checked"] >= 1  # every answer OK, some verified
        assert run["requests"] <= bench.QUICK["http_requests"]  # the load is bounded
        assert abs(run["decisions_per_s"]["median"] - run["requests_per_s"] * per_request) <= 1e-9 * per_request * \
            run["requests_per_s"]  # the median of 3 runs' decisions/s is the median run's requests/s x k
    printed = capsys.readouterr().out
    assert "decisions/s" in printed and "[http single]" in printed and "p99" in printed


def test_requests_go_to_loopback_only():
    bench = load_bench()
    raw = bench.request_bytes({"observation": [0.0]})
    assert raw.startswith(b"POST /decide HTTP/1.1\r\nHost: 127.0.0.1\r\n") and raw.endswith(b'{"observation": [0.0]}')
    assert bench.LOOPBACK == "127.0.0.1"
