"""Presets, dotted overrides with type coercion, and the one schedule helper."""

from __future__ import annotations

import dataclasses
import math

import pytest

from backend.pipeline.presets import (
    ANNEALED_RANGE_KEYS,
    FineConfig,
    Preset,
    get_preset,
    override_keys,
    parse_override,
    parse_overrides,
    preset_names,
)
from backend.schedule import anneal, step_ratio


def test_named_presets():
    assert set(preset_names()) >= {"draft", "standard", "high", "cpu"}
    assert get_preset("draft").fine is None  # coarse only
    for name in ("standard", "high", "cpu"):
        p = get_preset(name)
        assert isinstance(p, Preset) and isinstance(p.fine, FineConfig) and p.name == name
        assert p.object_size == 1.0
    assert get_preset("high").coarse.steps > get_preset("standard").coarse.steps > get_preset("cpu").coarse.steps
    assert get_preset("cpu").coarse.render_resolution <= 64


def test_presets_are_fresh_copies():
    a = get_preset("draft")
    a.coarse.steps = 1
    assert get_preset("draft").coarse.steps != 1


def test_overrides_coerce_types():
    p = get_preset("cpu", {"coarse.steps": "300", "guidance.cfg_scale": 50, "guidance.fp16": "false",
                           "coarse.elevation_range": "0, 30", "fine.vertex_offsets": "yes",
                           "guidance.model": "/some/folder", "object_size": "2", "seed": "none"})
    assert p.coarse.steps == 300 and p.guidance.cfg_scale == 50.0 and isinstance(p.guidance.cfg_scale, float)
    assert p.guidance.fp16 is False and p.fine.vertex_offsets is True
    assert p.coarse.elevation_range == (0.0, 30.0) and p.object_size == 2.0
    assert p.guidance.model == "/some/folder" and p.seed is None
    assert get_preset("draft", {"coarse.steps": 20.0}).coarse.steps == 20
    assert get_preset("standard", {"fine": "none"}).fine is None
    assert get_preset("draft", {"fine.steps": 5}).fine.steps == 5  # a fine field enables the fine stage


@pytest.mark.parametrize("name, overrides, message", [
    ("nope", {}, "unknown preset 'nope'"),
    ("draft", {"coarse.stepz": 1}, "unknown setting 'coarse.stepz'; did you mean coarse.steps?"),
    ("draft", {"coarsе.steps": 1}, "is not a section"),
    ("draft", {"coarse.steps": "many"}, "coarse.steps must be a whole number, got 'many'"),
    ("draft", {"coarse.steps": 10**9}, "coarse.steps must be between 1 and 20000, got 1000000000"),
    ("draft", {"guidance.cfg_scale": "nan"}, "guidance.cfg_scale must be a finite number, got 'nan'"),
    ("standard", {"fine.grid_resolution": 0}, "fine.grid_resolution must be between 8 and 512, got 0"),
    ("draft", {"coarse.steps": True}, "coarse.steps"),
    ("draft", {"guidance.fp16": "maybe"}, "guidance.fp16"),
    ("draft", {"coarse.elevation_range": "1,2,3"}, "coarse.elevation_range"),
    ("draft", {"coarse.steps": 0}, "coarse.steps"),
    ("draft", {"guidance.t_min": 0.9, "guidance.t_max": 0.5}, "guidance.t_min"),
    ("draft", {"coarse.renderer": "opengl"}, "coarse.renderer"),
    ("draft", {"object_size": -1}, "object_size"),
    ("draft", {"name": "x"}, "unknown setting 'name'"),
    ("draft", {"coarse": 3}, "unknown setting 'coarse'"),
    ("cpu", {"guidance.t_max_end": 0.4}, "guidance.t_max_end has no effect with guidance.t_sampling=dreamtime"),
    ("standard", {"guidance.t_anneal": "linear", "guidance.t_min_end": 0.1},
     "guidance.t_anneal, guidance.t_min_end have no effect"),
])
def test_bad_overrides_name_the_key(name, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_preset(name, overrides)


def test_cli_override_parsing():
    assert parse_override("coarse.steps=300") == ("coarse.steps", "300")
    assert parse_override("guidance.negative_prompt=a=b") == ("guidance.negative_prompt", "a=b")
    assert parse_overrides(["coarse.steps=1", "coarse.steps=2"]) == {"coarse.steps": "2"}
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("coarse.steps")
    keys = override_keys()
    assert "coarse.steps" in keys and "fine.texture_resolution" in keys and "guidance.cfg_scale" in keys
    assert "object_size" in keys
    for key in keys:  # every advertised key is accepted
        p = get_preset("standard")
        obj = p
        for part in key.split(".")[:-1]:
            obj = getattr(obj, part)
        value = getattr(obj, key.split(".")[-1])
        # the annealed range's keys need the sampling that reads them
        extra = {"guidance.t_sampling": "random"} if key in ANNEALED_RANGE_KEYS else {}
        get_preset("standard", {key: value, **extra})
    annealed = get_preset("cpu", {"guidance.t_sampling": "random", "guidance.t_max_end": 0.4}).guidance
    assert annealed.t_sampling == "random" and annealed.t_max_end == 0.4


def test_every_field_is_overridable():
    p = get_preset("standard")
    for section in ("coarse", "fine", "guidance"):
        for f in dataclasses.fields(getattr(p, section)):
            assert f"{section}.{f.name}" in override_keys(p)


def test_schedule_kinds():
    assert anneal(1.0, 0.0, 0.5) == 0.5
    assert anneal(0.98, 0.5, 0.0, "sqrt") == 0.98 and anneal(0.98, 0.5, 1.0, "sqrt") == 0.5
    assert math.isclose(anneal(0.98, 0.5, 0.25, "sqrt"), 0.98 - 0.48 * 0.5)
    assert math.isclose(anneal(1e-3, 1e-5, 0.5, "exp"), 1e-4)
    assert math.isclose(anneal(0.0, 1.0, 0.5, "cosine"), 0.5)
    assert anneal(3.0, 7.0, 0.3, "constant") == 3.0
    assert anneal(1.0, 2.0, 0.49, "step", finish=0.5) == 1.0 and anneal(1.0, 2.0, 0.5, "step", finish=0.5) == 2.0
    assert anneal(64, 128, 0.25, "linear", finish=0.5) == 96 and anneal(64, 128, 0.9, "linear", finish=0.5) == 128
    assert anneal(0, 10, 2.0) == 10 and anneal(0, 10, -1.0) == 0  # clamped
    with pytest.raises(ValueError, match="unknown schedule kind"):
        anneal(0, 1, 0.5, "bogus")
    with pytest.raises(ValueError, match="positive"):
        anneal(0.0, 1.0, 0.5, "exp")
    assert step_ratio(0, 10) == 0.0 and step_ratio(9, 10) == 1.0 and step_ratio(0, 1) == 1.0
