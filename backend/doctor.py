"""``conjure-backend doctor``: what this machine has and what Conjure will run on it.

Sections: device (GPU, torch/CUDA versions, memory), CUDA toolkit (CUDA_HOME, nvcc, the cuBLAS /
cuSPARSE / cuSOLVER include folders the nvdiffrast build needs), extensions (gsplat, nvdiffrast:
installed, built, stale locks, and with ``--build`` the result of a real build + probe), models
(the Hugging Face cache and the catalogue) and "will run" (preset ``auto`` → preset, model, renderers).
"""

from __future__ import annotations

import importlib.util
import subprocess


def _nvcc_version(nvcc: str | None) -> str | None:
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else (out.strip().splitlines() or [None])[-1]


def collect_report(build: bool = False) -> dict:
    """Everything ``doctor`` prints, as a JSON-able dict. ``build=True`` builds/probes the extensions now."""
    import torch

    from backend import cuda_ext
    from backend.guidance.loader import resolve_model
    from backend.models import CATALOGUE, cached_models, describe_device, hub_cache_dir, is_present
    from backend.models.cache import human_size
    from backend.pipeline.presets import get_preset, resolve_preset_name

    cuda = torch.cuda.is_available()
    device = {"line": describe_device(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
              "gpus": []}
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            device["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                   "capability": f"{props.major}.{props.minor}"})
    tk = cuda_ext.toolkit_status()
    toolkit = {"cuda_home": tk.cuda_home, "nvcc": tk.nvcc, "nvcc_version": _nvcc_version(tk.nvcc),
               "headers": tk.headers, "extra_include_dirs": tk.include_dirs, "problem": tk.problem()}
    extensions = {}
    for name, spec in cuda_ext.EXTENSIONS.items():
        if name not in ("gsplat", "nvdiffrast"):
            continue
        bdir = cuda_ext.build_dir(spec)
        lock = bdir / "lock"
        ext = {"installed": importlib.util.find_spec(spec.package) is not None, "build_dir": str(bdir),
               "built": (bdir / f"{cuda_ext.build_name(spec)}.so").exists() or cuda_ext._has_prebuilt(spec),
               "lock": (("stale" if cuda_ext.is_stale(lock) else "held by a live build") if lock.exists() else None),
               "toolkit_problem": tk.problem(spec.headers)}
        if build:
            st = cuda_ext.ensure(name)
            ext["probe"] = {"state": st.state, "detail": st.detail, "seconds": st.seconds}
        extensions[name] = ext
    cached = cached_models()
    models = {"cache_dir": str(hub_cache_dir()),
              "cached": [{"id": m.id, "size": human_size(m.size_bytes), "licence": m.licence} for m in cached],
              "catalogue": [{"id": e.id, "present": is_present(e.id), "role": e.role} for e in CATALOGUE]}
    preset_name = resolve_preset_name("auto")
    preset = get_preset(preset_name)
    dev = torch.device("cuda" if cuda else "cpu")
    model, _reason = resolve_model(preset.guidance.model, dev)
    model_id = model if cuda or preset.guidance.model != "auto" else "conjure-solids"
    present = is_present(model_id)

    def renderer(name: str, twin: str) -> str:
        if not cuda:
            return f"{twin} (no CUDA)"
        ext = extensions[name]
        if build:
            return name if ext["probe"]["state"] == "ready" else f"{twin} ({ext['probe']['detail']})"
        if not ext["installed"]:
            return f"{twin} ({name} not installed)"
        if ext["built"]:
            return f"{name} (built; probed at start-up)"
        if ext["toolkit_problem"]:
            return f"{twin} ({name} not built and {ext['toolkit_problem']})"
        return f"{name} after a first build at start-up (the PyTorch twin until then)"

    gauss = renderer("gsplat", "PyTorch Gaussian renderer")
    mesh = renderer("nvdiffrast", "PyTorch rasteriser")
    both_torch = gauss.startswith("PyTorch") and mesh.startswith("PyTorch")
    will_run = {"preset": preset_name, "model": model_id, "model_present": present,
                "pull": None if present else f"conjure-backend models pull {model_id}",
                "gaussian_renderer": gauss, "rasterizer": mesh,
                "renderers": "PyTorch renderers" if both_torch else "CUDA renderers where ready"}
    return {"device": device, "toolkit": toolkit, "extensions": extensions, "models": models, "will_run": will_run}


def format_report(r: dict) -> str:
    """The report as plain text lines."""
    out = []
    d = r["device"]
    out.append(f"device: {d['line']}  (torch {d['torch']}, built for CUDA {d['torch_cuda'] or 'none: CPU build'})")
    for g in d["gpus"]:
        out.append(f"  GPU {g['name']}: {g['memory_gb']} GB, compute capability {g['capability']}")
    t = r["toolkit"]
    out.append(f"CUDA toolkit: CUDA_HOME={t['cuda_home'] or 'not found'}, nvcc={t['nvcc'] or 'not found'}"
               + (f" ({t['nvcc_version']})" if t["nvcc_version"] else ""))
    for h, where in t["headers"].items():
        out.append(f"  {h:<15} {where or 'MISSING'}")
    if t["extra_include_dirs"]:
        out.append(f"  (found in pip nvidia-* wheels; builds get them through CPATH: {', '.join(t['extra_include_dirs'])})")
    if t["problem"]:
        out.append(f"  problem: {t['problem']}")
    out.append("extensions:")
    for name, e in r["extensions"].items():
        state = "installed" if e["installed"] else "not installed"
        built = "built" if e["built"] else "not built"
        line = f"  {name:<11} {state}, {built} ({e['build_dir']})"
        if e["lock"]:
            line += f", build lock: {e['lock']}"
        out.append(line)
        if "probe" in e:
            p = e["probe"]
            out.append(f"    probe: {p['state']} - {p['detail']}")
    m = r["models"]
    out.append(f"models (cache {m['cache_dir']}):")
    for c in m["catalogue"]:
        out.append(f"  {c['id']:<46} {'present' if c['present'] else 'missing'}  {c['role']}")
    for c in m["cached"]:
        out.append(f"  cached: {c['id']} {c['size']} licence {c['licence'] or 'unknown'}")
    w = r["will_run"]
    out.append(f"will run (preset auto): preset {w['preset']}, model {w['model']} "
               f"({'present' if w['model_present'] else 'MISSING: ' + w['pull']}), {w['renderers']}")
    out.append(f"  Gaussians: {w['gaussian_renderer']}")
    out.append(f"  mesh:      {w['rasterizer']}")
    return "\n".join(out)
