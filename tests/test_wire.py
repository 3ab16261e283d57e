"""The wire contract is one NumPy-only module (``evssm.models.wire``) that both sides use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from evssm.client import errors as client_errors
from evssm.client.protocol import event_columns
from evssm.models import wire
from evssm.models.events import Recording, SensorSpec
from evssm.server.api import protocol as server_protocol


def test_the_contract_module_imports_numpy_only() -> None:
    code = ("import sys; import evssm.models.wire, evssm.models.events\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'msgpack', 'jax', 'flax', 'fastapi', 'websockets', 'httpx', 'yaml'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_server_and_client_speak_the_same_columns_and_codes() -> None:
    assert server_protocol.Code is wire.Code and server_protocol.RECORD_DTYPE is wire.RECORD_DTYPE
    rec = Recording(np.array([0, 5, 9], np.int64), np.array([1, 2, 65535], np.int64))
    cols = event_columns(rec)
    events = server_protocol.decode_events(cols, SensorSpec.one_d(1 << 16))
    assert events.t.tolist() == [0, 5, 9] and events.x.tolist() == [1, 2, 65535]
    for name, raw in cols.items():
        assert len(raw) == 3 * wire.COLUMN_DTYPES[name].itemsize
    # Every code the client maps to a typed exception is one the contract defines (or its own).
    own = {"resume_mismatch"}
    assert set(client_errors._CODE_CLASSES) - own <= {c.value for c in wire.Code}
    err = client_errors.server_error(wire.Code.SERVER_FULL, "full")
    assert isinstance(err, client_errors.ServerFull) and err.code == "server_full"
