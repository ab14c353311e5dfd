"""The decision service: a :class:`~sentio_lab.deploy.policy.Policy` over HTTP (FastAPI + uvicorn).

``python -m sentio_lab.deploy.service --model URI [--host 127.0.0.1] [--port 8000]`` serves one model (a checkpoint
path or ``models:/<name>@<alias>``); it listens on 127.0.0.1 unless ``--host`` says otherwise. Endpoints:

* ``POST /decide``: one instrument or a batch. An instrument is either its bar history (``bars``: columns
  ``time``, ``open``, ``high``, ``low``, ``close``, ``volume``, one list each, oldest bar first, as
  :meth:`Policy.decide <sentio_lab.deploy.policy.Policy.decide>` takes them, with its ``account``: the level held
  and, where the model reads them, equity, peak, drawdown and mask state) or a ready ``observation`` (the agent's
  input vector, :meth:`Policy.observation <sentio_lab.deploy.policy.Policy.observation>`, with an optional ``mask``
  of valid levels). Body ``{"instrument": ..., "bars": {...}}`` or ``{"observation": [...]}`` answers one decision
  ``{"instrument", "action", "weight", "time"}``; ``{"batch": [instrument, ...]}`` answers
  ``{"decisions": [...]}`` in the same order (ready observations of a batch go through one forward pass,
  :meth:`Policy.act <sentio_lab.deploy.policy.Policy.act>`). Many ready observations travel best as one matrix,
  ``{"observations": [[...], ...]}`` or ``{"observations_b64": "..."}`` (:class:`MatrixIn`), answered like a batch.
* ``GET /health``: ``{"status": "ok", "uptime_s", "decisions"}``.
* ``GET /model``: what is served: source, version and verdict (from the registry for a ``models:/`` URI), the
  variant, its levels, window and history rules (``min_bars``, ``first_bar``).

A malformed request is answered 422 with pydantic's error list, each naming its field (``loc``); bars the
policy cannot decide on (out of order, duplicated, too few for the feature lookback, invalid OHLCV) are answered
422 with the reason, under ``loc: ["body", "bars"]`` (or the batch item's). Nothing a client sends gives a 500.
Requests are served concurrently (bar histories in the thread pool); the policy keeps no state between calls.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from sentio_lab.deploy.policy import NEVER_TRADED, Account, BarsError, Policy

#: The address the service binds to by default: loopback only (``--host`` to expose it deliberately).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: Most instruments one batch request may carry.
MAX_BATCH = 10_000
#: A float that must be finite, checked by pydantic's core (no Python loop per value).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
#: Why an anchored model takes no ready observation: its action is a tilt, its target ``clip(b_t + tilt)``.
ANCHORED_NEEDS_BARS = ("this model is anchored to a benchmark: its target weight needs the benchmark weight at the "
                       "bar, computed from the bars; send bars (with account.weight) instead of an observation")
#: Environment variables a worker process of ``--workers N`` reads its model from (:func:`app_from_environment`).
MODEL_ENV, DATASET_ENV, REGISTRY_ENV = "SENTIO_SERVICE_MODEL", "SENTIO_SERVICE_DATASET", "SENTIO_SERVICE_REGISTRY"


class BarsIn(BaseModel):
    """A bar history, column by column (oldest bar first)."""

    model_config = ConfigDict(extra="forbid")
    time: list[datetime] = Field(min_length=1)
    open: list[float | None]
    high: list[float | None]
    low: list[float | None]
    close: list[float]
    volume: list[float | None]

    @model_validator(mode="after")
    def _same_lengths(self) -> BarsIn:
        lengths = {name: len(getattr(self, name)) for name in ("time", "open", "high", "low", "close", "volume")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every bar column needs one value per bar; lengths {lengths}")
        return self

    def frame(self) -> pd.DataFrame:
        """The bars as an OHLCV DataFrame indexed by time (validated by the policy)."""
        nan = float("nan")
        columns = {c: [nan if v is None else v for v in getattr(self, c)] for c in ("open", "high", "low", "volume")}
        return pd.DataFrame({**columns, "close": self.close}, index=pd.DatetimeIndex(self.time))


class AccountIn(BaseModel):
    """The account a decision reads (:class:`~sentio_lab.deploy.policy.Account`); every field optional."""

    model_config = ConfigDict(extra="forbid")
    position: int | None = Field(default=None, ge=0)
    weight: float | None = Field(default=None, allow_inf_nan=False)
    equity: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    peak: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    max_drawdown: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    guard: bool = False
    since_trade: int = Field(default=NEVER_TRADED, ge=0)
    period_trades: int = Field(default=0, ge=0)

    def account(self) -> Account:
        """As the policy's dataclass."""
        return Account(**self.model_dump())


class InstrumentIn(BaseModel):
    """One instrument's decision input: its ``bars`` (and ``account``) or a ready ``observation`` (and ``mask``)."""

    model_config = ConfigDict(extra="forbid")
    instrument: str = Field(default="bars", min_length=1, max_length=200)
    bars: BarsIn | None = None
    account: AccountIn | None = None
    observation: list[FiniteFloat] | None = Field(default=None, min_length=1)
    mask: list[bool] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> InstrumentIn:
        if (self.bars is None) == (self.observation is None):
            raise ValueError("give either bars or observation (exactly one)")
        if self.observation is not None and self.account is not None:
            raise ValueError("account goes with bars; an observation already holds the position")
        if self.mask is not None and self.observation is None:
            raise ValueError("mask goes with observation; with bars the policy computes the mask")
        return self


class BatchIn(BaseModel):
    """``POST /decide`` with ``batch``: a list of instruments, answered in the same order."""

    model_config = ConfigDict(extra="forbid")
    batch: list[InstrumentIn] = Field(min_length=1, max_length=MAX_BATCH)


class MatrixIn(BaseModel):
    """``POST /decide`` with a batch of ready observations as one matrix (a row per instrument): the compact form of
    a :class:`BatchIn` of observations, one model to validate instead of one per instrument. The rows come as
    ``observations`` (a list of rows of numbers) or as ``observations_b64``: the base64 of the little-endian
    float32 matrix, row-major, ``obs_dim`` values a row (``base64.b64encode(obs.astype("<f4").tobytes())``), which
    spares both sides printing and parsing every number (the cost of a large batch in JSON). Optional ``masks`` (a
    row of booleans per observation) and ``instruments`` (names; default ``"0"``, ``"1"``, ...). Answered
    ``{"decisions": [...]}`` in row order, as a batch is."""

    model_config = ConfigDict(extra="forbid")
    observations: list[list[FiniteFloat]] | None = Field(default=None, min_length=1, max_length=MAX_BATCH)
    observations_b64: str | None = Field(default=None, min_length=1)
    masks: list[list[bool]] | None = None
    instruments: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None

    @model_validator(mode="after")
    def _rows_agree(self) -> MatrixIn:
        if (self.observations is None) == (self.observations_b64 is None):
            raise ValueError("give either observations or observations_b64 (exactly one)")
        if self.observations is not None:
            rows = len(self.observations)
            for name in ("masks", "instruments"):
                value = getattr(self, name)
                if value is not None and len(value) != rows:
                    raise ValueError(f"{name} needs one entry per observation row: {len(value)} given for {rows} rows")
        return self


def _request_kind(value: Any) -> str:
    """Which model validates a request: ``"batch"`` for an object with a ``batch`` key, ``"matrix"`` for one with
    ``observations``, else ``"one"``."""
    if isinstance(value, dict):
        if "batch" in value:
            return "batch"
        if "observations" in value or "observations_b64" in value:
            return "matrix"
    return "one"


#: ``POST /decide``'s body: a :class:`BatchIn`, a :class:`MatrixIn` or one :class:`InstrumentIn`, told apart by
#: their keys (so errors name the fields of the one model meant, not of all three).
DECIDE_REQUEST: TypeAdapter[Any] = TypeAdapter(
    Annotated[Annotated[BatchIn, Tag("batch")] | Annotated[MatrixIn, Tag("matrix")]
              | Annotated[InstrumentIn, Tag("one")], Discriminator(_request_kind)]
)


def _decision(instrument: str, action: int, weight: float, time: str | None = None) -> dict[str, Any]:
    """One answer: the level index, its target weight and the decision bar's time (None for an observation).
    Plain dicts, sent as JSON directly: no response model to validate them again on the way out."""
    return {"instrument": instrument, "action": action, "weight": weight, "time": time}


def _error(loc: Sequence[str | int], message: str) -> HTTPException:
    """A 422 shaped like pydantic's errors."""
    return HTTPException(status_code=422, detail=[{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


def _decide(policy: Policy, items: list[InstrumentIn], batched: bool) -> list[dict[str, Any]]:
    """Decisions for ``items``: ready observations in one :meth:`Policy.act`, bar histories one by one."""
    out: list[dict[str, Any] | None] = [None] * len(items)
    ready = [i for i, item in enumerate(items) if item.observation is not None]
    if ready and policy.tilts is not None:
        raise _error(_loc(batched, ready[0], "observation"), ANCHORED_NEEDS_BARS)
    if ready:
        for i in ready:
            if len(items[i].observation) != policy.obs_dim:
                raise _error(_loc(batched, i, "observation"),
                             f"observation has {len(items[i].observation)} values, the model reads {policy.obs_dim}")
        obs = np.asarray([items[i].observation for i in ready], dtype=np.float32)
        masks = None
        if any(items[i].mask is not None for i in ready):
            levels = len(policy.levels)
            for i in ready:
                mask = items[i].mask
                if mask is not None and (len(mask) != levels or not any(mask)):
                    raise _error(_loc(batched, i, "mask"), f"mask needs {levels} booleans with at least one true")
            masks = np.asarray([items[i].mask or [True] * levels for i in ready], dtype=bool)
        for i, action in zip(ready, policy.act(obs, masks), strict=True):
            out[i] = _decision(items[i].instrument, int(action), float(policy.levels[action]))
    for i, item in enumerate(items):
        if item.bars is None:
            continue
        try:
            account = None if item.account is None else item.account.account()
            decision = policy.decide(item.bars.frame(), account, name=item.instrument)
        except BarsError as err:  # the client's bars, said in one line (out of order, duplicated, too few, ...)
            raise _error(_loc(batched, i, "bars"), str(err)) from err
        except ValueError as err:  # an account the model cannot read (a level index out of range)
            raise _error(_loc(batched, i, "account"), f"{item.instrument}: {err}") from err
        out[i] = _decision(item.instrument, decision.action, decision.weight, decision.time.isoformat())
    return out  # type: ignore[return-value]


def _matrix_rows(policy: Policy, matrix: MatrixIn) -> np.ndarray:
    """The ``(rows, obs_dim)`` float32 observations of a :class:`MatrixIn`, checked (422 naming the field)."""
    width = policy.obs_dim
    if matrix.observations_b64 is not None:
        longest = 4 * -(-(MAX_BATCH * width * 4) // 3)  # base64 of MAX_BATCH rows: refused before decoding more
        if len(matrix.observations_b64) > longest:
            raise _error(["observations_b64"], f"more than {MAX_BATCH} rows of {width} float32 values")
        try:
            raw = base64.b64decode(matrix.observations_b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise _error(["observations_b64"], f"not base64: {err}") from err
        if not raw or len(raw) % (4 * width):
            raise _error(["observations_b64"], f"{len(raw)} bytes is no whole number of rows of {width} float32 "
                                               f"values ({4 * width} bytes a row)")
        obs = np.frombuffer(raw, dtype="<f4").reshape(-1, width).astype(np.float32)
        if len(obs) > MAX_BATCH:
            raise _error(["observations_b64"], f"{len(obs)} rows: at most {MAX_BATCH} a request")
        finite = np.isfinite(obs).all(axis=1)
        if not finite.all():
            raise _error(["observations_b64"], f"row {int(np.argmin(finite))}: observation values must be finite")
        for name in ("masks", "instruments"):
            value = getattr(matrix, name)
            if value is not None and len(value) != len(obs):
                raise _error([name], f"{name} needs one entry per observation row: {len(value)} given for "
                                     f"{len(obs)} rows")
        return obs
    rows = matrix.observations or []
    bad = next((i for i, row in enumerate(rows) if len(row) != width), None)
    if bad is not None:
        raise _error(["observations", bad], f"observation has {len(rows[bad])} values, the model reads {width}")
    return np.asarray(rows, dtype=np.float32)


def _decide_matrix(policy: Policy, matrix: MatrixIn) -> list[dict[str, Any]]:
    """Decisions for a :class:`MatrixIn`: every row through one :meth:`Policy.act`."""
    if policy.tilts is not None:
        raise _error(["observations" if matrix.observations is not None else "observations_b64"], ANCHORED_NEEDS_BARS)
    obs = _matrix_rows(policy, matrix)
    masks = None
    if matrix.masks is not None:
        levels = len(policy.levels)
        for i, mask in enumerate(matrix.masks):
            if len(mask) != levels or not any(mask):
                raise _error(["masks", i], f"mask needs {levels} booleans with at least one true")
        masks = np.asarray(matrix.masks, dtype=bool)
    names = matrix.instruments or [str(i) for i in range(len(obs))]
    levels = policy.levels
    return [_decision(name, int(a), float(levels[a])) for name, a in zip(names, policy.act(obs, masks), strict=True)]


def _loc(batched: bool, index: int, field: str) -> list[str | int]:
    """The error location of ``field`` of item ``index`` (``batch.<index>.<field>`` in a batch)."""
    return ["batch", index, field] if batched else [field]


def model_info(policy: Policy) -> dict[str, Any]:
    """``GET /model``: the policy's description plus its registry version and verdict (None outside the registry).

    For a ``models:/`` source the version and its tags come from ``sentio_lab.deploy.registry.model_version``; the
    verdict is the tags whose names start with ``verdict``."""
    info = policy.describe()
    info.update(version=None, verdict=None, tags={})
    if policy.source.startswith("models:/"):
        from sentio_lab.deploy import registry  # loaded with the registry URI already (Policy.load)

        name, _, ref = policy.source[len("models:/"):].replace("@", "/").partition("/")
        version = (registry.model_version(name, ref) if policy.registry_uri is None
                   else registry.model_version(name, ref, registry_uri=policy.registry_uri))
        tags = dict(getattr(version, "tags", {}) or {})
        info.update(version=str(version.version), tags=tags,
                    verdict={k: v for k, v in tags.items() if k.startswith("verdict")} or None)
    return info


def create_app(policy: Policy) -> FastAPI:
    """The FastAPI app serving ``policy`` (module doc)."""
    app = FastAPI(title="sentio-lab decision service", version="1")
    started = time.monotonic()
    counter = {"decisions": 0}
    info = model_info(policy)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: the process answers and the model is loaded."""
        return {"status": "ok", "uptime_s": time.monotonic() - started, "decisions": counter["decisions"]}

    @app.get("/model")
    def model() -> dict[str, Any]:
        """What is served (module doc)."""
        return info

    @app.post("/decide", response_class=JSONResponse)
    async def decide(request: Request) -> Any:
        """One decision (an :class:`InstrumentIn` body), or ``{"decisions": [...]}`` for a :class:`BatchIn` body."""
        try:  # pydantic parses the JSON itself (faster than json.loads; malformed JSON is a 422 as well)
            parsed = DECIDE_REQUEST.validate_json(await request.body())
        except ValidationError as err:  # the union's tag ("batch" / "one") is no field: drop it from the location;
            # the input is not echoed (it may be a whole bar history, or a NaN that JSON cannot carry)
            raise RequestValidationError(
                [{"type": e["type"], "loc": ("body", *e["loc"][1:]), "msg": e["msg"]}
                 for e in err.errors(include_url=False, include_context=False, include_input=False)]
            ) from None
        if isinstance(parsed, MatrixIn):  # ready observations only: one forward pass, inline
            decisions = _decide_matrix(policy, parsed)
            counter["decisions"] += len(decisions)
            return JSONResponse({"decisions": decisions})
        batched = isinstance(parsed, BatchIn)
        items = parsed.batch if batched else [parsed]
        if any(item.bars is not None for item in items):  # features take milliseconds: off the event loop
            decisions = await run_in_threadpool(_decide, policy, items, batched)
        else:  # one small forward pass: cheaper inline than a thread hop
            decisions = _decide(policy, items, batched)
        counter["decisions"] += len(decisions)  # a statistic: a lost increment under races costs nothing
        return JSONResponse({"decisions": decisions} if batched else decisions[0])

    return app


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sentio_lab.deploy.service --model URI [--host H] [--port P]``: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m sentio_lab.deploy.service", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint path or models:/<name>@<alias>")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--dataset", default=None, help="the model's data, if not where the checkpoint says")
    parser.add_argument("--registry-uri", default=None,
                        help="MLflow registry of a models:/ URI (default: the registry's own, runs/mlflow)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port, each with its own copy of the model (default 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:  # loaded here even with several workers: a bad model is refused before any process starts
        policy = Policy.load(args.model, dataset=args.dataset, registry_uri=args.registry_uri)
    except (OSError, ValueError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    if args.workers == 1:
        uvicorn.run(create_app(policy), host=args.host, port=args.port, log_level="warning", access_log=False)
        return 0
    # Several processes share the port (uvicorn's supervisor); each loads the model itself from the environment.
    os.environ.update({MODEL_ENV: args.model, DATASET_ENV: args.dataset or "", REGISTRY_ENV: args.registry_uri or ""})
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level="warning", access_log=False)
    return 0


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``--workers N``: the model named by :data:`MODEL_ENV` (with
    :data:`DATASET_ENV` and :data:`REGISTRY_ENV` where set), loaded in this process."""
    policy = Policy.load(os.environ[MODEL_ENV], dataset=os.environ.get(DATASET_ENV) or None,
                         registry_uri=os.environ.get(REGISTRY_ENV) or None)
    return create_app(policy)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
