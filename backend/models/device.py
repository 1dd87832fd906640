"""What this machine computes on, in one line ("CPU" or "CUDA · NVIDIA H200"), cheaply.

The server process avoids importing torch (it starts fast and stays small), so when torch is not
imported yet the device comes from the NVIDIA driver's ``/proc/driver/nvidia/gpus/*/information``
and the installed torch build (a ``+cpu`` build cannot use a GPU). Once torch is imported (the
worker, ``generate``, ``doctor``) ``torch.cuda`` answers, without creating a CUDA context.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from pathlib import Path

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def nvidia_gpu_names(proc_dir: Path = NVIDIA_PROC) -> list[str]:
    """GPU model names the NVIDIA kernel driver reports (empty without the driver)."""
    names = []
    try:
        entries = sorted(proc_dir.iterdir())
    except OSError:
        return []
    for gpu in entries:
        try:
            for line in (gpu / "information").read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
        except OSError:
            continue
    return names


def _visible_index() -> int | None:
    """The first GPU ``CUDA_VISIBLE_DEVICES`` exposes: None when it hides every GPU, else an index."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is None:
        return 0
    first = vis.split(",")[0].strip()
    if first in ("", "-1"):
        return None
    return int(first) if first.isdigit() else 0


def _torch_is_cpu_build() -> bool:
    try:
        return "+cpu" in importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return True


@functools.lru_cache(maxsize=1)
def describe_device() -> str:
    """``"CPU"`` or ``"CUDA · <GPU name>"`` (with ``" ×N"`` when several GPUs are visible)."""
    index = _visible_index()
    if index is None:
        return "CPU"
    torch = sys.modules.get("torch")
    if torch is not None:
        if not torch.cuda.is_available():
            return "CPU"
        count = torch.cuda.device_count()
        names = nvidia_gpu_names()
        name = names[index] if index < len(names) else (
            torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else "GPU")
        return f"CUDA · {name}" + (f" ×{count}" if count > 1 else "")
    if _torch_is_cpu_build():
        return "CPU"
    names = nvidia_gpu_names()
    if not names:
        return "CPU"
    return f"CUDA · {names[index] if index < len(names) else names[0]}"


def has_cuda() -> bool:
    """True when the description says CUDA (no torch import when torch is not loaded yet)."""
    return describe_device().startswith("CUDA")
