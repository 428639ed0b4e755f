"""Quantization of a trained GPT into the record's int6 artifact (SPEC section 5).

Pieces, each usable on its own:

* `collect_hessians`: H = mean over calibration sequences of X^T X for the input of every
  `CastedLinear`, accumulated in fp32 on the device, then damped by `damp` (1%) of its
  mean diagonal, exactly where the original does it.
* `gptq_quantize` / `gptq_quantize_many`: GPTQ with values in [-qmax, qmax] (qmax = 31),
  columns in descending diag(H) order, the upper Cholesky factor of H^-1, blocks of 128
  columns with lazy batch updates, and a per-row scale chosen among the row-abs quantiles
  {0.999, 0.9995, 0.9999, 0.99999, 1.0} by the lowest reconstruction MSE. The five
  candidates are stacked as rows of one wide problem, and every matrix with the same
  column count is processed in one batched pass, so on CUDA the whole model is a few
  thousand small kernels. The CPU path runs the same code.
* `rtn_quantize`: plain per-row rounding at the same bit width (for comparison).
* `scale_to_u8` / `u8_to_scale`: fp16 row scales stored as uint8 on a log scale between
  the matrix's smallest and largest scale (stored as two fp16 values).
* `quantize_int8_rows`: int8 per row, clipped at the 99.99984th percentile of |row|.
* `quantize_state_dict` / `dequantize`: the whole state dict, with the treatment of each
  tensor decided by `classify`; `write_artifact` / `read_artifact`: the container.

Damping (a deliberate reproduction of the original): `collect_hessians` adds 1% of the
mean diagonal, and `gptq_quantize` adds another `damp` (1%) of the mean diagonal of the
already damped matrix before its Cholesky factorisation, as the original's
`collect_hessians` + `quantize_int6_gptq` do; the effective damping is 2.01% of the mean
diagonal of X^T X.

Scales: the original searches the quantiles with the fp16 scale but stores the uint8
log-coded scale, so what is decoded differs slightly from what GPTQ compensated for.
With `snap_scales=True` (the default) each candidate scale is first rounded through the
uint8 code, on the CPU with the same function the loader uses, so GPTQ's error feedback
uses exactly the scale that is decoded. The stored format is unchanged. With
`snap_scales=False` the int6 values and scales are bit-identical to the original's
`quantize_int6_gptq` on the CPU (a test checks it when the original is in `.ref/`).

Artifact file (little-endian):

    magic b"LMCPTZ" | u16 version (1) | u64 payload length | u32 chunk size |
    u32 number of chunks n | 32-byte sha256 of the payload | n x u32 compressed sizes |
    u32 CRC-32 of all the header bytes before it |
    n Brotli streams (quality 11), each one chunk of the payload

and the payload itself is the original's container:

    u32 len(meta) | u32 len(index) | meta JSON | index JSON | raw tensor bytes

with index entries [name, dtype, shape, offset, nbytes] (offsets into the raw bytes) and
the meta JSON holding the format name, the full lmcore config (so an artifact is
self-contained), each tensor's treatment and original dtype, and the quantizer settings.
The payload is compressed in independent chunks of `CHUNK_SIZE` bytes so that Brotli-11
runs on all CPU cores (Brotli releases the GIL); the chunk size is fixed, so the file
bytes depend only on the payload, not on the number of cores. On a trained proxy1 model
(27.9 MB payload) 1 MiB chunks gave 11,748,762 bytes against 11,749,703 for one stream
(chunking cost nothing there), in 6.9 s on 16 H100-host cores where the original's single
stream of its same-size payload took 86.9 s. Every stored number is
rounded to the stored grid before it is written, so the same inputs on the same device
give the same file. A wrong magic, a truncated or padded file, a failed
decompression, a checksum mismatch or an inconsistent index raise `ArtifactError`
naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmcore.errors import InputError
from lmcore.model import CONTROL_PATTERNS, CastedLinear

MAGIC = b"LMCPTZ"
VERSION = 1
FORMAT_NAME = "lmcore.int6"
CHUNK_SIZE = 1 << 20  # bytes of payload per Brotli stream
_HEADER = struct.Struct("<6sHQII32s")

# Treatments of a tensor in the artifact.
INT6, INT8, FP16, FP32, RAW = "int6", "int8", "fp16", "fp32", "raw"

_BLOCK_MATRIX = re.compile(r"^blocks\.\d+\.(attn|mlp)\.")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NP_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


class ArtifactError(InputError):
    """A compressed model file is truncated, corrupted or not an lmcore artifact."""


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ---------------------------------------------------------------------------- precision


@contextlib.contextmanager
def full_fp32_matmul():
    """Disable TF32 for matmuls inside the block (Hessians and GPTQ need true fp32)."""
    prev_prec = torch.get_float32_matmul_precision()
    prev_cuda = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_prec)
        torch.backends.cuda.matmul.allow_tf32 = prev_cuda
        torch.backends.cudnn.allow_tf32 = prev_cudnn


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


# ---------------------------------------------------------------------------- Hessians


@torch.no_grad()
def collect_hessians(
    model: torch.nn.Module,
    seqs: Tensor,
    device: torch.device | str,
    bf16: bool,
    damp: float = 0.01,
    batch_seqs: int = 8,
) -> dict[str, Tensor]:
    """H[name + ".weight"] for every CastedLinear: mean over sequences of X^T X, damped.

    Each sequence is run without its last token (the original forwards seq[:, :-1]), so a
    2048-token calibration sequence contributes 2047 positions. X^T X is accumulated in
    fp32 on `device` (TF32 off); the sum is divided by the number of sequences and
    `damp` times the mean diagonal (at least 1e-6) is added to the diagonal. The
    forward hooks are removed even if the forward fails. Returns fp32 tensors on `device`.
    """
    device = torch.device(device)
    hess: dict[str, Tensor] = {}
    hooks = []

    def make_hook(key: str) -> Callable:
        def hook(_mod: torch.nn.Module, inputs: tuple, _out: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            hess[key].addmm_(x.t(), x)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, CastedLinear):
            key = name + ".weight"
            cols = mod.weight.shape[1]
            hess[key] = torch.zeros(cols, cols, dtype=torch.float32, device=device)
            hooks.append(mod.register_forward_hook(make_hook(key)))
    was_training = model.training
    model.eval()
    n = seqs.shape[0]
    try:
        with full_fp32_matmul():
            ctx = (
                torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if bf16
                else contextlib.nullcontext()
            )
            with ctx:
                for i in range(0, n, max(1, batch_seqs)):
                    x = seqs[i : i + batch_seqs, :-1].to(device=device, dtype=torch.long)
                    model(x)
            for key, H in hess.items():
                H /= max(n, 1)
                d = torch.diagonal(H).mean().clamp_min(1e-6)
                H.diagonal().add_(damp * d)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return hess


# ---------------------------------------------------------------------------- scales


def scale_to_u8(s: Tensor) -> tuple[Tensor, Tensor]:
    """fp16 row scales -> (uint8 codes, fp16 [min, max]) on a log scale (the original's rule)."""
    s = s.detach().to("cpu", torch.float16).float()
    s_min = s.min().clamp_min(1e-10)
    s_max = s.max().clamp_min(1e-10)
    base = torch.stack([s_min, s_max]).to(torch.float16)
    lo, hi = s_min.log(), s_max.log()
    if float(hi - lo) < 1e-6:
        return torch.full(s.shape, 128, dtype=torch.uint8), base
    codes = ((s.clamp_min(1e-10).log() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    return codes, base


def u8_to_scale(codes: Tensor, base: Tensor) -> Tensor:
    """uint8 codes + fp16 [min, max] -> fp16 scales (the loader's decoding)."""
    b = base.to("cpu").float()
    lo, hi = b[0].log(), b[1].log()
    return torch.exp(lo + (codes.to("cpu").float() / 255.0) * (hi - lo)).to(torch.float16)


def snap_scale(s: Tensor) -> Tensor:
    """The fp16 scale that a uint8 round trip of `s` decodes to."""
    return u8_to_scale(*scale_to_u8(s))


# ---------------------------------------------------------------------------- int6: RTN and GPTQ


def _row_scale(clip: Tensor, qmax: int) -> Tensor:
    return (clip / qmax).clamp_min(1.0 / qmax).to(torch.float16)


def rtn_quantize(W: Tensor, qmax: int = 31) -> tuple[Tensor, Tensor]:
    """Plain per-row rounding: scale = max|row| / qmax (>= 1/qmax, fp16), q in [-qmax, qmax]."""
    w = W.detach().float()
    s = _row_scale(w.abs().amax(dim=1), qmax)
    q = torch.clamp(torch.round(w / s.float()[:, None]), -qmax, qmax).to(torch.int8)
    return q, s


def hessian_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T), in float64 on H's device."""
    dev = H.device
    E = W.to(dev, torch.float64) - W_hat.to(dev, torch.float64)
    return float(((E @ H.double()) * E).sum())


def _candidate_scales(
    w: Tensor, qmax: int, quantiles: Sequence[float], snap: bool
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Candidate row scales of w (fp32): ((len(quantiles), rows) fp16 on CPU, their u8 codes).

    With `snap`, each candidate is the decoding of its own uint8 code, and the codes
    returned are the ones that decode to it (stored as they are, never re-encoded).
    """
    a = w.abs()
    qs = [q for q in quantiles if q < 1.0]
    scales, codes = [], []
    qv = torch.quantile(a, torch.tensor(qs, dtype=a.dtype, device=a.device), dim=1) if qs else None
    k = 0
    for q in quantiles:
        if q < 1.0:
            clip = qv[k]
            k += 1
        else:
            clip = a.amax(dim=1)
        s = _row_scale(clip, qmax).cpu()
        c = scale_to_u8(s)
        scales.append(u8_to_scale(*c) if snap else s)
        codes.append(c)
    return torch.stack(scales), codes


def _prepare_hessian(H: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(damped H with dead columns fixed, dead mask): the original's preprocessing."""
    H = H.float().clone()
    dead = torch.diagonal(H) == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    return H, dead


def _upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """Batched upper Cholesky factor of H^-1 (B, C, C); more damping if H is not PD."""
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    extra = 0.0
    for _ in range(6):
        Ht = H if extra == 0.0 else H + extra * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(Ht)
        if not bool((info != 0).any()):
            # H^-1 from the factor (cholesky_solve: much faster than batched cholesky_inverse on CPU)
            Hinv = torch.cholesky_solve(eye.expand_as(L), L)
            Hinv = 0.5 * (Hinv + Hinv.transpose(-1, -2))
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if not bool((info2 != 0).any()):
                return U
        extra = 0.01 if extra == 0.0 else extra * 10
    raise ValueError("GPTQ: Hessian is not positive definite even with extra damping")


def _gptq_core(Wt: Tensor, S: Tensor, U: Tensor, qmax: int, block: int) -> Tensor:
    """Batched GPTQ on transposed weights.

    Wt (B, C, R) fp32: column c of matrix b is the contiguous row Wt[b, c] (columns in
    processing order), S (B, R) the row scales, U (B, C, C) the upper Cholesky factor of
    H^-1. Returns the integer values as fp32 (B, C, R). Wt is modified in place.
    """
    B, C, R = Wt.shape
    Q = torch.empty_like(Wt)
    Sx = S[:, None, :]  # (B, 1, R)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        cnt = i2 - i1
        W1 = Wt[:, i1:i2]  # a view: updated in place
        Err1 = torch.empty(B, cnt, R, dtype=Wt.dtype, device=Wt.device)
        U1 = U[:, i1:i2, i1:i2]
        inv_d = (1.0 / torch.diagonal(U1, dim1=-2, dim2=-1))[:, :, None]  # (B, cnt, 1)
        for i in range(cnt):
            w = W1[:, i : i + 1]  # (B, 1, R)
            q = torch.round(w / Sx).clamp_(-qmax, qmax)
            Q[:, i1 + i : i1 + i + 1] = q
            err = torch.addcmul(w, q, Sx, value=-1.0).mul_(inv_d[:, i : i + 1])
            Err1[:, i : i + 1] = err
            if i + 1 < cnt:
                # W1[:, j] -= U1[:, i, j] * err for the later columns j of the block
                W1[:, i + 1 :].addcmul_(U1[:, i, i + 1 :, None], err, value=-1.0)
        if i2 < C:
            # Wt[:, j] -= sum_i U[:, i, j] * Err1[:, i]  for the columns after the block
            Wt[:, i2:].sub_(torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), Err1))
    return Q


@torch.no_grad()
def gptq_quantize_many(
    items: Sequence[tuple[Tensor, Tensor | None]],
    qmax: int = 31,
    block: int = 128,
    quantiles: Sequence[float] = (0.999, 0.9995, 0.9999, 0.99999, 1.0),
    damp: float = 0.01,
    snap_scales: bool = True,
    device: torch.device | str | None = None,
    return_codes: bool = False,
) -> list[tuple]:
    """GPTQ for many (W, H) pairs; returns [(q int8 (rows, cols), scale fp16 (rows,))] on CPU.

    With `return_codes`, each result also carries the uint8 codes and fp16 base of the
    chosen scale: (q, scale, codes, base) (with `snap_scales`, codes decode to scale
    exactly; without, they are the lossy encoding the original stores).

    Matrices with the same column count are quantized together in one batched pass
    (rows padded to the largest; the `len(quantiles)` scale candidates are extra rows).
    For each matrix the candidate with the lowest plain MSE against the weights is kept.
    A matrix without a Hessian (H None) is rounded per row (`rtn_quantize`).
    Runs on `device` (default: the device of the first W).
    """
    if not items:
        return []
    dev = torch.device(device) if device is not None else items[0][0].device
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for idx, (W, H) in enumerate(items):
        if W.ndim != 2:
            raise ValueError(f"GPTQ needs a 2-D matrix, got shape {tuple(W.shape)}")
        if H is None:
            q, s = rtn_quantize(W, qmax)
            q, s = q.cpu(), s.cpu()
            c = scale_to_u8(s)
            if snap_scales:
                s = u8_to_scale(*c)
                q = torch.clamp(torch.round(W.detach().float().cpu() / s.float()[:, None]), -qmax, qmax).to(torch.int8)
            out[idx] = (q, s, *c) if return_codes else (q, s)  # type: ignore[assignment]
            continue
        if H.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"Hessian shape {tuple(H.shape)} does not match W {tuple(W.shape)}")
        groups.setdefault(W.shape[1], []).append(idx)
    nq = len(quantiles)
    with full_fp32_matmul():
        for C, idxs in groups.items():
            Rmax = max(items[i][0].shape[0] for i in idxs) * nq
            Bn = len(idxs)
            Wb = torch.zeros(Bn, C, Rmax, dtype=torch.float32, device=dev)
            Sb = torch.ones(Bn, Rmax, dtype=torch.float32, device=dev)
            Hb = torch.empty(Bn, C, C, dtype=torch.float32, device=dev)
            perms, cands, codes, refs = [], [], [], []
            for b, i in enumerate(idxs):
                W = items[i][0].detach().to(dev, torch.float32)
                H, dead = _prepare_hessian(items[i][1].to(dev), damp)
                perm = torch.argsort(torch.diagonal(H), descending=True)
                Wp = W[:, perm].clone()
                Wp[:, dead[perm]] = 0
                R = W.shape[0]
                cand, cand_codes = _candidate_scales(W, qmax, quantiles, snap_scales)  # (nq, R) fp16, CPU
                Wb[b, :, : nq * R] = Wp.t().repeat(1, nq)
                Sb[b, : nq * R] = cand.reshape(-1).to(dev, torch.float32)
                Hb[b] = H[perm][:, perm]
                perms.append(perm)
                cands.append(cand)
                codes.append(cand_codes)
                refs.append(Wp)
            U = _upper_cholesky_of_inverse(Hb)
            del Hb
            Q = _gptq_core(Wb, Sb, U, qmax, block)
            for b, i in enumerate(idxs):
                R = items[i][0].shape[0]
                Qc = Q[b, :, : nq * R].t().reshape(nq, R, C)
                Sc = Sb[b, : nq * R].view(nq, R, 1)
                mse = ((refs[b][None] - Qc * Sc) ** 2).mean(dim=(1, 2))
                k = int(torch.argmin(mse).item())  # first minimum, as the original's strict "<"
                inv = torch.argsort(perms[b])
                q = Qc[k][:, inv].to(torch.int8).cpu()
                s = cands[b][k].clone()
                out[i] = (q, s, *codes[b][k]) if return_codes else (q, s)  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    qmax: int = 31,
    block: int = 128,
    quantiles: Sequence[float] = (0.999, 0.9995, 0.9999, 0.99999, 1.0),
    damp: float = 0.01,
    snap_scales: bool = True,
) -> tuple[Tensor, Tensor]:
    """GPTQ of one matrix W (rows, cols) with Hessian H (cols, cols): (q int8, scale fp16).

    Runs where W is (CUDA or CPU); results are returned on the CPU.
    """
    return gptq_quantize_many([(W, H)], qmax, block, quantiles, damp, snap_scales)[0]


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


# ---------------------------------------------------------------------------- container


def serialize(stored: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    """u32 len(meta) | u32 len(index) | meta JSON | index JSON | raw bytes (sorted names)."""
    index = []
    parts = []
    off = 0
    for name in sorted(stored):
        t = stored[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        index.append([name, dtype_name(t.dtype), list(t.shape), off, len(raw)])
        parts.append(raw)
        off += len(raw)
    mb = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    ib = json.dumps(index, separators=(",", ":")).encode()
    return struct.pack("<II", len(mb), len(ib)) + mb + ib + b"".join(parts)


def deserialize(payload: bytes, source: str = "artifact") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Inverse of `serialize`; raises ArtifactError on any inconsistency."""
    if len(payload) < 8:
        raise ArtifactError(f"{source}: payload too short ({len(payload)} bytes)")
    ml, il = struct.unpack("<II", payload[:8])
    if 8 + ml + il > len(payload):
        raise ArtifactError(f"{source}: header lengths exceed the payload")
    try:
        meta = json.loads(payload[8 : 8 + ml])
        index = json.loads(payload[8 + ml : 8 + ml + il])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{source}: meta/index JSON is unreadable ({e})") from None
    base = 8 + ml + il
    data_len = len(payload) - base
    out: dict[str, Tensor] = {}
    buf = memoryview(payload)
    for entry in index:
        try:
            name, dt, shape, off, nb = entry
            np_dt = np.dtype(np.int16 if dt == "bfloat16" else _NP_DTYPES[dt])
            shape = [int(d) for d in shape]
            off, nb = int(off), int(nb)
        except (TypeError, ValueError, KeyError):
            raise ArtifactError(f"{source}: bad index entry {str(entry)[:200]}") from None
        if any(d < 0 for d in shape):
            raise ArtifactError(f"{source}: tensor {name}: negative shape {shape}")
        count = int(np.prod(shape)) if shape else 1
        if nb != count * np_dt.itemsize or off < 0 or off + nb > data_len:
            raise ArtifactError(f"{source}: tensor {name}: offset/size out of range")
        a = np.frombuffer(buf, dtype=np_dt, count=count, offset=base + off).reshape(shape).copy()
        t = torch.from_numpy(a)
        if dt == "bfloat16":
            t = t.view(torch.bfloat16)
        out[name] = t
    return out, meta


def _cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def compress(payload: bytes, quality: int = 11, chunk_size: int = CHUNK_SIZE, threads: int | None = None) -> bytes:
    """The artifact file bytes for a payload (header + parallel Brotli streams)."""
    import brotli

    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)] or [b""]
    n_threads = min(len(chunks), threads or _cpu_threads())
    if n_threads > 1:
        with ThreadPoolExecutor(n_threads) as ex:
            comp = list(ex.map(lambda c: brotli.compress(c, quality=quality), chunks))
    else:
        comp = [brotli.compress(c, quality=quality) for c in chunks]
    header = _HEADER.pack(MAGIC, VERSION, len(payload), chunk_size, len(comp), hashlib.sha256(payload).digest())
    header += struct.pack(f"<{len(comp)}I", *(len(c) for c in comp))
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(comp)


def decompress(blob: bytes, source: str = "artifact") -> bytes:
    """Check the header, decompress every stream and verify the payload's sha256."""
    import brotli

    if not blob:
        raise ArtifactError(f"{source}: empty file, not an lmcore artifact")
    if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
        what = "a zip archive" if blob[:4] == b"PK\x03\x04" else "unknown content"
        raise ArtifactError(
            f"{source}: not an lmcore artifact (bad magic; looks like {what}). An original "
            "record .ptz is plain Brotli without this header"
        )
    if len(blob) < _HEADER.size:
        raise ArtifactError(f"{source}: truncated header ({len(blob)} bytes)")
    _, version, length, _chunk_size, n, digest = _HEADER.unpack_from(blob, 0)
    if version != VERSION:
        raise ArtifactError(f"{source}: format version {version} is not supported (expected {VERSION})")
    pos = _HEADER.size
    if n > 1 << 24 or len(blob) < pos + 4 * n + 4:
        raise ArtifactError(f"{source}: truncated or corrupted header (chunk table incomplete)")
    sizes = struct.unpack_from(f"<{n}I", blob, pos)
    pos += 4 * n
    (crc,) = struct.unpack_from("<I", blob, pos)
    if zlib.crc32(blob[:pos]) != crc:
        raise ArtifactError(f"{source}: header checksum mismatch (corrupted header)")
    pos += 4
    expected = pos + sum(sizes)
    if len(blob) < expected:
        raise ArtifactError(f"{source}: truncated ({len(blob)} bytes, header says {expected})")
    if len(blob) > expected:
        raise ArtifactError(f"{source}: {len(blob) - expected} unexpected trailing bytes")
    parts = []
    for i, sz in enumerate(sizes):
        try:
            parts.append(brotli.decompress(blob[pos : pos + sz]))
        except brotli.error as e:
            raise ArtifactError(f"{source}: Brotli stream {i} is corrupted ({e})") from None
        pos += sz
    payload = b"".join(parts)
    if len(payload) != length:
        raise ArtifactError(f"{source}: payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"{source}: sha256 of the payload does not match (corrupted file)")
    return payload


def write_artifact(path: str | Path, stored: dict[str, Tensor], meta: dict[str, Any], quality: int = 11) -> bytes:
    """Serialize + compress + atomic write; returns the file bytes."""
    from lmcore.runs import atomic_write_bytes

    blob = compress(serialize(stored, meta), quality=quality)
    atomic_write_bytes(path, blob)
    return blob


def read_artifact(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(stored tensors, meta) of an artifact file, verified; ArtifactError naming the file."""
    p = Path(path)
    try:
        blob = p.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{p}: artifact file not found") from None
    except IsADirectoryError:
        raise ArtifactError(f"{p}: is a directory, not an artifact file") from None
    stored, meta = deserialize(decompress(blob, str(p)), str(p))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or not isinstance(meta.get("tensors"), dict):
        raise ArtifactError(f"{p}: meta does not describe an {FORMAT_NAME} model")
    return stored, meta


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
