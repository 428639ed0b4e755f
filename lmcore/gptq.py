"""int6 by GPTQ (SPEC section 5): Hessians, row scales and the batched solver.

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
* `rtn_quantize`: plain per-row rounding at the same bit width (for comparison);
  `hessian_error`: tr(E H E^T) of a reconstruction.
* `scale_to_u8` / `u8_to_scale`: fp16 row scales stored as uint8 on a log scale between
  the matrix's smallest and largest scale (stored as two fp16 values).

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

How the whole state dict is quantized (which tensor gets int6, int8 or fp16) is
`lmcore.quant`; the file that holds the result is `lmcore.artifact`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lmcore.layers import CastedLinear

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
