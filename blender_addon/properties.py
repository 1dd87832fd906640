"""Scene-level generation settings (``scene.conjure``) and how they become request parameters.

``ADVANCED_OVERRIDES`` is the one table mapping panel settings to the backend's dotted
preset keys (``backend/pipeline/presets.py``); a setting is sent only when its checkbox is on,
so the preset's own value applies otherwise.
"""

import random

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .client import ConjureError

PRESETS = (
    ("auto", "Auto", "Standard where the backend has a CUDA GPU, CPU otherwise"),
    ("draft", "Draft", "Fast, coarse shape and a small texture (about a minute on a GPU)"),
    ("standard", "Standard", "The usual quality/speed balance"),
    ("high", "High", "More steps and a larger texture"),
    ("cpu", "CPU", "Small settings that finish on a machine without a GPU"),
)
PRESET_ITEMS = (("DEFAULT", "Default", "The default preset from the add-on preferences"),) + PRESETS

#: (property, override key, label) — the only place panel settings meet preset paths.
ADVANCED_OVERRIDES = (
    ("guidance_scale", "guidance.cfg_scale", "Guidance Scale"),
    ("steps", "coarse.steps", "Steps"),
    ("texture_resolution", "fine.texture_resolution", "Texture Size"),
    ("iso_threshold", "coarse.density_threshold", "Iso Threshold"),
)

SEED_MAX = 2**31 - 1  # Blender int properties are 32-bit signed


def parse_extra_overrides(text):
    """``"a.b=1; c.d=0.5, e.f=true"`` -> {"a.b": 1, "c.d": 0.5, "e.f": True}. Strings stay strings."""
    out = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConjureError("invalid_params", "Extra override %r must look like key=value" % item)
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        try:
            out[key] = int(value)
            continue
        except ValueError:
            pass
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


class ConjureSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a carved wooden treasure chest'",
                           default="", maxlen=1000)
    negative_prompt: StringProperty(name="Negative", description="What to avoid, e.g. 'blurry, flat'",
                                    default="", maxlen=1000)
    seed: IntProperty(name="Seed", description="Same seed + same settings = the same result",
                      default=0, min=0, max=SEED_MAX)
    random_seed: BoolProperty(name="Random", description="Pick a new seed for every generation", default=True)
    preset: EnumProperty(name="Preset", items=PRESET_ITEMS, default="DEFAULT",
                         description="Quality/speed preset of the backend pipeline")
    show_advanced: BoolProperty(name="Advanced", default=False)

    use_guidance_scale: BoolProperty(name="Guidance Scale", default=False,
                                     description="Override the preset's classifier-free guidance scale")
    guidance_scale: FloatProperty(name="Guidance Scale", default=100.0, min=1.0, max=200.0, soft_max=150.0,
                                  description="How strongly the prompt steers the shape (SDS uses ~100)")
    use_steps: BoolProperty(name="Steps", default=False, description="Override the coarse stage's step count")
    steps: IntProperty(name="Steps", default=500, min=10, max=10000, soft_max=2000,
                       description="Optimisation steps of the coarse (Gaussian) stage")
    use_texture_resolution: BoolProperty(name="Texture Size", default=False,
                                         description="Override the texture resolution of the final mesh")
    texture_resolution: EnumProperty(name="Texture Size", default="1024", items=(
        ("512", "512", ""), ("1024", "1024", ""), ("2048", "2048", ""), ("4096", "4096", "")))
    use_iso_threshold: BoolProperty(name="Iso Threshold", default=False,
                                    description="Override the density level where the surface is extracted")
    iso_threshold: FloatProperty(name="Iso Threshold", default=0.5, min=0.01, max=10.0, soft_max=2.0,
                                 description="Density level of the extracted surface (lower = fuller shapes)")
    extra_overrides: StringProperty(
        name="Extra", default="",
        description="More preset overrides as key=value pairs separated by ';', e.g. 'fine.steps=200'")


def settings_to_request(settings, default_preset="auto"):
    """Scene settings -> keyword arguments of ``Client.submit`` (prompt, seed, preset, overrides).

    Picks a fresh seed (and writes it back) when ``random_seed`` is on, so the seed shown in
    the panel is the one used. Raises ``ConjureError('invalid_params')`` for an empty prompt.
    """
    prompt = " ".join(settings.prompt.split())
    if not prompt:
        raise ConjureError("invalid_params", "Type a prompt first (e.g. 'a red wooden chair').")
    if settings.random_seed:
        settings.seed = random.randint(0, SEED_MAX)
    overrides = {}
    for prop, key, _label in ADVANCED_OVERRIDES:
        if getattr(settings, "use_" + prop):
            value = getattr(settings, prop)
            overrides[key] = int(value) if prop == "texture_resolution" else value
    overrides.update(parse_extra_overrides(settings.extra_overrides))
    preset = default_preset if settings.preset == "DEFAULT" else settings.preset
    return {"prompt": prompt, "negative_prompt": settings.negative_prompt.strip(), "seed": int(settings.seed),
            "preset": preset, "overrides": overrides}


classes = (ConjureSettings,)


def register():
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.conjure = PointerProperty(type=ConjureSettings)


def unregister():
    del bpy.types.Scene.conjure
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
