"""Scene-level generation settings (``scene.conjure``) and how they become request parameters.

``ADVANCED_OVERRIDES`` is the one table mapping panel settings to the backend's dotted
preset keys (``backend/pipeline/presets.py``); a setting is sent only when its checkbox is on,
so the preset's own value applies otherwise.
"""

import random

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import choices
from .client import ConjureError
from .protocol import ProtocolError

#: (property, override key, label) — the only place panel settings meet preset paths.
ADVANCED_OVERRIDES = (
    ("guidance_scale", "guidance.cfg_scale", "Guidance"),
    ("steps", "coarse.steps", "Steps"),
    ("texture_resolution", "fine.texture_resolution", "Texture"),
    ("iso_threshold", "coarse.density_threshold", "Iso Level"),
)

#: Seeds the panel and the headless API accept: Blender int properties are 32-bit signed, so
#: both stop at 2**31 - 1 (the protocol itself allows up to 2**32 - 1, e.g. from the CLI).
SEED_MAX = 2**31 - 1

#: Example prompts that every model can make (the bundled prior knows a few shapes and colours).
EXAMPLE_PROMPTS = ("a red cube", "a blue torus", "a yellow cone", "a green cylinder")
_COLOUR_WORDS = ("red", "blue", "green", "yellow", "orange", "purple", "white", "black", "pink", "brown", "grey")
_SHAPE_WORDS = ("cube", "torus", "sphere", "cone", "cylinder", "pyramid")


def example_prompts(vocabulary=None):
    """Prompts the running model can make: built from its ``vocabulary`` (a closed-vocabulary
    model such as the bundled prior ``conjure-solids``), else ``EXAMPLE_PROMPTS``."""
    words = {w.lower() for w in vocabulary or () if isinstance(w, str)}
    colours = [c for c in _COLOUR_WORDS if c in words]
    shapes = [s for s in _SHAPE_WORDS if s in words]
    if not words or not colours or not shapes:
        return EXAMPLE_PROMPTS
    return tuple("a %s %s" % (colours[i % len(colours)], shapes[i % len(shapes)]) for i in range(4))


#: Words that carry no meaning of their own in a prompt (hidden from the vocabulary shown).
_FILLER_WORDS = ("a", "an", "the", "of", "one", "single", "solid", "3d", "object", "view")


def vocabulary_groups(vocabulary):
    """[(title, words)] for showing a closed vocabulary: shapes, colours, then other words."""
    words = sorted({w.lower() for w in vocabulary or () if isinstance(w, str)} - set(_FILLER_WORDS))
    shapes = [w for w in words if w in _SHAPE_WORDS]
    colours = [w for w in words if w in _COLOUR_WORDS]
    other = [w for w in words if w not in shapes and w not in colours]
    return [(t, ws) for t, ws in (("Shapes", shapes), ("Colours", colours), ("Also", other)) if ws]


def parse_extra_overrides(text, *, strict=True):
    """``"a.b=1; c.d=0.5"`` -> {"a.b": 1, "c.d": 0.5} through the shared parser (``protocol.params``:
    ranges, types, and for an unknown key the nearest known ones). ``strict=False`` keeps keys the
    table does not know (a backend running another pipeline checks its own). A bad entry raises
    ``ConjureError('invalid_params')`` with the parser's message, e.g. "coarse.steps must be a
    whole number, got 'abc'"."""
    from .protocol.params import (
        OVERRIDE_SPECS,
        coerce_overrides,
        parse_literal,
        parse_override_text,
        suggest_key,
    )

    try:
        raw = parse_override_text(text)
        out = coerce_overrides(raw, unknown="error" if strict else "keep")
        sections = {k.split(".", 1)[0] for k in OVERRIDE_SPECS}
        for key in raw:
            if key not in OVERRIDE_SPECS:
                if key.split(".", 1)[0] in sections:  # a real section with a misspelt field
                    raise ProtocolError("bad_params", suggest_key(key, OVERRIDE_SPECS))
                out[key] = parse_literal(raw[key])  # another pipeline's key: true/false, number or text
        return out
    except ProtocolError as e:
        raise ConjureError("invalid_params", e.message) from None


class ConjureSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a red cube' or 'a blue torus'",
                           default="", maxlen=1000)
    negative_prompt: StringProperty(name="Negative", description="What to avoid, e.g. 'green'",
                                    default="", maxlen=1000)
    seed: IntProperty(name="Seed", description="Same seed + same settings = the same result",
                      default=0, min=0, max=SEED_MAX)
    random_seed: BoolProperty(name="Random", description="Pick a new seed for every generation", default=True)
    preset: EnumProperty(name="Preset", items=choices.preset_items_with_default, default=0,
                         description="Quality/speed preset of the backend pipeline")
    model: EnumProperty(name="Model", items=choices.model_items, default=0,
                        description="The guidance model the backend uses (the list comes from the backend)")
    object_size: FloatProperty(name="Size", default=1.0, min=0.01, max=1000.0, soft_min=0.1, soft_max=10.0,
                               unit="LENGTH", subtype="DISTANCE",
                               description="Largest dimension of the new object in metres; its base "
                                           "rests on the 3D cursor")
    show_advanced: BoolProperty(name="Advanced", default=False)
    show_vocabulary: BoolProperty(name="Show Vocabulary", default=True,
                                  description="List the words the running model knows")

    use_guidance_scale: BoolProperty(name="Guidance", default=False,
                                     description="Override the preset's classifier-free guidance scale")
    guidance_scale: FloatProperty(name="Guidance Scale", default=100.0, min=1.0, max=200.0, soft_max=150.0,
                                  description="How strongly the prompt steers the shape (SDS uses ~100)")
    use_steps: BoolProperty(name="Steps", default=False, description="Override the shaping stage's step count")
    steps: IntProperty(name="Steps", default=500, min=10, max=10000, soft_max=2000,
                       description="Optimisation steps of the shaping (coarse, Gaussian) stage")
    use_texture_resolution: BoolProperty(name="Texture", default=False,
                                         description="Override the texture resolution of the final mesh")
    texture_resolution: EnumProperty(name="Texture Size", default="1024", items=(
        ("512", "512", ""), ("1024", "1024", ""), ("2048", "2048", ""), ("4096", "4096", "")))
    use_iso_threshold: BoolProperty(name="Iso Level", default=False,
                                    description="Override the density level where the surface is extracted")
    iso_threshold: FloatProperty(name="Iso Threshold", default=0.5, min=0.01, max=10.0, soft_max=2.0,
                                 description="Density level of the extracted surface (lower = fuller shapes)")
    extra_overrides: StringProperty(
        name="Extra", default="",
        description="More preset overrides as key=value pairs separated by ';', e.g. 'coarse.steps=200'")


def settings_to_request(settings, default_preset="auto", vocabulary=None, *, strict=True):
    """Scene settings -> keyword arguments of ``Client.submit`` (prompt, seed, preset, overrides).

    Picks a fresh seed (and writes it back) when ``random_seed`` is on, so the seed shown in
    the panel is the one used. The size goes as the ``object_size`` override (metres), a model
    other than the default as ``guidance.model``. Raises ``ConjureError('invalid_params')`` for
    an empty prompt (suggesting a prompt the running model can make) or a bad Extra entry
    (``strict``: unknown keys are errors too, see ``parse_extra_overrides``).
    """
    prompt = " ".join(settings.prompt.split())
    if not prompt:
        raise ConjureError("invalid_params", "Type a prompt first (e.g. '%s')." % example_prompts(vocabulary)[0])
    overrides = {}
    for prop, key, _label in ADVANCED_OVERRIDES:
        if getattr(settings, "use_" + prop):
            value = getattr(settings, prop)
            overrides[key] = int(value) if prop == "texture_resolution" else value
    overrides["object_size"] = round(float(settings.object_size), 6)
    model = settings.model
    if model and model != choices.DEFAULT_ID:
        overrides["guidance.model"] = model
    overrides.update(parse_extra_overrides(settings.extra_overrides, strict=strict))
    if settings.random_seed:
        settings.seed = random.randint(0, SEED_MAX)
    preset = settings.preset
    if not preset or preset == choices.DEFAULT_ID:
        preset = default_preset or choices.AUTO_PRESET
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
