"""Quantization of a trained GPT into the record's int6 artifact (SPEC section 5).

* `classify` / `plan`: the treatment of each state-dict entry (GPTQ int6 for the blocks'
  attention and MLP matrices, int8 per row for the embeddings, fp16 / fp32 / raw for the
  small and control tensors), in the original's order.
* `quantize_int8_rows`: int8 per row, clipped at the 99.99984th percentile of |row|.
* `quantize_state_dict` / `dequantize`: the whole state dict, int6 matrices by GPTQ
  (`lmcore.gptq`: Hessians, scale search, the solver); `error_report`: the
  reconstruction error per tensor class.

The artifact file that holds the result (serialize, compress, read, verify) is
`lmcore.artifact`. The names of both modules that callers used from here before they were
split off (collect_hessians, gptq_quantize, compress, read_artifact, ...) are importable
from here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lmcore.artifact import (
    _DTYPES,
    CHUNK_SIZE,
    FORMAT_NAME,
    MAGIC,
    VERSION,
    ArtifactError,
    _cpu_threads,
    compress,
    decompress,
    deserialize,
    dtype_name,
    read_artifact,
    serialize,
    write_artifact,
)
from lmcore.gptq import (
    collect_hessians,
    full_fp32_matmul,
    gptq_quantize,
    gptq_quantize_many,
    hessian_error,
    rtn_quantize,
    scale_to_u8,
    snap_scale,
    u8_to_scale,
)
from lmcore.model import CONTROL_PATTERNS

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_NAME",
    "FP16",
    "FP32",
    "INT6",
    "INT8",
    "MAGIC",
    "RAW",
    "VERSION",
    "ArtifactError",
    "_cpu_threads",
    "classify",
    "collect_hessians",
    "compress",
    "decompress",
    "dequantize",
    "deserialize",
    "dtype_name",
    "error_report",
    "full_fp32_matmul",
    "gptq_quantize",
    "gptq_quantize_many",
    "hessian_error",
    "iter_int6",
    "plan",
    "quantize_int8_rows",
    "quantize_state_dict",
    "read_artifact",
    "rtn_quantize",
    "scale_to_u8",
    "serialize",
    "snap_scale",
    "u8_to_scale",
    "write_artifact",
]

# Treatments of a tensor in the artifact.
INT6, INT8, FP16, FP32, RAW = "int6", "int8", "fp16", "fp32", "raw"

_BLOCK_MATRIX = re.compile(r"^blocks\.\d+\.(attn|mlp)\.")


# ---------------------------------------------------------------------------- which tensor gets what


def classify(name: str, t: Tensor, passthrough_max_numel: int = 65_536) -> str:
    """The treatment of one state-dict entry (the original's `mixed_quantize_int6` order).

    Non-float tensors are stored as they are; float tensors with <= passthrough_max_numel
    elements (control tensors, gates, ve.proj, ...) as fp16; larger control tensors as
    fp32; 2-D attention and MLP matrices of the blocks as GPTQ int6; every other larger
    float tensor (token, bigram and value embeddings) as int8 per row.
    """
    if not t.is_floating_point():
        return RAW
    if t.numel() <= passthrough_max_numel:
        return FP16
    if any(p in name for p in CONTROL_PATTERNS):
        return FP32
    if t.ndim == 2 and _BLOCK_MATRIX.match(name):
        return INT6
    return INT8


def plan(state: dict[str, Tensor], passthrough_max_numel: int = 65_536) -> dict[str, str]:
    """`classify` for every entry of a state dict (works on meta tensors)."""
    return {n: classify(n, t, passthrough_max_numel) for n, t in state.items()}


# ---------------------------------------------------------------------------- int8


def quantize_int8_rows(t: Tensor, percentile: float = 99.99984) -> tuple[Tensor, Tensor]:
    """int8 per row (values in [-127, 127]) clipped at `percentile` of |row|; fp16 scales.

    1-D tensors get one scale. Values are rounded with the stored fp16 scale.
    """
    t32 = t.detach().float()
    q_level = percentile / 100.0
    if t32.ndim == 2:
        clip = torch.quantile(t32.abs(), q_level, dim=1) if t32.numel() else torch.zeros(t32.shape[0])
        s = (clip / 127.0).clamp_min(1.0 / 127.0).to(torch.float16)
        c = clip[:, None]
        q = torch.clamp(torch.round(torch.maximum(torch.minimum(t32, c), -c) / s.float()[:, None]), -127, 127)
        return q.to(torch.int8).cpu(), s.cpu()
    flat = t32.flatten()
    clip = float(_quantile_large(flat.abs(), q_level)) if flat.numel() else 0.0
    s = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float16)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / s.float()), -127, 127)
    return q.to(torch.int8).cpu(), s


def _quantile_large(x: Tensor, q: float) -> Tensor:
    """torch.quantile without its input-size limit (linear interpolation)."""
    if x.numel() < (1 << 24):
        return torch.quantile(x, q)
    v = x.sort().values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ---------------------------------------------------------------------------- whole state dict


def quantize_state_dict(
    state: dict[str, Tensor],
    hessians: dict[str, Tensor] | None,
    qcfg: Any,
    device: torch.device | str | None = None,
    snap_scales: bool = True,
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Quantize a state dict: (stored tensors by name, per-tensor meta).

    `qcfg` is a QuantConfig (int6_range, gptq_block, clip_quantiles, hessian_damp,
    passthrough_max_numel, int8_clip_percentile). Stored names: int6 -> name.q, name.su8,
    name.sbase; int8 -> name.q, name.scale; fp16/fp32/raw -> name.
    """
    kinds = plan(state, qcfg.passthrough_max_numel)
    stored: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}
    int6_names = [n for n, k in kinds.items() if k == INT6]
    dev = torch.device(device) if device is not None else None
    items = []
    for n in int6_names:
        H = hessians.get(n) if hessians else None
        W = state[n]
        if dev is not None:
            W = W.to(dev)
            H = H.to(dev) if H is not None else None
        items.append((W, H))
    results = gptq_quantize_many(
        items,
        qmax=qcfg.int6_range,
        block=qcfg.gptq_block,
        quantiles=tuple(qcfg.clip_quantiles),
        damp=qcfg.hessian_damp,
        snap_scales=snap_scales,
        device=dev,
        return_codes=True,
    )
    int6 = dict(zip(int6_names, results))
    for name, t in state.items():
        kind = kinds[name]
        entry = {"kind": kind, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        if kind == INT6:
            q, _s, codes, base = int6[name]
            stored[name + ".q"] = q.contiguous()
            stored[name + ".su8"] = codes
            stored[name + ".sbase"] = base
            entry["hessian"] = bool(hessians and name in hessians)
        elif kind == INT8:
            q, s = quantize_int8_rows(t, qcfg.int8_clip_percentile)
            stored[name + ".q"] = q.contiguous()
            stored[name + ".scale"] = s.contiguous()
        elif kind == FP16:
            stored[name] = t.detach().to("cpu", torch.float16).contiguous()
        elif kind == FP32:
            stored[name] = t.detach().to("cpu", torch.float32).contiguous()
        else:
            stored[name] = t.detach().cpu().contiguous()
        meta[name] = entry
    return stored, meta


def _row_view(s: Tensor, q: Tensor) -> Tensor:
    return s.float().view(q.shape[0], *([1] * (q.ndim - 1))) if s.ndim > 0 else s.float()


def dequantize(stored: dict[str, Tensor], meta: dict[str, dict]) -> dict[str, Tensor]:
    """Stored tensors + per-tensor meta -> a state dict with the original dtypes (CPU)."""
    out: dict[str, Tensor] = {}
    for name, entry in meta.items():
        kind, dt = entry["kind"], _DTYPES[entry["dtype"]]
        try:
            if kind == INT6:
                q = stored[name + ".q"]
                s = u8_to_scale(stored[name + ".su8"], stored[name + ".sbase"])
                t = (q.float() * _row_view(s, q)).to(dt)
            elif kind == INT8:
                q = stored[name + ".q"]
                t = (q.float() * _row_view(stored[name + ".scale"], q)).to(dt)
            elif kind in (FP16, FP32, RAW):
                t = stored[name].to(dt)
            else:
                raise ArtifactError(f"tensor {name}: unknown treatment {kind!r}")
        except KeyError as e:
            raise ArtifactError(f"tensor {name}: stored part {e.args[0]!r} is missing") from None
        if list(t.shape) != list(entry["shape"]):
            raise ArtifactError(f"tensor {name}: shape {list(t.shape)} != recorded {entry['shape']}")
        out[name] = t
    return out


# ---------------------------------------------------------------------------- error report


def error_report(
    state: dict[str, Tensor],
    deq: dict[str, Tensor],
    kinds: dict[str, str],
    hessians: dict[str, Tensor] | None = None,
) -> dict[str, dict]:
    """Reconstruction error per tensor class (int6 attn / int6 mlp / int8 / fp16 ...).

    Hessian-weighted errors are computed where the Hessians are (the GPU after packing).

    For each class: tensors, elements, mse (mean over all its elements), rel_mse
    (sum of squared error / sum of squared weights); for int6 matrices with a Hessian
    also the relative Hessian-weighted error sum tr(E H E^T) / sum tr(W H W^T).
    """
    acc: dict[str, dict[str, float]] = {}
    for name, kind in kinds.items():
        if kind == RAW:
            continue
        cls = kind
        if kind == INT6:
            cls = "int6." + ("mlp" if ".mlp." in name else "attn")
        w = state[name].detach().float().cpu()
        e = w - deq[name].float()
        a = acc.setdefault(cls, {"tensors": 0, "numel": 0, "sq_err": 0.0, "sq_w": 0.0, "h_err": 0.0, "h_w": 0.0})
        a["tensors"] += 1
        a["numel"] += w.numel()
        a["sq_err"] += float(e.double().square().sum())
        a["sq_w"] += float(w.double().square().sum())
        if kind == INT6 and hessians is not None and name in hessians:
            H = hessians[name].detach()
            a["h_err"] += hessian_error(w, deq[name].float(), H)
            a["h_w"] += hessian_error(w, torch.zeros_like(w), H)
    out = {}
    for cls, a in sorted(acc.items()):
        r = {
            "tensors": int(a["tensors"]),
            "numel": int(a["numel"]),
            "mse": a["sq_err"] / max(a["numel"], 1),
            "rel_mse": a["sq_err"] / a["sq_w"] if a["sq_w"] > 0 else 0.0,
        }
        if a["h_w"] > 0:
            r["hessian_rel_err"] = a["h_err"] / a["h_w"]
        out[cls] = r
    return out


def iter_int6(meta: dict[str, dict]) -> Iterable[str]:
    return (n for n, e in meta.items() if e["kind"] == INT6)
