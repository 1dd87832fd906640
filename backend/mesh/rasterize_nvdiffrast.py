"""nvdiffrast backend of the mesh rasteriser (CUDA only, no OpenGL: ``RasterizeCudaContext``).

Same signatures and conventions as ``rasterize_torch`` (see ``backend/mesh/rasterize.py``).
nvdiffrast comes from the pip package ``diffrp-nvdiffrast`` (import name ``nvdiffrast``),
which compiles its CUDA kernels on first use.
"""

from __future__ import annotations

import threading

import torch

_contexts: dict[int, object] = {}
_lock = threading.Lock()


def is_available() -> bool:
    """True when CUDA is present and ``nvdiffrast.torch`` imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:  # ImportError, or a build failure of the extension
        return False
    return True


def _dr():
    try:
        import nvdiffrast.torch as dr
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("the nvdiffrast backend needs `pip install diffrp-nvdiffrast` and CUDA") from exc
    return dr


def get_context(device: torch.device):
    """One ``RasterizeCudaContext`` per CUDA device, created lazily and reused."""
    if device.type != "cuda":
        raise RuntimeError(f"nvdiffrast needs CUDA tensors, got device {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        ctx = _contexts.get(index)
        if ctx is None:
            ctx = _dr().RasterizeCudaContext(device=torch.device("cuda", index))
            _contexts[index] = ctx
    return ctx


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """(B, V, 4) or (V, 4) clip positions, (F, 3) indices → rast (B, H, W, 4) (u, v, z/w, id + 1)."""
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    ctx = get_context(pos.device)
    rast, _ = _dr().rasterize(ctx, pos.float().contiguous(), tri.to(torch.int32).contiguous(),
                              resolution=[int(resolution[0]), int(resolution[1])], grad_db=False)
    return rast


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(V, C) or (B, V, C) attributes → (B, H, W, C)."""
    if attr.ndim == 2:
        attr = attr.unsqueeze(0)
    out, _ = _dr().interpolate(attr.float().contiguous(), rast, tri.to(torch.int32).contiguous())
    return out


def rasterize_with_db(pos: torch.Tensor, tri: torch.Tensor,
                      resolution: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``rasterize`` plus ``rast_db`` (B, H, W, 4) barycentric screen derivatives (grad_db=True)."""
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    ctx = get_context(pos.device)
    return _dr().rasterize(ctx, pos.float().contiguous(), tri.to(torch.int32).contiguous(),
                           resolution=[int(resolution[0]), int(resolution[1])], grad_db=True)


def interpolate_da(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                   rast_db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``interpolate`` plus the attributes' screen-space derivatives (B, H, W, 2C)."""
    if attr.ndim == 2:
        attr = attr.unsqueeze(0)
    return _dr().interpolate(attr.float().contiguous(), rast, tri.to(torch.int32).contiguous(),
                             rast_db=rast_db, diff_attrs="all")


def texture(tex: torch.Tensor, uv: torch.Tensor, filter_mode: str = "linear",
            boundary_mode: str = "clamp", uv_da: torch.Tensor | None = None,
            max_mip_level: int | None = None) -> torch.Tensor:
    """(B, Ht, Wt, C) texture sampled at (B, H, W, 2) UVs (v = 0 is the first texture row);
    'linear-mipmap-linear' needs ``uv_da`` (B, H, W, 4) (see ``rasterize_torch.texture``)."""
    if tex.ndim == 3:
        tex = tex.unsqueeze(0)
    if filter_mode not in ("linear", "nearest", "linear-mipmap-linear"):
        raise ValueError(f"filter_mode must be 'linear', 'nearest' or 'linear-mipmap-linear', got {filter_mode!r}")
    if tex.shape[0] == 1 and uv.shape[0] > 1:
        tex = tex.expand(uv.shape[0], -1, -1, -1)
    if filter_mode == "linear-mipmap-linear":
        if uv_da is None:
            raise ValueError("filter_mode 'linear-mipmap-linear' needs uv_da (B, H, W, 4)")
        return _dr().texture(tex.float().contiguous(), uv.float().contiguous(), uv_da=uv_da.float().contiguous(),
                             filter_mode=filter_mode, boundary_mode=boundary_mode,
                             max_mip_level=max_mip_level)
    return _dr().texture(tex.float().contiguous(), uv.float().contiguous(), filter_mode=filter_mode,
                         boundary_mode=boundary_mode)
