"""Whole-recording classification over HTTP (``POST /v1/classify``) and model listing.

Requests are msgpack with ``bin`` columns (the same columns as streaming); the server answers with
the offline form of the model, batched. Many recordings are sent in requests of ``batch_size``
streams, so one call can classify a whole data set without one huge request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack

from evssm.models.events import Recording, SensorSpec
from evssm.models.wire import MSGPACK, MSGPACK_TYPES

from .errors import ClientCode, ClientError, ConnectionLost, ProtocolError, ServerUnavailable, server_error
from .protocol import ModelInfo, auth_headers, endpoint_url, event_columns, sensor_declaration

_HEADERS = {"content-type": MSGPACK, "accept": MSGPACK}
BUSY_TIMEOUT_S = 120.0  # how long classify retries a server that answers `busy` (503 + Retry-After)


@dataclass(frozen=True)
class Classification:
    """The server's answer for one recording: class probabilities, the predicted label (as the
    server names it) and the number of events it read. ``probs`` and ``label`` are None for a
    recording too short for one complete output window. ``cropped``: events a declared crop
    removed (not in ``events``); ``filtered``: events each input filter removed (None: no
    filters declared)."""

    probs: list[float] | None
    label: Any
    events: int
    model: str
    cropped: int = 0
    filtered: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"probs": self.probs, "label": self.label, "events": self.events,
               "model": self.model, "cropped": self.cropped}
        if self.filtered is not None:
            out["filtered"] = self.filtered
        return out


def _decode_body(response: httpx.Response) -> Any:
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind in MSGPACK_TYPES:
        return msgpack.unpackb(response.content, raw=False)
    return response.json()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = _decode_body(response)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        code = body["error"]
        # FastAPI's own errors put a list or dict under "detail"; ours put a code under "error".
        raise server_error(str(code), str(body.get("message", "")), status=response.status_code)
    if response.status_code == 503:
        raise ServerUnavailable(ClientCode.UNAVAILABLE, response.text[:200], status=503)
    raise server_error(f"http_{response.status_code}", response.text[:500],
                       status=response.status_code)


def _request_body(recordings: Sequence[Recording], model: str | None, binary: bool,
                  sensors: Sequence[SensorSpec | None] | None = None,
                  transform: Mapping[str, Any] | None = None,
                  filters: Mapping[str, int] | None = None) -> bytes:
    streams = [event_columns(r, binary=binary) for r in recordings]
    for stream, sensor in zip(streams, sensors or (), strict=False):  # no sensors: none declared
        if sensor is not None:
            stream["sensor"] = sensor_declaration(sensor)
    body: dict[str, Any] = {"streams": streams}
    if model is not None:
        body["model"] = model
    if transform is not None:
        body["transform"] = dict(transform)
    if filters is not None:
        body["filters"] = dict(filters)
    return msgpack.packb(body)


def _parse(body: Any, expected: int) -> list[Classification]:
    try:
        model = str(body.get("model", ""))
        results = body["results"]
        out = [Classification(probs=None if r.get("probs") is None
                              else [float(v) for v in r["probs"]], label=r.get("label"),
                              events=int(r.get("events", 0)), model=model,
                              cropped=int(r.get("cropped") or 0),
                              filtered=None if r.get("filtered") is None
                              else {str(k): int(v) for k, v in r["filtered"].items()}) for r in results]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed classify response: {exc}") from exc
    if len(out) != expected:
        raise ProtocolError(f"classify answered {len(out)} results for {expected} streams")
    return out


def _requests(recordings: Sequence[Recording], model: str | None, batch_size: int, binary: bool,
              sensors: Sequence[SensorSpec | None] | None,
              transform: Mapping[str, Any] | None,
              filters: Mapping[str, int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(streams, msgpack body) of each request of at most ``batch_size`` recordings, made as
    they are sent (a whole data set is never encoded at once)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    starts = range(0, len(recordings), batch_size)
    return ((len(recordings[i:i + batch_size]),
             _request_body(recordings[i:i + batch_size], model, binary,
                           None if sensors is None else sensors[i:i + batch_size], transform, filters))
            for i in starts)


def _answer(response: httpx.Response, streams: int) -> list[Classification]:
    _raise_for(response)
    return _parse(_decode_body(response), streams)


def _retry_delay(response: httpx.Response, deadline: float) -> float | None:
    """Seconds to wait before sending again a request the server refused as ``busy`` (503 with
    ``Retry-After``: its classify shapes still compile after start-up, or it serves its limit of
    classify requests), or None when it is another answer or the wait would pass ``deadline``."""
    if response.status_code != 503 or "retry-after" not in response.headers:
        return None
    try:
        delay = min(max(float(response.headers["retry-after"]), 0.1), 10.0)
    except ValueError:
        delay = 1.0
    return delay if time.monotonic() + delay <= deadline else None


OnBusy = Callable[[float, str], None]  # (seconds until the next try, the server's message)


def _busy_message(response: httpx.Response) -> str:
    try:
        return str(_decode_body(response).get("message", ""))
    except (ValueError, AttributeError):
        return response.text[:200]


def classify(url: str, recordings: Sequence[Recording], *, model: str | None = None,
             batch_size: int = 16, timeout: float = 300.0, binary: bool = True,
             transport: httpx.BaseTransport | None = None,
             sensors: Sequence[SensorSpec | None] | None = None,
             transform: Mapping[str, Any] | None = None,
             filters: Mapping[str, int] | None = None,
             api_key: str | None = None, busy_timeout: float = BUSY_TIMEOUT_S,
             on_busy: OnBusy | None = None) -> list[Classification]:
    """Classify whole recordings with the offline model, ``batch_size`` per request.

    ``url`` is the server (``http://HOST:PORT``; a ``ws://`` URL works too). Raises typed
    :class:`~evssm.client.errors.ServerError` subclasses for the server's error codes and
    :class:`~evssm.client.errors.ConnectionLost` when it cannot be reached. ``sensors``
    declares each recording's source sensor (None entries: the model's) and ``transform`` how
    the server maps them (see the protocol); ``filters`` the input filters it applies to every
    recording before the model (``{"refractory_us", "denoise_us", "max_rate"}``). ``api_key``
    is sent as ``Authorization: Bearer`` (None: ``EVSSM_API_KEY``). A request answered ``busy``
    (a server that has just started compiles its classify shapes while it already streams) is
    sent again after the server's
    ``Retry-After`` for up to ``busy_timeout`` seconds, calling ``on_busy`` before each wait.
    ``transport`` replaces the network (tests).
    """
    target = endpoint_url(url, "classify")
    requests = _requests(recordings, model, batch_size, binary, sensors, transform, filters)
    headers = {**_HEADERS, **auth_headers(api_key)}
    deadline = time.monotonic() + busy_timeout
    out: list[Classification] = []
    try:
        with httpx.Client(timeout=timeout, transport=transport) as client:
            for streams, body in requests:
                response = client.post(target, content=body, headers=headers)
                while (delay := _retry_delay(response, deadline)) is not None:
                    if on_busy is not None:
                        on_busy(delay, _busy_message(response))
                    time.sleep(delay)
                    response = client.post(target, content=body, headers=headers)
                out += _answer(response, streams)
    except httpx.TransportError as exc:
        raise ConnectionLost(f"cannot reach {target}: {exc}") from exc
    return out


async def aclassify(url: str, recordings: Sequence[Recording], *, model: str | None = None,
                    batch_size: int = 16, timeout: float = 300.0, binary: bool = True,
                    transport: httpx.AsyncBaseTransport | None = None,
                    sensors: Sequence[SensorSpec | None] | None = None,
                    transform: Mapping[str, Any] | None = None,
                    filters: Mapping[str, int] | None = None,
                    api_key: str | None = None, busy_timeout: float = BUSY_TIMEOUT_S,
                    on_busy: OnBusy | None = None) -> list[Classification]:
    """Asyncio twin of :func:`classify`."""
    target = endpoint_url(url, "classify")
    requests = _requests(recordings, model, batch_size, binary, sensors, transform, filters)
    headers = {**_HEADERS, **auth_headers(api_key)}
    deadline = time.monotonic() + busy_timeout
    out: list[Classification] = []
    try:
        async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
            for streams, body in requests:
                response = await client.post(target, content=body, headers=headers)
                while (delay := _retry_delay(response, deadline)) is not None:
                    if on_busy is not None:
                        on_busy(delay, _busy_message(response))
                    await asyncio.sleep(delay)
                    response = await client.post(target, content=body, headers=headers)
                out += _answer(response, streams)
    except httpx.TransportError as exc:
        raise ConnectionLost(f"cannot reach {target}: {exc}") from exc
    return out


def list_models(url: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                api_key: str | None = None) -> list[ModelInfo]:
    """The models the server serves (``GET /v1/models``), its default model first."""
    target = endpoint_url(url, "models")
    try:
        with httpx.Client(timeout=timeout, transport=transport) as client:
            response = client.get(target, headers={"accept": "application/json", **auth_headers(api_key)})
    except httpx.TransportError as exc:
        raise ConnectionLost(f"cannot reach {target}: {exc}") from exc
    _raise_for(response)
    body = _decode_body(response)
    models = body.get("models", body) if isinstance(body, dict) else body
    if isinstance(models, dict):  # {name: info}
        models = [{"name": k, **v} for k, v in models.items()]
    if not isinstance(models, list):
        raise ClientError(f"unexpected /v1/models answer: {str(body)[:200]}")
    infos = [ModelInfo.from_dict(m) for m in models]
    default = body.get("default") if isinstance(body, dict) else None
    return sorted(infos, key=lambda m: m.name != default)  # stable: the default first
