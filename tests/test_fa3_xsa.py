"""lmcore.fa3_xsa (train.fa3_xsa_rowsum): attention + XSA + the gate as one op whose backward hands
FA3's backward the rowsums rowsum(dO * O) from XSA's. On CPU through the math backend (FA3's
contract in PyTorch): the math backend against plain attention, the rowsums against their
definition, the op's gradients against autograd of attention then xsa_kernel.xsa_gate, the model with
the switch against the model without, eager and compiled, and a training run. On GPU (marked cuda):
the rowsums against FA3's own preprocess, and the op on FA3 against FA3 then xsa_gate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmcore.fa3_xsa as FX
from lmcore import xsa_kernel
from lmcore.attention import math_attention
from lmcore.config import ConfigError, preset
from lmcore.export import code_bytes_of_export, embedded_sources
from lmcore.model import GPT
from lmcore.train import train
from tests.conftest import (
    assert_same_loss_and_grads,
    compiled_without_and_with,
    loss_and_grads,
    next_token_batch,
    randomize_,
    tiny_model_cfg,
    train_losses,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fa3_dpsum_patch as FX_PATCH  # noqa: E402  (scripts/, not a package)


def _qkv(b=2, t=9, h=4, hkv=2, d=8, device="cpu", dtype=torch.float32, gate=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    v = r(b, t, hkv, d)
    z = r(b, t, h) if gate else None
    return r(b, t, h, d), r(b, t, h, d), v.repeat_interleave(h // hkv, dim=2), v, z


def test_math_backend_is_causal_attention_with_its_log_sum_exp():
    q, k, v_att, _, _ = _qkv()
    out, lse = FX._attention_lse(q, k, v_att, q.size(-1) ** -0.5)
    torch.testing.assert_close(out, math_attention(q, k, v_att), rtol=1e-5, atol=1e-6)
    assert lse.shape == (2, 4, 9)
    s0 = (q[:, 0] * k[:, 0]).sum(-1) * q.size(-1) ** -0.5  # the first query sees only the first key
    torch.testing.assert_close(lse[:, :, 0], s0)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("t", [9, 128])
def test_xsa_backward_with_rowsums_is_xsa_backward_plus_rowsum_of_dy_times_y(t, gate):
    _, _, y, v, z = _qkv(t=t, gate=gate)
    y = torch.randn_like(y)
    dout = torch.randn_like(y)
    dy, dv, dz, rowsum = FX._xsa_backward_rowsum(dout, y, v, z)
    ref = xsa_kernel._xsa_backward_math(dout, y, v, z)
    for got, want in zip((dy, dv, dz), ref):
        assert torch.equal(got, want)
    assert rowsum.shape == (2, 4, 128) and rowsum.dtype == torch.float32 and rowsum.is_contiguous()
    torch.testing.assert_close(rowsum[:, :, :t], torch.einsum("bthd,bthd->bht", dy, y))
    assert torch.equal(rowsum[:, :, t:], torch.zeros(2, 4, 128 - t))  # FA3's padded rows


@pytest.mark.parametrize("gate", [True, False])
def test_op_gradients_are_autograd_of_attention_then_xsa_gate(gate):
    q, k, v_att, v, z = _qkv(gate=gate)
    leaves = [x.clone().requires_grad_() for x in (q, k, v_att, v) + ((z,) if gate else ())]
    w = torch.randn(2, 9, 4, 8)

    def grads(fn):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        out = fn(*xs[:4], xs[4] if gate else None)
        (out * w).sum().backward()
        return out.detach(), [x.grad for x in xs]

    out, got = grads(lambda q, k, va, v, z: FX.attention_xsa(q, k, va, v, z, "math"))
    ref_out, ref = grads(lambda q, k, va, v, z: xsa_kernel.xsa_gate(math_attention(q, k, va), v, z))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the rowsums matter: FA3's backward without them (zero) gives another dq
    y, lse = FX._attention_lse(q, k, v_att, q.size(-1) ** -0.5)
    dy, _, _, rowsum = FX._xsa_backward_rowsum(w, y, v, z)
    dq = FX._attention_backward(dy, q, k, v_att, lse, rowsum, q.size(-1) ** -0.5)[0]
    dq0 = FX._attention_backward(dy, q, k, v_att, lse, torch.zeros_like(rowsum), q.size(-1) ** -0.5)[0]
    torch.testing.assert_close(dq, got[0], rtol=1e-4, atol=1e-5)
    assert (dq - dq0).abs().max() > 0.1


def test_op_takes_only_fa3_or_math_and_repeated_kv():
    q, k, v_att, v, z = _qkv()
    with pytest.raises(ValueError, match="sdpa"):
        FX.attention_xsa(q, k, v_att, v, z, "sdpa")
    with pytest.raises(ValueError, match="repeated"):
        FX.attention_xsa(q, k[:, :, :2], v_att, v, z, "math")


def _model():
    cfg = tiny_model_cfg(gated_attn_layers="0,2")
    model = randomize_(GPT(cfg), std=0.1).train()
    model.use_expanded_kv()
    model.use_fused_xsa_gate()
    return model


def test_model_with_the_op_is_the_model_without_eager_and_compiled():
    model = _model()
    ids, tgt = next_token_batch(model.cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fa3_xsa_rowsum()
    calls = []
    for b in model.blocks:
        b.attn.attn_xsa_op = lambda *a, f=b.attn.attn_xsa_op: calls.append(1) or f(*a)
    loss, grads = loss_and_grads(model, ids, tgt)
    assert len(calls) == model.cfg.num_layers  # every XSA layer (all of them) went through the op
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)
    assert grads["blocks.0.attn.attn_gate.weight"].abs().sum() > 0
    model.use_fa3_xsa_rowsum()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    c_loss, c_grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(c_loss, c_grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)


def test_the_switch_needs_the_fused_xsa_op_and_repeated_kv():
    with pytest.raises(ConfigError, match="fused_xsa_gate"):
        preset("tiny", ["train.fa3_xsa_rowsum=true", "train.expand_kv=true"])
    with pytest.raises(ConfigError, match="expand_kv"):
        preset("tiny", ["train.fa3_xsa_rowsum=true", "train.fused_xsa_gate=true"])


def test_the_exported_script_embeds_the_op_only_with_the_switch():
    base = ["train.fused_xsa_gate=true", "train.expand_kv=true"]
    on, off = preset("record", [*base, "train.fa3_xsa_rowsum=true"]), preset("record", base)
    assert set(embedded_sources(on)) - set(embedded_sources(off)) == {"lmcore/fa3_xsa.py"}
    assert code_bytes_of_export(on) > code_bytes_of_export(off)


def test_training_refuses_the_switch_off_fa3_before_writing_anything(tmp_path):
    on = ["train.fused_xsa_gate=true", "train.expand_kv=true", "train.fa3_xsa_rowsum=true"]
    with pytest.raises(ConfigError, match="model.attention=sdpa: it runs on fa3, not sdpa"):
        train(preset("tiny", [*on, "model.attention=sdpa"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_training_with_the_switch_follows_the_plain_losses(tmp_path):
    on = ["train.iterations=3", "train.log_every=1", "model.attention=math", "train.fused_xsa_gate=true",
          "train.expand_kv=true"]
    plain = train(preset("tiny", on), tmp_path / "plain", progress=False)
    fused = train(preset("tiny", [*on, "train.fa3_xsa_rowsum=true"]), tmp_path / "fused", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "fused")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert fused.val_bpb == pytest.approx(plain.val_bpb, abs=1e-4)


def test_the_fa3_patch_applies_once_to_the_pinned_sources(shared_dir, tmp_path):
    # build_fa3.sh FA3_DPSUM=1: each anchor found exactly once in ../shared/fa3's sources (the pinned commit),
    # a second application refused (its anchors are gone), the schema's new arguments last and optional
    tar = shared_dir / "fa3" / "fa3-src.tar.xz"
    if not tar.is_file():
        pytest.skip(f"{tar} is not present")
    names = [f"fa/hopper/{n}" for n in FX_PATCH.PATCHES]
    subprocess.run(["tar", "-xJf", str(tar), "-C", str(tmp_path), *names], check=True)
    hopper = tmp_path / "fa" / "hopper"
    before = {n: (hopper / n).read_text() for n in FX_PATCH.PATCHES}
    assert FX_PATCH.main(str(hopper)) == 0
    api = (hopper / "flash_api_stable.cpp").read_text()
    assert ('"int sm_margin = 0,"\n        "Tensor? softmax_d = None,"\n        "bool dq_accum_only = False,"\n'
            '        "Tensor(dq_accum_in!)? dq_accum_in = None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");') in api
    assert "to<std::optional<Tensor>>(stack[22])" in api and "to<bool>(stack[23])" in api
    assert "to<std::optional<Tensor>>(stack[24])" in api
    assert "sm_margin, softmax_d_in, dq_accum_only_in, dq_accum_in);  //" in api
    launch = (hopper / "flash_bwd_launch_template.h").read_text()
    skip = launch.index("    if (!params.dq_accum_only)")  # the dQ convert's launch, and only it, is skipped
    assert launch[skip:].split("\n")[1].startswith("    CHECK_CUTLASS(cutlass::kernel_launch<PostprocessKernel>(")
    # a given accumulator: the preprocess gets a null pointer (it then skips its zeroing, and only that);
    # the backward's mainloop still adds into it
    pre = launch[launch.index("typename PreprocessKernel::Arguments"):launch.index("PreprocessKernel::Params")]
    assert "params.dq_accum_given ? nullptr : static_cast<ElementAccum*>(params.dq_accum_ptr)" in pre
    assert launch.count("params.dq_accum_given") == 1 and launch.count("static_cast<ElementAccum*>(params.dq_accum_ptr)") == 2
    kernel = (hopper / "flash_bwd_preprocess_kernel.h").read_text()
    guard = kernel.index("if (Clear_dQaccum && params.ptr_dQaccum != nullptr) {")
    assert "clear(zero);" in kernel[guard:kernel.index("params.dq_semaphore != nullptr", guard)]
    for n, old in before.items():
        notes = sum(new.count(FX_PATCH.NOTE) for _, new in FX_PATCH.PATCHES[n])
        assert (hopper / n).read_text().count(FX_PATCH.NOTE) == notes and old.count(FX_PATCH.NOTE) == 0
    assert FX_PATCH.main(str(hopper)) == 1


def _dq_tile_index(d: int = 64) -> torch.Tensor:
    """Where FA3's backward (sm90, head dim 64) keeps dQ's fp32 accumulator, read from its sources
    (benchmarks/RESULTS.md, session 27): for each position p of a 128-row block's flat 128 * d
    floats, the row * d + col it holds. Each of the 2 MMA warpgroups w adds its rows 64w.. as 4096
    floats, thread t's register i at (i // 4) * 512 + 4 * t + i % 4; register i of t = lane + 32 *
    warp is wgmma's accumulator element: row 16 * warp + lane // 4 + 8 * ((i // 2) % 2), column
    8 * (i // 4) + 2 * (lane % 4) + i % 2."""
    p = torch.arange(FX.BLOCK_M * d)
    w, rem = p // 4096, p % 4096
    i_hi, t, i_lo = rem // 512, (rem % 512) // 4, rem % 4
    lane, warp = t % 32, t // 32
    row = 64 * w + 16 * warp + lane // 4 + 8 * (i_lo // 2)
    return row * d + 8 * i_hi + 2 * (lane % 4) + i_lo % 2


def _dq_from_accumulator(acc: torch.Tensor, t: int, scale: float) -> torch.Tensor:
    """dQ (B, T, H, 64) from FA3's fp32 accumulator (B, H, TR * 64) as its postprocess makes it: the
    tiles in row order, times softmax_scale, rounded to bf16."""
    b, h, _ = acc.shape
    tiles = acc.view(b, h, -1, FX.BLOCK_M * 64)
    rows = torch.empty_like(tiles)
    rows[..., _dq_tile_index().to(acc.device)] = tiles
    return (rows.view(b, h, -1, 64)[:, :, :t] * scale).to(torch.bfloat16).transpose(1, 2).contiguous()


def test_the_dq_accumulator_map_is_a_permutation_with_wgmmas_thread_pattern():
    idx = _dq_tile_index()
    assert torch.equal(idx.sort().values, torch.arange(128 * 64))
    row, col = idx // 64, idx % 64
    # thread 0 of warpgroup 0: its first 4 registers are rows 0, 0, 8, 8 and columns 0, 1, 0, 1
    assert row[:4].tolist() == [0, 0, 8, 8] and col[:4].tolist() == [0, 1, 0, 1]
    # its registers 4..7 (the next 512 floats) are the next 8 columns
    assert row[512:516].tolist() == [0, 0, 8, 8] and col[512:516].tolist() == [8, 9, 8, 9]
    # lane 5 (4 floats a thread): row 1, columns 2 and 3; warp 1 starts at row 16; warpgroup 1 at row 64
    assert row[20:22].tolist() == [1, 1] and col[20:22].tolist() == [2, 3]
    assert row[128] == 16 and row[4096] == 64


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("t", [2048, 200])
def test_on_fa3_the_rowsums_are_fa3s_and_the_op_is_fa3_then_xsa_gate(t, gate):
    reason = FX.fa3_rowsum_reason()
    if reason:
        pytest.skip(reason)
    from flash_attn_interface import flash_attn_func

    q, k, v_att, v, z = _qkv(b=4, t=t, h=8, hkv=4, d=64, device="cuda", dtype=torch.bfloat16, gate=gate)
    w = torch.randn(4, t, 8, 64, device="cuda", dtype=torch.bfloat16)
    scale = 64 ** -0.5
    y, lse = FX._fa3_forward(q, k, v_att, scale)
    dy, _, _, rowsum = FX._xsa_backward_rowsum(w, y, v, z)
    ref = torch.ops.flash_attn_3.bwd(dy, q, k, v_att, y, lse, None, None, None)[0]  # FA3's own preprocess
    torch.testing.assert_close(rowsum[:, :, :t], ref[:, :, :t], rtol=1e-4, atol=1e-4)
    results = []
    for fused in (True, False):
        xs = [x.clone().requires_grad_() for x in (q, k, v_att, v) + ((z,) if gate else ())]
        zz = xs[4] if gate else None
        if fused:
            out = FX.attention_xsa(*xs[:4], zz, "fa3")
        else:
            out = xsa_kernel.xsa_gate(flash_attn_func(xs[0], xs[1], xs[2], causal=True), xs[3], zz)
        (out.float() * w.float()).sum().backward()
        results.append((out.detach(), [x.grad for x in xs]))
    (out_f, g_f), (out_p, g_p) = results
    assert torch.equal(out_f, out_p)  # the same kernels forward
    for a, b in zip(g_f, g_p):  # only the rowsums' order of additions differs
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@needs_cuda
def test_on_fa3_the_compiled_model_with_the_op_is_the_model_without():
    # inductor (fullgraph, as training compiles it) under bf16 autocast, head dim 64 (the FA3 build's)
    reason = FX.fa3_rowsum_reason()
    if reason:
        pytest.skip(reason)
    cfg = tiny_model_cfg(model_dim=256, num_heads=4, num_kv_heads=2, rope_dims=16, gated_attn_layers="0,2")
    model = randomize_(GPT(cfg), std=0.05).cuda().train()
    model.use_expanded_kv()
    model.use_fused_xsa_gate()
    assert model.set_attention_backend("fa3", "cuda") == "fa3"
    ids, tgt = next_token_batch(cfg.vocab_size, (4, 256), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, model.use_fa3_xsa_rowsum)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-3, rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("t", [2048, 200])
def test_fa3_dq_accumulator_layout(t):
    # flash_attn_3::bwd returns dQ's fp32 accumulator beside the dq its postprocess made from it: the
    # map above turns the one into the other exactly (any FA3 build: the plain one needs no patch)
    try:
        from flash_attn_interface import _flash_attn_forward
    except ImportError as e:
        pytest.skip(f"FA3 is not importable ({e})")
    q, k, v, _, _ = _qkv(b=2, t=t, h=8, hkv=8, d=64, device="cuda", dtype=torch.bfloat16, gate=False)
    scale = 64 ** -0.5
    out, lse, *_ = _flash_attn_forward(q, k, v, softmax_scale=scale, causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    acc = torch.ops.flash_attn_3.bwd(dout, q, k, v, out, lse, dq, dk, dv, None, None, None, None, None, None, scale,
                                     True, -1, -1, 0.0, False, 0)[2]
    assert acc.dtype == torch.float32 and tuple(acc.shape) == (2, 8, FX.rounded_rows(t) * 64)
    assert torch.equal(_dq_from_accumulator(acc, t, scale), dq)


@pytest.mark.cuda
@needs_cuda
def test_fa3_dq_accum_only_leaves_dq_unwritten_and_returns_the_same_accumulator():
    # the FA3_DPSUM build's dq_accum_only (scripts/fa3_dpsum_patch.py) skips the dQ convert, and only it
    if FX.fa3_rowsum_reason():
        pytest.skip(FX.fa3_rowsum_reason())
    if "dq_accum_only" not in [a.name for a in torch.ops.flash_attn_3.bwd.default._schema.arguments]:
        pytest.skip("this FA3_DPSUM build predates dq_accum_only")
    from flash_attn_interface import _flash_attn_forward

    q, k, v, _, _ = _qkv(b=2, t=1024, h=8, hkv=8, d=64, device="cuda", dtype=torch.bfloat16, gate=False)
    scale = 64 ** -0.5
    out, lse, *_ = _flash_attn_forward(q, k, v, softmax_scale=scale, causal=True)
    dout = torch.randn_like(out)
    results = []
    for only in (False, True):
        dq = torch.full_like(q, float("nan"))
        acc = torch.ops.flash_attn_3.bwd(dout, q, k, v, out, lse, dq, None, None, None, None, None, None, None, None,
                                         scale, True, -1, -1, 0.0, False, 0, None, only)[2]
        results.append((dq, acc.clone()))
    (dq_plain, acc_plain), (dq_only, acc_only) = results
    assert torch.equal(_dq_from_accumulator(acc_plain, 1024, scale), dq_plain)
    assert dq_only.isnan().all()  # not written
    torch.testing.assert_close(acc_only, acc_plain, rtol=1e-5, atol=1e-5)  # the atomics' order only


# ---------------------------------------------------------------- train.fa3_dq_accum: q's gradient as FA3's dQ accumulator


def test_the_kernels_accumulator_offsets_are_fa3s_map_and_round_trip():
    from lmcore.kernels import acc_offsets, from_accumulator, to_accumulator

    off = acc_offsets()
    assert torch.equal(_dq_tile_index()[off.flatten()], torch.arange(128 * 64))  # (r, c) holds r * 64 + c
    g = torch.randn(2, 200, 3, 64)
    acc = to_accumulator(g, 256)
    assert acc.shape == (2, 3, 256 * 64) and torch.equal(from_accumulator(acc, 200), g)
    # FA3's postprocess as the test above reads it: the same rows, times softmax_scale, in bf16
    assert torch.equal((from_accumulator(acc, 200) * 0.125).bfloat16(), _dq_from_accumulator(acc, 200, 0.125))
    assert acc.view(2, 3, 2, 8192)[:, :, 1].flatten()[off[72:].flatten()].abs().sum() == 0  # rows past T: zero
    with pytest.raises(ValueError, match="head dim 64"):
        acc_offsets(32)


@pytest.mark.parametrize("gate", [True, False])
def test_op_with_a_dq_slot_gives_qs_gradient_as_the_slots_accumulator(gate):
    q, k, v_att, v, z = _qkv(b=2, t=130, h=4, hkv=2, d=64, gate=gate)
    w = torch.randn(q.shape)
    from lmcore.kernels import from_accumulator

    grads = []
    for with_slot in (False, True):
        xs = [x.clone().requires_grad_() for x in (q, k, v_att, v)]
        slot = torch.zeros(2, 4, 256 * 64, requires_grad=True) if with_slot else None
        (FX.attention_xsa(*xs, z, "math", slot) * w).sum().backward()
        grads.append([x.grad for x in xs] + ([slot.grad] if with_slot else []))
    (dq, *rest), (none, *rest_s, acc) = grads
    assert none is None  # q's gradient went to the slot
    for a, b in zip(rest, rest_s, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(from_accumulator(acc, 130) * 64 ** -0.5, dq, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dq_slot"):
        FX.attention_xsa(q, k, v_att, v, z, "math", torch.zeros(2, 4, 130 * 64))


def _dq_model(dq_accum: bool):
    cfg = tiny_model_cfg(model_dim=256, num_heads=4, num_kv_heads=2, rope_dims=16, gated_attn_layers="0,2")
    model = randomize_(GPT(cfg), std=0.05).train()
    model.use_expanded_kv()
    model.use_fused_xsa_gate()
    model.use_fused_qkv(True)
    model.use_fa3_xsa_rowsum(dq_accum)
    return model


def test_model_with_dq_accum_is_the_model_without_eager_and_compiled():
    model = _dq_model(False)
    ids, tgt = next_token_batch(model.cfg.vocab_size, (2, 160))
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fa3_xsa_rowsum(dq_accum=True)
    slots = []
    for b in model.blocks:
        b.attn.attn_xsa_op = lambda *a, f=b.attn.attn_xsa_op: slots.append(a[6]) or f(*a)
    loss, grads = loss_and_grads(model, ids, tgt)
    assert len(slots) == model.cfg.num_layers and all(s is not None and s.shape == (2, 4, 256 * 64) for s in slots)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)
    slots.clear()
    with torch.no_grad():  # evaluation: no slot (nothing to carry), the same loss
        assert model(ids, tgt).item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert slots == [None] * model.cfg.num_layers
    assert grads["blocks.0.attn.q_gain"].abs().sum() > 0  # q's backward ran on the accumulator
    model.use_fa3_xsa_rowsum(dq_accum=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    c_loss, c_grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(c_loss, c_grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)


def test_the_exported_script_with_dq_accum_embeds_no_module_more_than_its_needs():
    base = ["train.fused_xsa_gate=true", "train.expand_kv=true", "train.fa3_xsa_rowsum=true", "train.fused_qkv=true"]
    on, off = preset("record", [*base, "train.fa3_dq_accum=true"]), preset("record", base)
    assert embedded_sources(on) == embedded_sources(off)
    assert {"lmcore/kernels.py", "lmcore/xsa_kernel.py", "lmcore/fa3_xsa.py"} <= set(embedded_sources(on))


def test_dq_accum_needs_the_rowsum_op_and_fused_qkv():
    base = ["train.fused_xsa_gate=true", "train.expand_kv=true"]
    with pytest.raises(ConfigError, match="fa3_dq_accum=true needs"):
        preset("tiny", [*base, "train.fused_qkv=true", "train.fa3_dq_accum=true"])
    with pytest.raises(ConfigError, match="fa3_dq_accum=true needs"):
        preset("tiny", [*base, "train.fa3_xsa_rowsum=true", "train.fa3_dq_accum=true"])
    preset("tiny", [*base, "train.fa3_xsa_rowsum=true", "train.fused_qkv=true", "train.fa3_dq_accum=true"])


def _qkv_acc_case(device: str, t: int = 200):
    """A fused q/k/v input at head dim 64 and an accumulator for q's gradient (rows past T left as noise)."""
    from lmcore.layers import rope_tables

    g = torch.Generator(device=device).manual_seed(3)
    h, hkv, d = 8, 4, 64
    cfg = tiny_model_cfg(rope_dims=16, model_dim=h * d, num_heads=h, num_kv_heads=hkv)
    cos, sin = (z.float().to(device) for z in rope_tables(cfg, t, torch.device("cpu")))
    qkv = torch.randn(2, t, (h + 2 * hkv) * d, generator=g, device=device).bfloat16()
    gain = torch.rand(h, generator=g, device=device) + 0.5
    acc = torch.randn(2, h, FX.rounded_rows(t) * d, generator=g, device=device)
    return qkv, cos, sin, gain, acc


def _qkv_backward_both_ways(qkv, cos, sin, gain, acc):
    """kernels' q/k/v backward given q's gradient as the accumulator, and given it read out (fp32) first."""
    import lmcore.kernels as K

    b, t, _ = qkv.shape
    q, k, _ = K._split_qkv(qkv, 8, 64)
    (_, rq), (_, rk) = K._forward_math(q, cos, sin, gain), K._forward_math(k, cos, sin, None, 2)
    gk, gv = torch.ones(b, t, 8, 64, device=qkv.device).bfloat16(), torch.ones(b, t, 4, 64, device=qkv.device).bfloat16()
    via_acc = K._qkv_norm_rope_backward(acc, gk, gv, None, qkv, rq, rk, cos, sin, gain, 8, 64, 2, 0.125, None, None)[:2]
    read = (K.from_accumulator(acc, t) * 0.125).contiguous()
    return via_acc, K._qkv_norm_rope_backward(read, gk, gv, None, qkv, rq, rk, cos, sin, gain, 8, 64, 2, 0.0, None, None)[:2]


def test_qkv_backward_reads_the_accumulator_as_its_read_out_gradient():
    (a, ga), (b, gb) = _qkv_backward_both_ways(*_qkv_acc_case("cpu"))
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_the_q_kernel_from_the_accumulator_takes_only_its_layouts_head_dim_and_rotation():
    import lmcore.kernels as K

    qkv, cos, sin, gain, acc = _qkv_acc_case("cpu")
    q = K._split_qkv(qkv, 8, 64)[0]
    with pytest.raises(ValueError, match="rotated half a multiple of 8"):
        K._q_backward_acc_triton(acc, q, None, cos[:, :4], sin[:, :4], gain, torch.empty_like(q), 0.125)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("t", [2048, 200])
def test_on_cuda_the_q_kernel_reads_the_accumulator_as_its_read_out_gradient(t):
    # the Triton kernel's block permute (_acc_tile) against kernels.acc_offsets: the same fp32 products, bit for bit
    import lmcore.kernels as K

    case = _qkv_acc_case("cuda", t)
    assert K._use_triton(K._split_qkv(case[0], 8, 64)[0], 8)
    (a, ga), (b, gb) = _qkv_backward_both_ways(*case)
    assert torch.equal(a, b)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)  # the gain's partial sums group otherwise


@pytest.mark.cuda
@needs_cuda
def test_on_fa3_the_compiled_model_with_dq_accum_is_the_model_without():
    reason = FX.fa3_rowsum_reason(dq_accum=True)
    if reason:
        pytest.skip(reason)
    model = _dq_model(False).cuda()
    assert model.set_attention_backend("fa3", "cuda") == "fa3"
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 256), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(
        model, ids, tgt, lambda: model.use_fa3_xsa_rowsum(dq_accum=True))
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-3, rtol=2e-2, atol=2e-3)


def test_training_refuses_dq_accum_off_the_accumulators_layout_before_writing_anything(tmp_path):
    on = ["train.fused_xsa_gate=true", "train.expand_kv=true", "train.fa3_xsa_rowsum=true", "train.fused_qkv=true",
          "train.fa3_dq_accum=true", "model.attention=math"]
    cfg = preset("tiny", on)
    assert cfg.model.head_dim != 64
    with pytest.raises(ConfigError, match="fa3_dq_accum needs head dim 64"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_dq_bench_says_in_one_line_why_it_cannot_run_without_fa3s_dq_accum_only(tmp_path):
    # benchmarks/dq_accum_bench.py with no FA3 on its path (PYTHONPATH: the checkout only)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "dq_accum_bench.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["dq_accum_bench: FA3 is not importable (No module named 'flash_attn_interface')"]
