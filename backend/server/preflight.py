"""Checks that run in the server process before a job reaches the worker (no torch unless needed).

- :func:`params_checker` returns the function that validates a preset name + overrides for the
  configured pipeline: ``backend.pipeline.presets.get_preset`` for the real pipeline, or the
  pipeline module's own ``check_params(preset, overrides)`` (tests' fake pipeline).
- :func:`gpu_requirements` / :func:`check_gpu` find what a preset demands (``renderer="gsplat"``,
  ``rasterizer="nvdiffrast"``, ``device="cuda"``) and whether this machine has it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable

from .worker import DEFAULT_PIPELINE

REAL_PIPELINE_MODULE = DEFAULT_PIPELINE.split(":", 1)[0]

#: value found in a preset field -> (python package to import, what it is, pip hint)
_GPU_VALUES = {
    "gsplat": ("gsplat", "the gsplat CUDA Gaussian renderer", "pip install 'conjure[gpu]'"),
    "nvdiffrast": ("nvdiffrast", "the nvdiffrast CUDA rasteriser", "pip install 'conjure[gpu]'"),
    "cuda": (None, "a CUDA device", None),
}


class PreflightError(ValueError):
    """A preset that cannot run here, with a message that says why and what to do."""


def params_checker(pipeline_spec: str) -> Callable[[str, dict], object]:
    """``check(preset_name, overrides)``; raises ``ValueError`` with a clear message when invalid."""
    module_name = pipeline_spec.split(":", 1)[0]
    if module_name == REAL_PIPELINE_MODULE:
        def check(preset: str, overrides: dict):
            from backend.pipeline.presets import AUTO_PRESET, get_preset
            from protocol import ProtocolError
            from protocol.params import coerce_overrides

            try:  # every key known, typed, in its documented range; guidance.model never a path
                coerce_overrides(overrides)
            except ProtocolError as exc:
                raise PreflightError(exc.message) from None
            if preset == AUTO_PRESET:  # resolved here without importing torch (the worker uses torch)
                preset = "standard" if cuda_probably_available() else "cpu"
            p = get_preset(preset, overrides)
            check_gpu(p)
            return p
        return check
    module = importlib.import_module(module_name)
    fn = getattr(module, "check_params", None)
    if fn is None:
        return lambda preset, overrides: None
    return fn


def cuda_probably_available() -> bool:
    """Whether ``torch.cuda.is_available()`` would be True, found without importing torch (which
    costs the control loop 0.7-2.4 s and ~190 MB): torch is installed with a CUDA or ROCm build
    (its ``version.py`` read as text), ``CUDA_VISIBLE_DEVICES`` does not hide every device, and the
    kernel driver shows a GPU (``/proc/driver/nvidia/gpus/*``, ``/dev/nvidia[0-9]*`` or ``/dev/kfd``).

    Used only to pick what preset ``auto`` means for checks at submit; the worker resolves it
    with torch itself. Unverified on a ROCm machine.
    """
    import glob
    import os
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read()
    except OSError:
        return False
    cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    hip = re.search(r"^hip\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if not (cuda or hip):
        return False  # a CPU-only build
    visible = os.environ.get("HIP_VISIBLE_DEVICES" if hip and not cuda else "CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if cuda:
        return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))
    return os.path.exists("/dev/kfd")


def gpu_requirements(preset) -> list[tuple[str, str]]:
    """``[(dotted field, value)]`` of preset fields that demand GPU-only packages or CUDA."""
    found: list[tuple[str, str]] = []

    def walk(obj, prefix):
        if not dataclasses.is_dataclass(obj):
            return
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, str) and value in _GPU_VALUES:
                if value != "cuda" or f.name in ("device", "backend"):
                    found.append((key, value))

    walk(preset, "")
    return found


def check_gpu(preset) -> None:
    """Raise ``PreflightError`` (a ``ValueError``) if the preset needs GPU pieces this machine lacks."""
    needs = gpu_requirements(preset)
    if not needs:
        return
    name = getattr(preset, "name", "?")
    for key, value in needs:
        package, what, hint = _GPU_VALUES[value]
        if package is not None and importlib.util.find_spec(package) is None:
            raise PreflightError(f"preset {name!r} sets {key}={value!r}, which needs {what}, but the "
                                 f"'{package}' package is not installed ({hint}); or use "
                                 f"--set {key}=auto / the 'cpu' preset")
    import torch  # only when a preset demands CUDA

    if not torch.cuda.is_available():
        key, value = needs[0]
        raise PreflightError(f"preset {name!r} sets {key}={value!r}, which needs a CUDA GPU, but torch "
                             f"{torch.__version__} sees none; use the 'cpu' preset or --set {key}=auto")

