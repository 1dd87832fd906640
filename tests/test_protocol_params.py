"""Generation parameters: defaults, and a clear error naming the field for each bad value."""

import pytest

from protocol import GenerationParams, ProtocolError, Session, validate_params


def test_defaults_and_stripping():
    p = validate_params({"prompt": "  a wooden chair  "})
    assert p == GenerationParams(prompt="a wooden chair", negative_prompt="", seed=None, preset="auto",
                                 overrides={})
    full = validate_params({"prompt": "x", "negative_prompt": "blurry", "seed": 2**32 - 1, "preset": "draft",
                            "overrides": {"coarse.steps": 300, "fine.lr": 0.01, "mesh.uv": True, "a.b": "c"}})
    assert full.seed == 2**32 - 1 and full.overrides["coarse.steps"] == 300
    assert validate_params(full) == full


@pytest.mark.parametrize("params,field", [
    ("a string", "params"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \u3000 "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "line\nbreak"}, "prompt"),
    ({"prompt": "bell\x07"}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "ok", "negative_prompt": "\x00"}, "negative_prompt"),
    ({"prompt": "ok", "negative_prompt": None}, "negative_prompt"),
    ({"prompt": "ok", "seed": -1}, "seed"),
    ({"prompt": "ok", "seed": 2**32}, "seed"),
    ({"prompt": "ok", "seed": 1.5}, "seed"),
    ({"prompt": "ok", "seed": True}, "seed"),
    ({"prompt": "ok", "seed": "7"}, "seed"),
    ({"prompt": "ok", "preset": "../etc"}, "preset"),
    ({"prompt": "ok", "preset": ""}, "preset"),
    ({"prompt": "ok", "preset": "Standard"}, "preset"),
    ({"prompt": "ok", "preset": 3}, "preset"),
    ({"prompt": "ok", "overrides": []}, "overrides"),
    ({"prompt": "ok", "overrides": {"Coarse.Steps": 1}}, "overrides"),
    ({"prompt": "ok", "overrides": {"coarse..steps": 1}}, "overrides"),
    ({"prompt": "ok", "overrides": {"a.b": [1]}}, "overrides.a.b"),
    ({"prompt": "ok", "overrides": {"a.b": None}}, "overrides.a.b"),
    ({"prompt": "ok", "overrides": {"a.b": float("nan")}}, "overrides.a.b"),
    ({"prompt": "ok", "overrides": {"a.b": 2**60}}, "overrides.a.b"),
    ({"prompt": "ok", "overrides": {"a.b": "x" * 300}}, "overrides.a.b"),
    ({"prompt": "ok", "overrides": {f"k.v{i}": i for i in range(65)}}, "overrides"),
    ({"prompt": "ok", "output_path": "/tmp/x"}, "output_path"),
])
def test_each_error_names_its_field(params, field):
    with pytest.raises(ProtocolError) as e:
        validate_params(params)
    assert e.value.code == "invalid_params"
    assert e.value.field == field
    assert field in str(e.value)


def test_submit_content_is_validated_on_both_ends():
    s = Session(b"key")
    job = "12345678-1234-4234-8234-123456789abc"
    with pytest.raises(ProtocolError) as e:
        s.serialize(s.msg("submit", {"params": {"prompt": "ok", "seed": -3}}, job_id=job))
    assert e.value.code == "invalid_params" and e.value.field == "params.seed"
    with pytest.raises(ProtocolError) as e:
        s.serialize(s.msg("submit", {"params": {"prompt": "ok"}}))
    assert e.value.code == "bad_header" and e.value.field == "job_id"


def test_sender_side_header_checks():
    s = Session(b"key")
    for kw in ({"seq": -1}, {"job_id": "not-a-uuid"}, {"session": "bad id with spaces"}):
        msg = s.msg("ping", {})
        for k, v in kw.items():
            setattr(msg, k, v)
        with pytest.raises(ProtocolError) as e:
            s.serialize(msg)
        assert e.value.code == "bad_header"
    with pytest.raises(ProtocolError) as e:
        s.serialize(s.msg("teleport", {}))
    assert e.value.code == "unknown_msg_type"
