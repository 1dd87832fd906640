"""Menus filled from what the connected backend reports (``hello_reply``): presets and models.

The add-on keeps no copy of the backend's preset or model lists. Enum items are built from
``hello_reply.presets`` and ``hello_reply.models`` ({"id", "name", "present"}); each item has a
stable number (a CRC of its identifier), so a stored choice survives the list changing or
arriving later. Blender needs the item strings to stay referenced, so built lists are cached.
"""

import zlib

from .runtime import RUNTIME

#: The menu entry that means "let someone else decide" (the preference, or the backend's default).
DEFAULT_ID = "DEFAULT"
AUTO_PRESET = "auto"
_CACHE = {}


def stable_number(identifier):
    """A stable enum number for ``identifier`` (0 is kept for the DEFAULT/auto entry)."""
    if identifier in (DEFAULT_ID, AUTO_PRESET):
        return 0
    return 1 + zlib.crc32(identifier.encode("utf-8")) % (2**31 - 2)


def server_info():
    """The backend's ``hello_reply`` content, or {} when not connected."""
    client = RUNTIME.client
    return client.server_info if client is not None else {}


def backend_presets():
    """Preset names the backend accepts (``auto`` first), or just ``auto`` when not connected."""
    names = [p for p in server_info().get("presets") or [] if isinstance(p, str)]
    return [AUTO_PRESET] + [p for p in names if p != AUTO_PRESET]


def backend_models():
    """The backend's models as dicts {"id", "name", "present"} (empty when it reports none)."""
    out = []
    for m in server_info().get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
            out.append({"id": m["id"], "name": str(m.get("name") or m["id"]), "present": m.get("present", True)})
        elif isinstance(m, str) and m:
            out.append({"id": m, "name": m, "present": True})
    return out


def default_model_name():
    """The backend's default model id ("" when unknown)."""
    model = server_info().get("model")
    return model if isinstance(model, str) else ""


def _cached(key, items):
    items = tuple(items)
    _CACHE[key] = items  # keep the strings alive while Blender holds the enum
    return list(items)


def _preset_item(name):
    if name == AUTO_PRESET:
        desc = "Let the backend choose (the standard preset on a CUDA GPU, its CPU preset otherwise)"
    else:
        desc = "The backend's '%s' preset" % name
    return (name, name.capitalize() if name != "cpu" else "CPU", desc, "NONE", stable_number(name))


def preset_items_with_default(_self, _context):
    """Scene menu: "Default" (the preference) then the backend's presets."""
    items = [(DEFAULT_ID, "Default", "The default preset from the add-on preferences", "NONE", 0)]
    items += [_preset_item(p) for p in backend_presets() if p != AUTO_PRESET]
    items.append(_preset_item(AUTO_PRESET)[:4] + (stable_number("auto-explicit"),))
    return _cached("scene_presets", items)


def preset_items(_self, _context):
    """Preference menu: the backend's presets (``auto`` first)."""
    return _cached("presets", [_preset_item(p) for p in backend_presets()])


def model_items(_self, _context):
    """Scene menu: "Default" (the backend's default model) then the models it lists."""
    default = default_model_name()
    items = [(DEFAULT_ID, "Default" + (" (%s)" % default if default else ""),
              "The backend's default model", "NONE", 0)]
    for m in backend_models():
        label = m["name"] + ("" if m["present"] else " (not downloaded)")
        items.append((m["id"], label, "Generate with %s" % m["id"], "NONE", stable_number(m["id"])))
    return _cached("models", items)
