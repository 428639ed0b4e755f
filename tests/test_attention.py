"""Tests for lmcore.attention: every backend agrees with the math reference, causality,
availability reasons (a stand-in is never taken for FA3), resolution rules,
torch.compile(fullgraph=True) tracing, and, on CUDA (-m cuda), every fused kernel's
forward and backward at the record's shape against the float32 reference."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import lmcore.attention as A
from lmcore.attention import (
    AVAILABLE,
    BACKENDS,
    CUDA_BACKENDS,
    _sdpa,
    attention,
    available_backends,
    math_attention,
    math_reference,
    resolve_backend,
)
from lmcore.errors import InputError

CPU_AVAILABLE = [b for b, r in available_backends("cpu").items() if r == AVAILABLE]
SHAPES = [  # B, T, H, Hkv, D
    (2, 37, 4, 2, 16),  # GQA
    (2, 37, 4, 4, 16),  # MHA
    (1, 5, 6, 1, 8),  # MQA
]
_skip_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def needs_cuda(fn):
    """Mark a test as CUDA-only (pytest -m cuda) and skip it without a GPU."""
    return pytest.mark.cuda(_skip_no_cuda(fn))


def _qkv(B: int, T: int, H: int, Hkv: int, D: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, device=device, dtype=dtype)
    return q, k, v


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Loop-per-head float64 reference with the GQA rule h -> h // (H // Hkv)."""
    B, T, H, D = q.shape
    g = H // k.shape[2]
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for h in range(H):
        qh, kh, vh = q[:, :, h].double(), k[:, :, h // g].double(), v[:, :, h // g].double()
        s = qh @ kh.transpose(1, 2) / D**0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = torch.softmax(s, -1) @ vh
    return out


def test_cpu_backends_listed() -> None:
    assert {"sdpa", "math"} <= set(CPU_AVAILABLE)


@pytest.mark.parametrize("shape", SHAPES)
def test_math_matches_naive(shape) -> None:
    q, k, v = _qkv(*shape)
    torch.testing.assert_close(math_attention(q, k, v).double(), _naive(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_AVAILABLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_backends_agree_with_math(backend: str, shape) -> None:
    q, k, v = _qkv(*shape)
    y = attention(q, k, v, backend)
    assert y.shape == q.shape and y.dtype == q.dtype
    torch.testing.assert_close(y, math_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_AVAILABLE)
def test_cpu_backends_gradients_agree(backend: str) -> None:
    q, k, v = _qkv(2, 19, 4, 2, 8)
    grads = []
    for fn in (lambda a, b, c: attention(a, b, c, backend), math_attention):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv).sin().sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sdpa_flash_path_on_cpu_kernel() -> None:
    # The sdpa_kernel([FLASH_ATTENTION]) code path itself, run on torch's CPU flash kernel.
    q, k, v = _qkv(2, 37, 4, 2, 16)
    torch.testing.assert_close(_sdpa(q, k, v, "sdpa_flash"), math_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_AVAILABLE)
def test_causality(backend: str) -> None:
    q, k, v = _qkv(1, 23, 4, 2, 8)
    y = attention(q, k, v, backend)
    t = 11
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1 :] = torch.randn_like(k2[:, t + 1 :]) * 5
    v2[:, t + 1 :] = torch.randn_like(v2[:, t + 1 :]) * 5
    y2 = attention(q, k2, v2, backend)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])
    # and a change at t itself does reach position t
    v3 = v.clone()
    v3[:, t] += 1.0
    assert not torch.allclose(attention(q, k, v3, backend)[:, t], y[:, t])


def test_available_backends_cpu_reasons() -> None:
    av = available_backends("cpu")
    assert set(av) == set(BACKENDS)
    assert av["math"] == AVAILABLE and av["sdpa"] == AVAILABLE
    for b in CUDA_BACKENDS:
        assert av[b] != AVAILABLE
        assert "CUDA" in av[b] and "cpu" in av[b]
    assert available_backends(torch.device("cpu"), dtype=torch.bfloat16)["math"] == AVAILABLE


def test_resolve_rules_cpu() -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("AUTO", torch.device("cpu")) in CPU_AVAILABLE
    assert resolve_backend("math", "cpu") == "math"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match=r"'sdpa_cudnn' is not available on cpu: needs a CUDA device"):
        resolve_backend("sdpa_cudnn", "cpu")
    for b in CUDA_BACKENDS:
        with pytest.raises(ValueError, match=b):
            resolve_backend(b, "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", "cpu")


def test_resolve_refusals_are_input_errors() -> None:
    # A backend named in a config that cannot run here is the user's input: the CLI prints
    # InputError as one line (exit 2); a plain ValueError would show a traceback.
    with pytest.raises(InputError, match=r"attention backend 'fa3' is not available on cpu"):
        resolve_backend("fa3", "cpu")
    with pytest.raises(InputError, match="unknown attention backend 'flash4'"):
        resolve_backend("flash4", "cpu")


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, cap=(9, 0)) -> torch.device:
    """Pretend to be a GPU of capability `cap`; no kernel runs (the probe is stubbed)."""
    monkeypatch.setattr(A, "_cuda_reason", lambda device: None if device.type == "cuda" else "no")
    monkeypatch.setattr(A, "_capability", lambda device: cap)
    monkeypatch.setattr(A, "_probe", lambda name, dev, dtype: None)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(A, "_FA_FUNCS", {})
    return torch.device("cuda", 0)


def _fake_interface(monkeypatch: pytest.MonkeyPatch, **attrs) -> types.ModuleType:
    mod = types.ModuleType("flash_attn_interface")
    mod.__file__ = "/somewhere/flash_attn_interface.py"
    mod.flash_attn_func = lambda q, k, v, causal=False: q
    mod.flash_attn_varlen_func = lambda *a, **k: None
    for key, val in attrs.items():
        setattr(mod, key, val)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", mod)
    return mod


def test_fa3_stand_in_is_reported_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A module named flash_attn_interface that routes to SDPA (like the FA2 shim the
    # original script is benchmarked with) has the right functions but no FA3 operators.
    dev = _fake_gpu(monkeypatch)
    _fake_interface(monkeypatch)
    reason = available_backends(dev)["fa3"]
    assert reason.startswith("flash_attn_interface at /somewhere/flash_attn_interface.py is not FA3")
    assert "flash_attn_3_gpu" in reason
    assert resolve_backend("auto", dev) == "sdpa_cudnn"
    with pytest.raises(InputError, match="'fa3' is not available on cuda:0: flash_attn_interface at"):
        resolve_backend("fa3", dev)
    assert "fa3" not in A._FA_FUNCS  # nothing was registered for attention() to call


def test_fa3_without_its_operators_is_reported_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _fake_gpu(monkeypatch)
    _fake_interface(monkeypatch, flash_attn_3_gpu=types.SimpleNamespace(fwd=object()))  # no bwd
    assert "operator flash_attn_3.bwd is not registered" in available_backends(dev)["fa3"]
    _fake_interface(monkeypatch, flash_attn_3_gpu=types.SimpleNamespace(fwd=object(), bwd=object()))
    assert available_backends(dev)["fa3"] == AVAILABLE


def test_fa3_gets_gqa_kv_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    # Native GQA: FA3 receives the Hkv-head k and v themselves (no repeat, no copy).
    seen = {}

    def spy(q, k, v, causal=False):
        seen.update(q=q, k=k, v=v, causal=causal)
        return torch.zeros_like(q)

    monkeypatch.setitem(A._FA_FUNCS, "fa3", spy)
    q, k, v = _qkv(2, 16, 8, 2, 64, dtype=torch.bfloat16)
    y = attention(q, k, v, "fa3")
    assert seen["q"] is q and seen["k"] is k and seen["v"] is v and seen["causal"] is True
    assert y.shape == (2, 16, 8, 64) and y.dtype == torch.bfloat16


def test_math_reference_matches_autograd_of_math() -> None:
    q, k, v = _qkv(5, 13, 4, 2, 8)
    dout = torch.randn_like(q)
    out, dq, dk, dv = math_reference(q, k, v, dout, batch_chunk=2)  # 3 chunks: 2, 2, 1
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    y = math_attention(qq, kk, vv)
    want = (y.detach(), *torch.autograd.grad(y, (qq, kk, vv), dout))
    for got, exp in zip((out, dq, dk, dv), want):
        assert got.dtype == torch.float32 and got.shape == exp.shape
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)


def test_attention_rejects_bad_input() -> None:
    q, k, v = _qkv(1, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v, "math")
    q, k, v = _qkv(1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="resolved first"):
        attention(q, k, v, "auto")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, "nope")
    with pytest.raises(ValueError, match="shape mismatch"):
        attention(q, k[:, :3], v[:, :3], "math")


def test_math_under_autocast_stays_fp32_internally() -> None:
    q, k, v = _qkv(1, 9, 4, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, "math")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, math_attention(q, k, v))


@pytest.mark.parametrize("backend", ["sdpa", "math", "sdpa_flash"])
def test_fullgraph_compile_traces(backend: str) -> None:
    # Dynamo capture only (backend="eager": no inductor build, fast); fullgraph=True
    # fails on any graph break, e.g. if the sdpa_kernel context were not traceable.
    torch._dynamo.reset()
    q, k, v = _qkv(2, 16, 4, 2, 8)
    fn = (
        (lambda a, b, c: _sdpa(a, b, c, "sdpa_flash"))
        if backend == "sdpa_flash"
        else (lambda a, b, c: attention(a, b, c, backend))
    )
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), math_attention(q, k, v), atol=1e-5, rtol=1e-5)


# What "auto" picks on Hopper when FA3 is installed: the faster of fa3 and sdpa_cudnn at the
# record's shape on an H200 (fwd+bwd 1.96 vs 2.17 ms, benchmarks/RESULTS.md).
AUTO_SM90_WITH_FA3 = "fa3"


@pytest.mark.parametrize(
    "cap, fa3_ok, expect",
    [
        ((9, 0), False, "sdpa_cudnn"),
        ((9, 0), True, AUTO_SM90_WITH_FA3),
        ((10, 0), False, "sdpa_cudnn"),
        ((8, 0), False, "sdpa_flash"),
        ((8, 6), True, "sdpa_flash"),
    ],
)
def test_auto_order_on_fake_gpu(monkeypatch: pytest.MonkeyPatch, cap, fa3_ok: bool, expect: str) -> None:
    # The auto order and the static reasons on a pretend GPU; fa2 is "not installed".
    dev = _fake_gpu(monkeypatch, cap)
    monkeypatch.setattr(
        A, "_fa_import_reason", lambda name: None if (name == "fa3" and fa3_ok) else f"import {name} failed"
    )
    assert A.resolve_backend("auto", dev) == expect
    av = A.available_backends(dev)
    assert av["fa2"] == "import fa2 failed"
    if cap != (9, 0):
        assert "sm90" in av["fa3"] and f"sm{cap[0]}{cap[1]}" in av["fa3"]
    fp32 = A.available_backends(dev, dtype=torch.float32)
    assert all("bf16/fp16" in fp32[b] for b in CUDA_BACKENDS)
    assert A.resolve_backend("auto", dev, dtype=torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="'fa2' is not available on cuda:0: import fa2 failed"):
        A.resolve_backend("fa2", dev)


# ---------------------------------------------------------------------------- CUDA only


@needs_cuda
def test_cuda_available_backends_report() -> None:
    av = available_backends("cuda")
    assert av["sdpa"] == AVAILABLE and av["math"] == AVAILABLE
    assert resolve_backend("auto", "cuda") in [b for b, r in av.items() if r == AVAILABLE]
    fp32 = available_backends("cuda", dtype=torch.float32)
    for b in CUDA_BACKENDS:
        assert fp32[b] != AVAILABLE


@needs_cuda
@pytest.mark.parametrize("backend", list(CUDA_BACKENDS) + ["sdpa"])
@pytest.mark.parametrize("shape", [(2, 256, 8, 4, 64), (2, 200, 4, 4, 64)])
def test_cuda_backends_agree_with_math_bf16(backend: str, shape) -> None:
    reason = available_backends("cuda")[backend]
    if reason != AVAILABLE:
        pytest.skip(f"{backend}: {reason}")
    q, k, v = (t.requires_grad_() for t in _qkv(*shape, dtype=torch.bfloat16, device="cuda"))
    y = attention(q, k, v, backend)
    ref = math_attention(q, k, v)
    assert y.dtype == torch.bfloat16 and y.shape == q.shape
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
    g = torch.randn_like(y)
    gy = torch.autograd.grad(y, (q, k, v), g)
    gr = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", gy, gr):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel:.3g} vs math"


@needs_cuda
@pytest.mark.parametrize("backend", ["fa3", "sdpa_flash", "sdpa_cudnn"])
def test_cuda_fullgraph_compile(backend: str) -> None:
    # lmcore trains a torch.compile(fullgraph=True) model: the kernel and its backward
    # must trace without a graph break.
    reason = available_backends("cuda")[backend]
    if reason != AVAILABLE:
        pytest.skip(f"{backend}: {reason}")
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in _qkv(2, 256, 8, 4, 64, dtype=torch.bfloat16, device="cuda"))
    dout = torch.randn_like(q)
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, backend), fullgraph=True)
    y = compiled(q, k, v)
    ref = math_reference(q, k, v, dout)
    torch.testing.assert_close(y.float(), ref[0], atol=2e-2, rtol=2e-2)
    for name, g, r in zip("qkv", torch.autograd.grad(y, (q, k, v), dout), ref[1:]):
        rel = ((g.float() - r).norm() / r.norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel:.3g} vs fp32"


RECORD_SHAPE = (48, 2048, 8, 4, 64)  # the record's micro-batch: B, T, H, Hkv, D


@pytest.fixture(scope="module")
def record_case():
    """bf16 inputs at the record's shape, an upstream gradient, and the fp32 reference."""
    q, k, v = (t.requires_grad_() for t in _qkv(*RECORD_SHAPE, dtype=torch.bfloat16, device="cuda", seed=3))
    dout = torch.randn_like(q)
    return q, k, v, dout, math_reference(q, k, v, dout)


def _rel_errors(backend: str, case) -> dict[str, float]:
    q, k, v, dout, ref = case
    y = attention(q, k, v, backend)
    got = (y.detach(), *torch.autograd.grad(y, (q, k, v), dout))
    return {n: ((a.float() - b).norm() / b.norm()).item() for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_record_shape_fwd_bwd_vs_fp32(backend: str, record_case) -> None:
    reason = available_backends("cuda")[backend]
    if reason != AVAILABLE:
        pytest.skip(f"{backend}: {reason}")
    err = _rel_errors(backend, record_case)
    print(f"{backend} relative error vs fp32 at {RECORD_SHAPE}: {err}")
    assert err["out"] < 1e-2, err  # bf16 output: ~3e-3 is its rounding alone
    assert max(err["dq"], err["dk"], err["dv"]) < 2e-2, err


@needs_cuda
def test_cuda_fa3_error_no_larger_than_other_fused_kernels(record_case) -> None:
    av = available_backends("cuda")
    if av["fa3"] != AVAILABLE:
        pytest.skip(f"fa3: {av['fa3']}")
    others = [b for b in ("sdpa_flash", "sdpa_cudnn", "fa2") if av[b] == AVAILABLE]
    if not others:
        pytest.skip("no other fused kernel to compare with")
    fa3 = _rel_errors("fa3", record_case)
    errs = {b: _rel_errors(b, record_case) for b in others}
    print(f"fa3 {fa3}; " + "; ".join(f"{b} {e}" for b, e in errs.items()))
    for t in ("out", "dq", "dk", "dv"):
        worst = max(e[t] for e in errs.values())
        assert fa3[t] <= 1.1 * worst, (
            f"{t}: fa3 {fa3[t]:.3g} vs {', '.join(f'{b} {e[t]:.3g}' for b, e in errs.items())}"
        )
