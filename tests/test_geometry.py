"""The geometry adapter's mathematics (models/geometry.py), NumPy only."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from evssm.models.events import EventError, SensorSpec
from evssm.models.geometry import GeometryError, Transform, adapter_for, build_adapter, sensor_from_dict

S = SensorSpec.two_d


def grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel of a ``w x h`` sensor once, polarity alternating."""
    y, x = np.divmod(np.arange(w * h), w)
    return x.astype(np.uint16), y.astype(np.uint16), (x % 2).astype(np.uint8)


def reference(u: int, size: int, target: int, scale: Fraction) -> int:
    """floor((target - size*s)/2 + (u + 1/2)*s) in exact rationals (the docstring's formula)."""
    v = (target - size * scale) / 2 + (u + Fraction(1, 2)) * scale
    return v.numerator // v.denominator


@pytest.mark.parametrize("src,dst", [((1280, 720), (128, 128)), ((640, 480), (34, 34)),
                                     ((34, 34), (128, 128)), ((320, 240), (128, 128)),
                                     ((304, 240), (34, 34)), ((7, 13), (5, 3))])
def test_fit_keeps_every_event_inside_centred_with_one_scale(src, dst) -> None:
    a = build_adapter(S(*src), S(*dst))
    x, y, p = grid(*src)
    mx, my, mp, keep = a.apply(x, y, p)
    assert keep is None and len(mx) == len(x)
    assert mx.max() < dst[0] and my.max() < dst[1] and mx.min() >= 0 and my.min() >= 0
    np.testing.assert_array_equal(mp, p)
    s = min(Fraction(dst[0], src[0]), Fraction(dst[1], src[1]))
    for u in (0, 1, src[0] // 2, src[0] - 1):
        assert int(mx[u]) == reference(u, src[0], dst[0], s)
    for v in (0, src[1] // 3, src[1] - 1):
        assert int(my[v * src[0]]) == reference(v, src[1], dst[1], s)
    # Centred: the margins on either side of the image differ by at most one pixel.
    lo_x, hi_x = int(mx.min()), dst[0] - 1 - int(mx.max())
    lo_y, hi_y = int(my.min()), dst[1] - 1 - int(my.max())
    assert abs(lo_x - hi_x) <= 1 and abs(lo_y - hi_y) <= 1
    assert min(lo_x + hi_x, lo_y + hi_y) <= max(1, float(s))  # one axis filled (pixel centres)


def test_gen4_into_dvs_leaves_letterbox_rows_empty() -> None:
    a = build_adapter(S(1280, 720), S(128, 128))
    _, my, _, _ = a.apply(*grid(1280, 720))
    # s = 1/10: 72 rows of image, (128 - 72) / 2 = 28 rows above and below.
    assert int(my.min()) == 28 and int(my.max()) == 99
    assert a.describe()["offset_y"] == 28.0 and a.describe()["scale_x"] == 0.1


def test_stretch_fills_both_axes() -> None:
    a = build_adapter(S(640, 480), S(128, 128), Transform(scale="stretch"))
    mx, my, _, _ = a.apply(*grid(640, 480))
    assert (int(mx.min()), int(mx.max()), int(my.min()), int(my.max())) == (0, 127, 0, 127)
    assert len(np.unique(my)) == 128 and len(np.unique(mx)) == 128


def test_crop_removes_outside_events_and_flips_mirror() -> None:
    t = Transform.from_dict({"crop": [100, 50, 200, 100], "flip_x": True, "flip_y": True})
    a = build_adapter(S(640, 480), S(20, 10), t)
    assert a.crops
    x = np.array([99, 100, 299, 300, 150, 100], np.uint16)
    y = np.array([60, 50, 149, 60, 49, 149], np.uint16)
    p = np.array([1, 0, 1, 0, 1, 1], np.uint8)
    mx, my, mp, keep = a.apply(x, y, p)
    np.testing.assert_array_equal(keep, [False, True, True, False, False, True])
    # scale 1/10 both ways; flipped: the crop's first column lands on the last model column
    np.testing.assert_array_equal(mx, [19, 0, 19])
    np.testing.assert_array_equal(my, [9, 0, 0])
    np.testing.assert_array_equal(mp, [0, 1, 1])
    whole = build_adapter(S(64, 48), S(64, 48), Transform.from_dict({"crop": [0, 0, 64, 48]}))
    assert not whole.crops  # a crop of the whole sensor removes nothing


def test_one_d_channels_map_and_refuse_two_d() -> None:
    a = build_adapter(SensorSpec.one_d(700), SensorSpec.one_d(70))
    mx, my, _, keep = a.apply(np.arange(700), None, None)
    assert my is None and keep is None
    np.testing.assert_array_equal(mx, np.arange(700) // 10)
    c = build_adapter(SensorSpec.one_d(700), SensorSpec.one_d(100),
                      Transform.from_dict({"crop": [200, 100], "flip_x": True}))
    mx, _, _, keep = c.apply(np.array([199, 200, 299, 300]), None, None)
    np.testing.assert_array_equal(keep, [False, True, True, False])
    np.testing.assert_array_equal(mx, [99, 0])
    with pytest.raises(GeometryError, match="1D source .* cannot be mapped onto the model's 2D"):
        build_adapter(SensorSpec.one_d(700), S(34, 34))
    with pytest.raises(GeometryError, match="2D source"):
        adapter_for(SensorSpec.one_d(700), {"width": 34, "height": 34})


def test_declarations() -> None:
    target = S(34, 34)
    assert adapter_for(target) is None
    assert adapter_for(target, {"width": 34, "height": 34}) is None  # same sensor: nothing to map
    assert adapter_for(target, {"kind": "2d", "width": 34, "height": 34, "channels": 0}) is None
    assert adapter_for(target, None, {"flip_x": True}) is not None  # flip the model's own sensor
    assert sensor_from_dict({"channels": 700}) == SensorSpec.one_d(700)
    bad = [({"width": 0, "height": 3}, None), ({"width": 1.5, "height": 3}, None), ("640x480", None),
           ({"width": 640, "height": 480}, {"scale": "zoom"}),
           ({"width": 640, "height": 480}, {"crop": [0, 0, 641, 480]}),
           ({"width": 640, "height": 480}, {"crop": [0, 0, 0, 10]}),
           ({"width": 640, "height": 480}, {"crop": "all"}),
           ({"width": 640, "height": 480}, {"flip_x": 1}),
           ({"width": 640, "height": 480}, {"rotate": 90}), ({"width": 640, "height": 480}, [1])]
    for sensor, transform in bad:
        with pytest.raises(GeometryError):
            adapter_for(target, sensor, transform)


def test_source_addresses_are_checked_against_the_declared_sensor() -> None:
    a = build_adapter(S(640, 480), S(34, 34))
    with pytest.raises(EventError, match="declared source sensor, 640x480") as e:
        a.check_source(np.array([640]), np.array([0]), np.array([0]))
    assert e.value.code == "address_out_of_range"
    a.check_source(np.array([639]), np.array([479]), np.array([1]))


def test_geometry_imports_without_jax() -> None:
    code = ("import sys\nfor m in ('jax', 'flax', 'jaxlib'):\n    sys.modules[m] = None\n"
            "import evssm.models.geometry, evssm.server.api.protocol\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
