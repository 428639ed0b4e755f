"""Causal self-attention behind named backends, with availability checks that say why not.

Layout everywhere: q is (B, T, H, D), k and v are (B, T, Hkv, D) with H % Hkv == 0
(grouped-query attention: query head h reads kv head h // (H // Hkv)); the result is
(B, T, H, D) in q's dtype.

Backends:

* ``fa3``: FlashAttention-3 (module ``flash_attn_interface`` with its compiled operators
  ``torch.ops.flash_attn_3``), Hopper (sm90) only. Not on the package index: build it with
  ``scripts/build_fa3.sh``. A module of that name without the operators (such as a stand-in
  that routes to SDPA) is reported unavailable, never run as FA3. On an H200 at the
  record's shape its fwd+bwd is 1.11x sdpa_cudnn's speed and 1.68x sdpa_flash's.
* ``fa2``: FlashAttention-2 (package ``flash_attn``), sm80+.
* ``sdpa_flash``: torch SDPA restricted to its FLASH_ATTENTION kernel (FlashAttention-2).
* ``sdpa_cudnn``: torch SDPA restricted to its CUDNN_ATTENTION kernel (cuDNN 9 fused
  attention; on H100 it is about 1.55x faster than FA2 at the record's shape).
* ``sdpa``: plain torch SDPA, torch picks the kernel (the CPU path; works everywhere).
* ``math``: the reference, softmax(q k^T / sqrt(D) + causal mask) v computed explicitly in
  float32; slow, any device.
* ``auto`` (only for `resolve_backend`): on CUDA the first available backend of the
  order measured fastest for the device (`_auto_order`), elsewhere sdpa.

GQA: FA2/FA3 take fewer kv heads natively. SDPA's ``enable_gqa`` (torch >= 2.5) is
honoured by the flash kernel (CUDA and CPU) and, since torch 2.8, by the cuDNN kernel
(before 2.5 / 2.8 k and v are expanded with repeat_interleave instead). The
memory-efficient kernel does not take GQA in torch 2.11, so plain ``sdpa`` with float32
CUDA inputs falls back to torch's math kernel for GQA shapes (correct, slow).

`available_backends` reports for every backend "available" or the reason it is not;
`resolve_backend` turns a name (or "auto") into an available backend and raises
`InputError` naming the backend and the reason otherwise, never falling back silently.
`math_reference` gives the float32 output and gradients that the fused kernels are
validated against (tests, benchmarks/attention_bench.py).
`attention` runs an already-resolved backend and is torch.compile(fullgraph=True)
friendly: it keeps no state, and the SDPA kernel choice is a ``sdpa_kernel`` context,
which dynamo traces.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmcore.errors import InputError

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = None  # type: ignore[assignment,misc]
    sdpa_kernel = None  # type: ignore[assignment]

__all__ = [
    "AVAILABLE",
    "BACKENDS",
    "CUDA_BACKENDS",
    "attention",
    "available_backends",
    "math_attention",
    "math_reference",
    "resolve_backend",
]

BACKENDS: tuple[str, ...] = ("fa3", "fa2", "sdpa_flash", "sdpa_cudnn", "sdpa", "math")
CUDA_BACKENDS: tuple[str, ...] = ("fa3", "fa2", "sdpa_flash", "sdpa_cudnn")
AVAILABLE = "available"
_LOWP = (torch.bfloat16, torch.float16)


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):  # pragma: no cover - unusual version strings
        return (0, 0)


_TORCH = _torch_version()
# First torch version whose SDPA kernel accepts enable_gqa=True (else: repeat_interleave).
_SDPA_GQA_SINCE: dict[str, tuple[int, int]] = {
    "sdpa": (2, 5),
    "sdpa_flash": (2, 5),
    "sdpa_cudnn": (2, 8),
}
_SDPA_NATIVE_GQA: dict[str, bool] = {k: _TORCH >= v for k, v in _SDPA_GQA_SINCE.items()}

# FlashAttention entry points, loaded by `available_backends` / on first use.
_FA_MODULES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}
_FA_FUNCS: dict[str, Callable[..., Any]] = {}


# ---------------------------------------------------------------------------- kernels


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, T, H, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(want q (B, T, H, D), k and v (B, T, Hkv, D))"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference causal attention in float32 (explicit scores, mask and softmax)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = q.float().reshape(B, T, Hkv, g, D).permute(0, 2, 3, 1, 4)  # B, Hkv, g, T, D
        kf = k.float().permute(0, 2, 1, 3).unsqueeze(2)  # B, Hkv, 1, T, D
        vf = v.float().permute(0, 2, 1, 3).unsqueeze(2)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * (1.0 / math.sqrt(D))
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), vf)  # B, Hkv, g, T, D
    return y.permute(0, 3, 1, 2, 4).reshape(B, T, H, D).to(q.dtype)


def math_reference(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, batch_chunk: int = 8
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float32 causal attention and its gradients: (out, dq, dk, dv) for upstream grad `dout`.

    Computed in float32 from the (possibly bf16) inputs, `batch_chunk` sequences at a time,
    so memory stays bounded at long sequences (the scores are H*T*T floats a sequence).
    """
    outs: list[list[Tensor]] = [[], [], [], []]
    with torch.enable_grad():
        for i in range(0, q.shape[0], batch_chunk):
            qc, kc, vc = (t[i : i + batch_chunk].detach().float().requires_grad_() for t in (q, k, v))
            y = math_attention(qc, kc, vc)
            grads = torch.autograd.grad(y, (qc, kc, vc), dout[i : i + batch_chunk].float())
            for acc, t in zip(outs, (y.detach(), *grads)):
                acc.append(t)
    out, dq, dk, dv = (torch.cat(parts) for parts in outs)
    return out, dq, dk, dv


def _sdpa(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    H, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = H != Hkv
    if gqa and not _SDPA_NATIVE_GQA[backend]:
        kt = kt.repeat_interleave(H // Hkv, dim=1)
        vt = vt.repeat_interleave(H // Hkv, dim=1)
        gqa = False
    kwargs: dict[str, Any] = {"is_causal": True}
    if gqa:
        kwargs["enable_gqa"] = True
    if backend == "sdpa":
        y = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
    elif backend == "sdpa_flash":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            y = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
    elif backend == "sdpa_cudnn":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            y = F.scaled_dot_product_attention(qt, kt, vt, **kwargs)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"not an SDPA backend: {backend!r}")
    return y.transpose(1, 2)


def _load_fa(name: str) -> Callable[..., Any]:
    fn = _FA_FUNCS.get(name)
    if fn is None:
        mod = importlib.import_module(_FA_MODULES[name])
        fn = mod.flash_attn_func
        _FA_FUNCS[name] = fn
    return fn


def _flash(q: Tensor, k: Tensor, v: Tensor, name: str) -> Tensor:
    out_dtype = q.dtype
    if q.dtype not in _LOWP:
        # FlashAttention runs in bf16/fp16 only: follow autocast like SDPA does, else refuse.
        if not torch.is_autocast_enabled(q.device.type):
            raise ValueError(f"attention backend {name!r} needs bf16/fp16 inputs, got {q.dtype}")
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        out_dtype = dt
    out = _load_fa(name)(q, k, v, causal=True)
    if isinstance(out, tuple):  # some FA3 builds return (out, softmax_lse)
        out = out[0]
    return out.to(out_dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Causal attention. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).

    `backend` must already be resolved (see `resolve_backend`); "auto" is not accepted.
    """
    _check_shapes(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    if backend in ("sdpa", "sdpa_flash", "sdpa_cudnn"):
        return _sdpa(q, k, v, backend)
    if backend in ("fa3", "fa2"):
        return _flash(q, k, v, backend)
    if backend == "auto":
        raise ValueError("attention backend 'auto' must be resolved first (resolve_backend)")
    raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------- availability


def _cuda_reason(device: torch.device) -> str | None:
    """None if `device` is a usable CUDA device, else why not."""
    if device.type != "cuda":
        return f"needs a CUDA device (device is {device.type})"
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def _fa_import_reason(name: str) -> str | None:
    modname = _FA_MODULES[name]
    try:
        mod = importlib.import_module(modname)
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken extension (OSError, RuntimeError)
        return f"import {modname} failed: {type(e).__name__}: {e}"
    fn = getattr(mod, "flash_attn_func", None)
    if fn is None:
        return f"{modname} has no flash_attn_func"
    if name == "fa3":
        r = _fa3_ops_reason(mod)
        if r is not None:
            return f"{modname} at {getattr(mod, '__file__', '?')} is not FA3: {r}"
    _FA_FUNCS[name] = fn
    return None


def _fa3_ops_reason(mod: Any) -> str | None:
    """None if module `mod` runs FA3's compiled operators, else why not.

    The real flash_attn_interface imports flash_attn_3._C, which registers
    torch.ops.flash_attn_3.{fwd,bwd}, and calls them through its `flash_attn_3_gpu`.
    """
    ops = getattr(mod, "flash_attn_3_gpu", None)
    if ops is None:
        return "it has no flash_attn_3_gpu (FA3's compiled operators); a stand-in?"
    for op in ("fwd", "bwd"):
        try:
            getattr(ops, op)
        except (AttributeError, RuntimeError):
            return f"operator flash_attn_3.{op} is not registered (a broken build?)"
    return None


def _static_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `name` cannot run on device/dtype, from versions and capabilities (no kernel run)."""
    if name in ("sdpa", "math"):
        return None
    r = _cuda_reason(device)
    if r is not None:
        return r
    major, minor = _capability(device)
    sm = f"sm{major}{minor}"
    if dtype not in _LOWP:
        return f"needs bf16/fp16 inputs (dtype is {dtype})"
    if name == "fa3":
        if (major, minor) != (9, 0):
            return f"needs Hopper (sm90); device is {sm}"
        return _fa_import_reason("fa3")
    if name == "fa2":
        if major < 8:
            return f"needs sm80 or newer; device is {sm}"
        return _fa_import_reason("fa2")
    if sdpa_kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel"
    if name == "sdpa_flash":
        avail = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if avail is not None and not avail():
            return "torch was built without flash attention"
        if not (8, 0) <= (major, minor) <= (12, 1):
            return f"SDPA flash needs sm80..sm121; device is {sm}"
        return None
    if name == "sdpa_cudnn":
        if not torch.backends.cudnn.is_available():
            return "cuDNN is not available"
        ver = torch.backends.cudnn.version() or 0
        if ver < 90000:
            return f"cuDNN attention needs cuDNN >= 9.0 (have {ver})"
        if not (8, 0) <= (major, minor) <= (12, 1):
            return f"cuDNN attention needs sm80..sm121; device is {sm}"
        return None
    return f"unknown backend {name!r}"  # pragma: no cover


@functools.cache
def _probe(name: str, device_str: str, dtype: torch.dtype) -> str | None:
    """Run a tiny GQA forward+backward on the device; None if it works, else the error."""
    device = torch.device(device_str)
    g = torch.Generator(device=device).manual_seed(0)
    shape_q, shape_kv = (1, 128, 4, 64), (1, 128, 2, 64)
    try:
        with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            q = torch.randn(shape_q, device=device, dtype=dtype, generator=g).requires_grad_()
            k = torch.randn(shape_kv, device=device, dtype=dtype, generator=g).requires_grad_()
            v = torch.randn(shape_kv, device=device, dtype=dtype, generator=g).requires_grad_()
            y = attention(q, k, v, name)
            y.float().square().sum().backward()
            ref = math_attention(q.detach(), k.detach(), v.detach())
            err = (y.detach().float() - ref.float()).abs().max().item()
        if not err < 5e-2:
            return f"probe output differs from math by {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"probe failed: {type(e).__name__}: {msg[:300]}"
    return None


def _reason(name: str, device: torch.device, dtype: torch.dtype, probe: bool) -> str | None:
    r = _static_reason(name, device, dtype)
    if r is None and probe and name in CUDA_BACKENDS:
        r = _probe(name, str(device), dtype)
    return r


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def available_backends(
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    probe: bool = True,
) -> dict[str, str]:
    """For each backend, "available" or the reason it cannot run on `device`.

    `dtype` is the input dtype attention will see (default: bfloat16 on CUDA, the
    training dtype; float32 elsewhere). With `probe`, each CUDA backend that passes the
    static checks also runs a tiny forward+backward (cached per device and dtype).
    """
    dev = _as_device(device)
    dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    out: dict[str, str] = {}
    for name in BACKENDS:
        r = _reason(name, dev, dt, probe)
        out[name] = AVAILABLE if r is None else r
    return out


def _auto_order(device: torch.device) -> tuple[str, ...]:
    """Backends for "auto", fastest first, as measured at the record's shape (bf16, B=48,
    T=2048, 8/4 heads of 64, fwd+bwd; benchmarks/RESULTS.md)."""
    if device.type != "cuda" or _cuda_reason(device) is not None:
        return ("sdpa", "math")
    major, _ = _capability(device)
    if major == 9:  # Hopper. H200: fa3 1.96 ms, sdpa_cudnn 2.17, sdpa_flash 3.30
        return ("fa3", "sdpa_cudnn", "fa2", "sdpa_flash", "sdpa", "math")
    if major == 10:  # Blackwell datacenter: cuDNN's fused kernel (no FA3 build for sm100)
        return ("sdpa_cudnn", "fa2", "sdpa_flash", "sdpa", "math")
    return ("fa2", "sdpa_flash", "sdpa_cudnn", "sdpa", "math")


def resolve_backend(name: str, device: torch.device | str | None = "cpu", dtype: torch.dtype | None = None) -> str:
    """An available backend for `name` on `device` ("auto" picks the fastest available).

    Raises `InputError` (a ValueError) naming the backend and the reason when `name` is
    unknown or cannot run here; never substitutes another backend for an explicit name.
    """
    key = name.strip().lower()
    dev = _as_device(device)
    dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if key == "auto":
        reasons: list[str] = []
        for cand in _auto_order(dev):
            r = _reason(cand, dev, dt, probe=True)
            if r is None:
                return cand
            reasons.append(f"{cand}: {r}")
        raise ValueError(  # pragma: no cover - sdpa/math are always available
            f"no attention backend available on {dev}: " + "; ".join(reasons)
        )
    if key not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    r = _reason(key, dev, dt, probe=True)
    if r is not None:
        raise InputError(f"attention backend {key!r} is not available on {dev}: {r}")
    return key
