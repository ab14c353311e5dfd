"""The decision service (sentio_lab.deploy.service): answers equal the policy's, malformed requests get a 422
naming the field, bad bars are refused saying why, and concurrent clients get the serial answers."""

from __future__ import annotations

import base64
import socket
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from sentio_lab import ppo
from sentio_lab.agents.variants import TrainedAgent, agent_obs_dim
from sentio_lab.deploy import service
from sentio_lab.deploy.policy import Account, Policy
from sentio_lab.deploy.service import create_app, main, model_info


@pytest.fixture(scope="module")
def policy(sp500_market):
    """An untrained (seeded) ppo agent on sp500: the service does not care whether it learnt anything."""
    args = ppo.Args.from_flat(window=8, track=False, progress=False)
    torch.manual_seed(3)
    agent = ppo.build_agent(args, agent_obs_dim(args, sp500_market), len(args.env.positions))
    with torch.no_grad():
        agent.actor[-1].weight.mul_(300.0)  # decisive logits: the actions change from bar to bar
    agent.eval()
    bundle = {"variant": "ppo", "feature_state": sp500_market.features.state,
              "data_fingerprint": sp500_market.data.fingerprint}
    return Policy(TrainedAgent(agent=agent, args=args, market=sp500_market, bundle=bundle), source="test.pt")


@pytest.fixture(scope="module")
def client(policy):
    """A TestClient of the app."""
    return TestClient(create_app(policy))


def bars_json(frame):
    """A frame as the request's columns."""
    return {"time": [t.isoformat() for t in frame.index], **{c: frame[c].tolist() for c in
                                                             ("open", "high", "low", "close", "volume")}}


def test_one_instrument_from_bars_is_the_policys_decision(policy, client):
    frame = policy.market.data.frame
    for stop, position in ((300, None), (301, 0), (640, 2)):
        body = {"instrument": "spx", "bars": bars_json(frame.iloc[:stop])}
        if position is not None:
            body["account"] = {"position": position}
        response = client.post("/decide", json=body)
        assert response.status_code == 200, response.text
        expected = policy.decide(frame.iloc[:stop], Account(position=position))
        assert response.json() == {"instrument": "spx", "action": expected.action, "weight": expected.weight,
                                   "time": frame.index[stop - 1].isoformat()}


def test_batches_of_bars_and_observations_answer_in_order(policy, client):
    frame = policy.market.data.frame
    observations = [policy.observation(frame.iloc[:t], Account(position=t % 3)) for t in range(200, 260)]
    batch = [{"instrument": f"o{k}", "observation": o.tolist()} for k, o in enumerate(observations)]
    batch.insert(7, {"instrument": "b", "bars": bars_json(frame.iloc[:333]), "account": {"position": 1}})
    batch.append({"instrument": "m", "observation": observations[0].tolist(), "mask": [True, False, False]})
    response = client.post("/decide", json={"batch": batch})
    assert response.status_code == 200, response.text
    decisions = response.json()["decisions"]
    assert [d["instrument"] for d in decisions] == [item["instrument"] for item in batch]
    expected = policy.act(np.stack(observations)).tolist()
    got = [d["action"] for d in decisions if d["instrument"].startswith("o")]
    assert got == expected and len(set(expected)) >= 2
    assert decisions[7]["action"] == policy.decide(frame.iloc[:333], Account(position=1)).action
    assert decisions[-1]["action"] == 0 and decisions[-1]["weight"] == -1.0 and decisions[-1]["time"] is None
    single = client.post("/decide", json={"observation": observations[3].tolist()}).json()
    assert single == {"instrument": "bars", "action": expected[3], "weight": policy.levels[expected[3]], "time": None}


MALFORMED = [
    ({}, ["body"], "exactly one"),
    ({"bars": {"time": ["2014-01-02"], "open": [1], "high": [1], "low": [1], "close": [1]}}, ["body", "bars", "volume"],
     "Field required"),
    ({"bars": {"time": ["2014-01-02", "x"], "open": [1, 1], "high": [1, 1], "low": [1, 1], "close": [1, 1],
               "volume": [1, 1]}}, ["body", "bars", "time", 1], "datetime"),
    ({"bars": {"time": ["2014-01-02"], "open": [1, 2], "high": [1], "low": [1], "close": [1], "volume": [1]}},
     ["body", "bars"], "one value per bar"),
    ({"bars": {"time": ["2014-01-02"], "open": [1], "high": [1], "low": [1], "close": ["a"], "volume": [1]}},
     ["body", "bars", "close", 0], "valid number"),
    ({"observation": [0.0] * 81, "account": {"position": 1}}, ["body"], "account goes with bars"),
    ({"observation": [0.0] * 81, "extra": 1}, ["body", "extra"], "Extra inputs"),
    ({"observation": [0.0] * 80}, ["body", "observation"], "the model reads 81"),
    ({"observation": [0.0] * 81, "mask": [False, False, False]}, ["body", "mask"], "at least one true"),
    ({"observation": [0.0] * 81, "mask": [True]}, ["body", "mask"], "3 booleans"),
    ({"observation": "x"}, ["body", "observation"], "valid array"),
    ({"batch": []}, ["body", "batch"], "at least 1 item"),
    ({"observations": []}, ["body", "observations"], "at least 1 item"),
    ({"observations": [[0.0] * 81, [0.0] * 3]}, ["body", "observations", 1], "the model reads 81"),
    ({"observations": [[0.0] * 80]}, ["body", "observations", 0], "the model reads 81"),
    ({"observations": [[0.0] * 81, [0.0] * 81], "masks": [[True] * 3]}, ["body"], "one entry per observation row"),
    ({"observations": [[0.0] * 81], "instruments": ["a", "b"]}, ["body"], "one entry per observation row"),
    ({"observations": [[0.0] * 81], "masks": [[False] * 3]}, ["body", "masks", 0], "at least one true"),
    ({"observations": [[0.0] * 81], "masks": [[True] * 2]}, ["body", "masks", 0], "3 booleans"),
    ({"observations": [[0.0] * 81], "mask": [True] * 3}, ["body", "mask"], "Extra inputs"),
    ({"observations": [["x"] + [0.0] * 80]}, ["body", "observations", 0, 0], "valid number"),
    ({"batch": [{"observation": [0.0] * 81}], "observation": [1.0]}, ["body", "observation"], "Extra inputs"),
    ({"batch": [{"observation": [0.0] * 81}, {"observation": [0.0] * 3}]}, ["body", "batch", 1, "observation"],
     "the model reads 81"),
    ({"batch": [{"observation": [0.0] * 81}, {"bars": 5}]}, ["body", "batch", 1, "bars"], "an object"),
    ([1, 2], ["body"], "object"),
    ({"bars": {"time": ["2014-01-02"], "open": [1], "high": [1], "low": [1], "close": [1], "volume": [1]},
      "mask": [True, True, True]}, ["body"], "mask goes with observation"),
]


@pytest.mark.parametrize(("body", "loc", "message"), MALFORMED)
def test_malformed_requests_get_a_422_naming_the_field(client, body, loc, message):
    response = client.post("/decide", json=body)
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in details), details


def test_a_matrix_of_observations_answers_in_row_order(policy, client):
    frame = policy.market.data.frame
    observations = np.stack([policy.observation(frame.iloc[:t], Account(position=t % 3)) for t in range(200, 260)])
    expected = policy.act(observations).tolist()
    assert len(set(expected)) >= 2  # a mix-up of rows would show
    response = client.post("/decide", json={"observations": observations.tolist()})
    assert response.status_code == 200, response.text
    decisions = response.json()["decisions"]
    assert [d["action"] for d in decisions] == expected
    assert [d["instrument"] for d in decisions] == [str(i) for i in range(60)]
    assert [d["weight"] for d in decisions] == [float(policy.levels[a]) for a in expected]
    masks = [[True, False, False]] * 60
    named = client.post("/decide", json={"observations": observations.tolist(), "masks": masks,
                                          "instruments": [f"x{i}" for i in range(60)]}).json()["decisions"]
    assert {d["action"] for d in named} == {0} and named[5]["instrument"] == "x5"
    # the same rows as a batch of instrument objects answer the same
    batch = client.post("/decide", json={"batch": [{"instrument": str(i), "observation": o.tolist()}
                                                    for i, o in enumerate(observations)]}).json()["decisions"]
    assert batch == decisions
    # ragged rows that are all of the wrong width, and non-finite values, are 422 too
    assert client.post("/decide", json={"observations": [[0.0] * 3, [0.0] * 4]}).status_code == 422
    response = client.post("/decide", content=_json({"observations": [[0.0] * 80 + [float("inf")]]}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.json()["detail"][0]["msg"]
    assert response.json()["detail"][0]["loc"] == ["body", "observations", 0, 80]


def test_a_base64_float32_matrix_answers_as_the_json_one(policy, client):
    frame = policy.market.data.frame
    observations = np.stack([policy.observation(frame.iloc[:t], Account(position=t % 3)) for t in range(300, 340)])
    as_json = client.post("/decide", json={"observations": observations.tolist()}).json()
    encoded = base64.b64encode(observations.astype("<f4").tobytes()).decode()
    response = client.post("/decide", json={"observations_b64": encoded})
    assert response.status_code == 200, response.text
    assert response.json() == as_json and len({d["action"] for d in as_json["decisions"]}) >= 2
    masked = client.post("/decide", json={"observations_b64": encoded, "masks": [[False, False, True]] * 40,
                                          "instruments": [f"n{i}" for i in range(40)]}).json()["decisions"]
    assert {d["action"] for d in masked} == {2} and masked[-1]["instrument"] == "n39"
    broken = observations.astype("<f4").copy()
    broken[7, 3] = np.nan
    for body, field, message in (
        ({"observations_b64": "%%%"}, "observations_b64", "not base64"),
        ({"observations_b64": "A" * (4 * -(-(service.MAX_BATCH * 81 * 4) // 3) + 4)}, "observations_b64",
         "more than 10000 rows"),
        ({"observations_b64": base64.b64encode(b"\0" * 12).decode()}, "observations_b64", "no whole number of rows"),
        ({"observations_b64": base64.b64encode(broken.tobytes()).decode()}, "observations_b64", "row 7: observation"),
        ({"observations_b64": encoded, "masks": [[True] * 3]}, "masks", "one entry per observation row"),
        ({"observations_b64": encoded, "instruments": ["a"]}, "instruments", "one entry per observation row"),
        ({"observations_b64": encoded, "observations": [[0.0] * 81]}, None, "exactly one"),
    ):
        response = client.post("/decide", json=body)
        assert response.status_code == 422, (body.keys(), response.text)
        detail = response.json()["detail"][0]
        assert message in detail["msg"] and detail["loc"] == (["body", field] if field else ["body"]), detail


def test_invalid_json_and_account_fields_are_422(policy, client):
    response = client.post("/decide", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"
    response = client.post("/decide", content=_json({"observation": [float("nan")] * 81}),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.json()["detail"][0]["msg"]
    bars = bars_json(policy.market.data.frame.iloc[:100])
    for account, field in (({"position": 3}, "account"), ({"position": -1}, "position"), ({"equity": 0}, "equity"),
                           ({"peak": float("nan")}, "peak"), ({"max_drawdown": 2}, "max_drawdown")):
        response = client.post("/decide", json={"bars": bars, "account": account}) if field == "account" else \
            client.post("/decide", content=_json({"bars": bars, "account": account}),
                        headers={"content-type": "application/json"})
        assert response.status_code == 422, (account, response.text)
        assert response.json()["detail"][0]["loc"][-1] == field


def _json(body):
    """JSON text that may hold NaN (the client's json= refuses it)."""
    import json

    return json.dumps(body).encode()


def test_bad_bars_are_refused_saying_why(policy, client):
    frame = policy.market.data.frame.iloc[:200]
    need = policy.min_bars
    cases = {
        "not in increasing order": bars_json(frame.iloc[::-1]),
        "duplicate timestamp": bars_json(frame.iloc[[*range(100), 99, *range(100, 200)]]),
        f"too few bars for the feature lookback: {need - 1} given, at least {need}": bars_json(frame.iloc[: need - 1]),
        "high below max(open, close)": {**bars_json(frame), "high": [1.0] * 200},
    }
    for reason, bars in cases.items():
        response = client.post("/decide", json={"instrument": "spx", "bars": bars})
        assert response.status_code == 422, reason
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", "bars"] and reason in detail["msg"] and detail["msg"].startswith("spx: ")
    batch = [{"bars": bars_json(frame)}, {"bars": cases["duplicate timestamp"]}]
    response = client.post("/decide", json={"batch": batch})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "batch", 1, "bars"]


def test_health_and_model(policy, client):
    before = client.get("/health").json()
    assert before["status"] == "ok" and before["uptime_s"] >= 0
    client.post("/decide", json={"batch": [{"observation": [0.0] * 81}] * 4})
    assert client.get("/health").json()["decisions"] == before["decisions"] + 4
    info = client.get("/model").json()
    assert info["variant"] == "ppo" and info["levels"] == [-1.0, 0.0, 1.0] and info["obs_dim"] == 81
    assert info["min_bars"] == policy.min_bars and info["first_bar"] == policy.first_bar.isoformat()
    assert info["version"] is None and info["verdict"] is None and info["source"] == "test.pt"


def test_model_info_reads_the_registry_version_and_verdict(policy, monkeypatch):
    fake = types.ModuleType("sentio_lab.deploy.registry")
    asked = []

    def model_version(name, ref, registry_uri=None):
        asked.append((name, ref, registry_uri))
        return types.SimpleNamespace(version=7, tags={"variant": "ppo", "verdict.dsr": "0.61", "verdict.spa": "pass"})

    fake.model_version = model_version
    monkeypatch.setitem(sys.modules, "sentio_lab.deploy.registry", fake)
    monkeypatch.setattr("sentio_lab.deploy.registry", fake, raising=False)
    monkeypatch.setattr(policy, "source", "models:/spx@champion")
    info = model_info(policy)
    assert info["version"] == "7" and info["verdict"] == {"verdict.dsr": "0.61", "verdict.spa": "pass"}
    assert info["tags"]["variant"] == "ppo" and asked == [("spx", "champion", None)]
    monkeypatch.setattr(policy, "source", "models:/spx/7")
    monkeypatch.setattr(policy, "registry_uri", "sqlite:///team.db")
    assert model_info(policy)["version"] == "7" and asked[-1] == ("spx", "7", "sqlite:///team.db")


def ready(policy, t, position):
    """The observation at bar t holding ``position``, cut from the market's feature matrix (what
    :meth:`Policy.observation` gives for the bars up to t: tests/deploy/test_policy.py), without recomputing it."""
    window = policy.market.arrays.features[t - policy.window + 1 : t + 1].reshape(-1)
    return np.concatenate([window, np.float32([policy.levels[position]])])


def test_ready_observations_are_the_policys(policy):
    frame = policy.market.data.frame
    assert np.array_equal(ready(policy, 500, 2), policy.observation(frame.iloc[:501], Account(position=2)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_clients_get_the_serial_answers(policy):
    """16 client threads over a real uvicorn server on 127.0.0.1, each sending 12 of 24 requests in its own order
    (bars through the thread pool, observations inline, batches of 20): every answer equals the one the same
    request got alone, in a serial pass first."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(policy), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    frame = policy.market.data.frame
    rng = np.random.default_rng(0)
    requests = []
    for k in range(24):
        kind = k % 3
        stop = int(rng.integers(60, 700))
        if kind == 0:
            requests.append({"instrument": f"i{k}", "bars": bars_json(frame.iloc[:stop]),
                             "account": {"position": int(rng.integers(0, 3))}})
        elif kind == 1:
            requests.append({"observation": ready(policy, stop - 1, 1).tolist()})
        else:
            rows = [ready(policy, stop + j, j % 3).tolist() for j in range(20)]
            requests.append({"batch": [{"instrument": f"r{j}", "observation": r} for j, r in enumerate(rows)]})
    url = f"http://127.0.0.1:{port}/decide"
    try:
        with httpx.Client(timeout=60) as http:
            serial = [http.post(url, json=r).json() for r in requests]
        assert sum(len(s.get("decisions", [s])) for s in serial) == 8 + 8 + 8 * 20

        def worker(indices):
            with httpx.Client(timeout=60) as http:
                return [(i, http.post(url, json=requests[i]).json()) for i in indices]

        order = [list(rng.permutation(len(requests))[:12]) for _ in range(16)]  # 12 requests a thread, any order
        with ThreadPoolExecutor(16) as pool:
            answers = [pair for chunk in pool.map(worker, order) for pair in chunk]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert len(answers) == 16 * 12 and len({i for i, _ in answers}) == len(requests)
    assert all(answer == serial[i] for i, answer in answers)
    actions = {d["action"] for s in serial for d in s.get("decisions", [s])}
    assert len(actions) >= 2  # the answers differ, so a mix-up between requests would show


def test_command_line(policy, monkeypatch, capsys, tmp_path):
    assert main(["--model", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    served = {}
    monkeypatch.setattr(service.Policy, "load", classmethod(
        lambda cls, uri, dataset=None, registry_uri=None: served.update(registry_uri=registry_uri) or policy))
    monkeypatch.setitem(sys.modules, "uvicorn", types.SimpleNamespace(run=lambda app, **kw: served.update(kw, app=app)))
    assert main(["--model", "models:/spx@champion", "--port", "8123", "--registry-uri", "sqlite:///r.db"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123  # loopback unless --host says otherwise
    assert served["registry_uri"] == "sqlite:///r.db"
    assert TestClient(served["app"]).get("/health").json()["status"] == "ok"
    # several workers: uvicorn's supervisor imports the app factory, which loads the model from the environment
    served.clear()
    monkeypatch.setattr(service.os, "environ", {})
    assert main(["--model", "m.pt", "--workers", "3", "--dataset", "d.csv"]) == 0
    assert served["app"] == "sentio_lab.deploy.service:app_from_environment" and served["factory"] is True
    assert served["workers"] == 3 and service.os.environ[service.MODEL_ENV] == "m.pt"
    app = service.app_from_environment()
    assert served["registry_uri"] is None and TestClient(app).get("/health").json()["status"] == "ok"
    with pytest.raises(SystemExit):
        main(["--model", "m.pt", "--workers", "0"])
