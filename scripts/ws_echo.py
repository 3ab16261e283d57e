"""The web stack's floor: a bare FastAPI/uvicorn WebSocket endpoint that decodes each msgpack
frame and answers a result frame of 11 probabilities, and nothing else.

    python scripts/ws_echo.py PORT

``scripts/benchmarks.py`` runs it beside ``evssm serve`` so that a packet's round trip through
the server is always compared with the same web stack doing no work, in the same run. It serves
``/v1/stream`` (an ``open`` gets ``opened``, anything else a ``result``) and ``/readyz``.
"""

from __future__ import annotations

import sys

import msgpack
import uvicorn
from fastapi import FastAPI, WebSocket

PROBS = [1.0 / 11] * 11
MODEL = {"name": "echo", "classes": [str(i) for i in range(11)],
         "sensor": {"kind": "2d", "width": 128, "height": 128}}

app = FastAPI()


@app.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        frame = msgpack.unpackb(message["bytes"])
        if frame.get("type") == "open":
            answer = {"type": "opened", "session": "echo", "resume": "", "events": 0, "model": MODEL}
        else:
            answer = {"type": "result", "seq": frame.get("seq"), "events": 0, "t": None,
                      "probs": PROBS, "top": [["0", PROBS[0]]]}
        await ws.send_bytes(msgpack.packb(answer))


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
