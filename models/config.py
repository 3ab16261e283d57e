"""Model configuration: one frozen dataclass, loaded from YAML with ``key=value`` overrides.

JAX-free (YAML and the NumPy-only ``events`` module) so the server's API layer can describe
models without importing JAX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .dataset_facts import class_names_of
from .events import SensorSpec

DISCRETIZATIONS = ("zoh", "dirac", "async")
POOLING_MODES = ("first", "avgpool", "timepool")
HEADS = ("pool", "timepool", "last")
NORMS = ("layer", "batch")
GELUS = ("erf", "tanh")  # exact GELU, or its tanh approximation
HEAD_DIVISORS = ("weights", "total_time")  # timepool head: sum of its weights, or total time
# Streaming step: the C++ kernel (CPU), the Flax model through XLA, or native where it builds.
STREAMING_BACKENDS = ("auto", "native", "xla")


@dataclass(frozen=True)
class ModelConfig:
    """EventSSM hyper-parameters (docs/architecture.md, "The model"). ``sensor`` fixes
    ``num_embeddings``."""

    sensor: SensorSpec
    num_classes: int
    d_model: int = 64  # H
    d_state: int = 64  # P
    block_size: int = 8  # b, HiPPO-N block size
    num_stages: int = 2
    layers_per_stage: int = 3
    pooling_stride: int = 8  # s
    pooling_mode: str = "avgpool"
    state_expansion_factor: int = 1  # e
    discretization: str = "async"
    conj_sym: bool = False
    clip_eigs: bool = False
    prenorm: bool = True
    norm: str = "layer"
    dropout: float = 0.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    step_rescale: float = 1.0
    head: str = "pool"
    bn_momentum: float = 0.9
    class_names: tuple[str, ...] = field(default=())
    name: str = "eventssm"
    # Behaviours of the paper's reference code, for the models trained with it (default off;
    # docs/paper-models.md). time_lookahead: event i's token is paired with the time to the
    # next event, t_{i+1} - t_i (one event of latency when streaming). layer_norm_eps: the
    # LayerNorm's epsilon (BatchNorm keeps 1e-5). gelu: "erf" (exact) or "tanh" (approximate).
    # head_divisor: the timepool head divides by the sum of its weights ("weights") or by the
    # stream's total time, partial windows included, without eps ("total_time").
    time_lookahead: bool = False
    layer_norm_eps: float = 1e-5
    gelu: str = "erf"
    head_divisor: str = "weights"

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

        check(self.num_classes >= 2, "num_classes must be >= 2")
        check(self.discretization in DISCRETIZATIONS, f"discretization must be one of {DISCRETIZATIONS}")
        check(self.pooling_mode in POOLING_MODES, f"pooling_mode must be one of {POOLING_MODES}")
        check(self.head in HEADS, f"head must be one of {HEADS}")
        check(self.norm in NORMS, f"norm must be one of {NORMS}")
        check(self.num_stages >= 1 and self.layers_per_stage >= 1, "need at least one stage and layer")
        check(self.pooling_stride >= 1, "pooling_stride must be >= 1")
        check(self.state_expansion_factor >= 1, "state_expansion_factor must be >= 1")
        for k in range(self.num_stages):
            p = self.stage_state(k)
            check(p % self.block_size == 0, f"stage {k} state size {p} is not a multiple of block_size")
            check(not self.conj_sym or self.block_size % 2 == 0, "conj_sym needs an even block_size")
        check(0.0 < self.dt_min <= self.dt_max, "need 0 < dt_min <= dt_max")
        check(not self.class_names or len(self.class_names) == self.num_classes,
              "class_names must have num_classes entries")
        check(isinstance(self.time_lookahead, bool), "time_lookahead must be true or false")
        check(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0,
              "layer_norm_eps must be > 0")
        check(self.gelu in GELUS, f"gelu must be one of {GELUS}")
        check(self.head_divisor in HEAD_DIVISORS, f"head_divisor must be one of {HEAD_DIVISORS}")
        check(self.head_divisor == "weights" or self.head == "timepool",
              "head_divisor 'total_time' applies to the timepool head only")

    # --- derived sizes ---------------------------------------------------------------------
    @property
    def num_embeddings(self) -> int:
        return self.sensor.num_tokens

    def stage_width(self, k: int) -> int:
        """``H_k = H * e^k`` (``H_{-1} = H``)."""
        return self.d_model * self.state_expansion_factor ** max(k, 0)

    def stage_state(self, k: int) -> int:
        """``P_k = P * e^k``."""
        return self.d_state * self.state_expansion_factor ** k

    @property
    def downsampling(self) -> int:
        """Events per final-rate output: ``s^num_stages``."""
        return self.pooling_stride ** self.num_stages

    @property
    def labels(self) -> tuple[str, ...]:
        return self.class_names or tuple(str(i) for i in range(self.num_classes))

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sensor"] = self.sensor.to_dict()
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid model config: unknown keys {unknown}")
        if "sensor" not in d:
            raise ValueError("invalid model config: missing 'sensor'")
        sensor = d["sensor"]
        d["sensor"] = sensor if isinstance(sensor, SensorSpec) else SensorSpec.from_dict(sensor)
        names = d.get("class_names") or ()
        # A model YAML may name a data set instead of listing its classes (class_names: shd).
        d["class_names"] = class_names_of(names) if isinstance(names, str) else tuple(names)
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (inside the installed package)."""
    return Path(str(resources.files("evssm.configs")))


def parse_value(text: str) -> Any:
    """Parse an override's value the way YAML would (``1e-3``, ``true``, ``[1, 2]``, ``name``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:  # YAML 1.1 leaves "1e-3" a string
            return float(value)
        except ValueError:
            return value
    return value


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Load ``configs/models/NAME.yaml`` (or a YAML path) and apply ``overrides``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = configs_dir() / "models" / f"{name_or_path}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))
        raise FileNotFoundError(f"no model config {str(name_or_path)!r}; available: {available}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides or {})
    return ModelConfig.from_dict(data)
