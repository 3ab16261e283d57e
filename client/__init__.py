"""evssm client: stream event packets to an evssm server, classify recordings, load-test.

Runs on a sensor-side machine with numpy, msgpack, websockets and httpx only: nothing here imports
JAX or Flax (a test checks it in a fresh interpreter). Main pieces:

- :class:`StreamSession` / :class:`AsyncStreamSession` — a streaming session over WebSocket with
  bounded in-flight packets, automatic reconnect-and-resume, typed server errors;
- :func:`classify` / :func:`aclassify` — whole recordings over HTTP;
- :mod:`~evssm.client.sources` — event files, data sets and a simulated sensor;
- :mod:`~evssm.client.packets` — packetising by count or time window, real-time replay.
"""

from .errors import (
    ClientError,
    ConnectionLost,
    InvalidEvents,
    NothingInFlight,
    ProtocolError,
    ServerError,
    ServerFull,
    ServerUnavailable,
    SessionClosed,
    SessionExpired,
    SourceError,
    Unauthorized,
    UnknownModel,
)
from .http_api import Classification, aclassify, classify, list_models
from .packets import Pacer, Packet, apaced, paced, packetize
from .protocol import ModelInfo, Result, SessionInfo
from .resync import Resume
from .session import AsyncStreamSession
from .sources import Sample, SimulatedSensor, open_source, save_events
from .state import SessionState
from .sync_session import StreamSession
from .transport import ConnectFailed

__all__ = [
    "AsyncStreamSession", "StreamSession", "SessionState", "Resume", "Result", "SessionInfo", "ModelInfo",
    "classify", "aclassify", "list_models", "Classification",
    "Packet", "Pacer", "packetize", "paced", "apaced",
    "Sample", "SimulatedSensor", "open_source", "save_events",
    "ClientError", "ServerError", "InvalidEvents", "UnknownModel", "ServerFull", "ServerUnavailable",
    "SessionExpired", "Unauthorized",
    "ConnectionLost", "ConnectFailed", "ProtocolError", "NothingInFlight", "SessionClosed",
    "SourceError",
]
