"""Live sensors: the pure planning behind sliding windows, decisions and real-time lag (no I/O,
no JAX; the engine wires them into sessions). The input filters live with the model's ingest,
in ``models/filters.py``."""

from .decisions import DecideSpec, Decision, DecisionError, DecisionTracker
from .lag import ClockSync, LagError, LagMonitor, OverloadPolicy
from .windows import LaneState, PacketPlan, WindowError, WindowPlan, WindowSpec

__all__ = [
    "ClockSync", "DecideSpec", "Decision", "DecisionError", "DecisionTracker", "LagError",
    "LagMonitor", "LaneState", "OverloadPolicy", "PacketPlan", "WindowError", "WindowPlan",
    "WindowSpec",
]
