"""train.fused_qkv_gate (GPT.use_fused_qkv(gate=True)): on the gated layers the q/k/v GEMM also gives the attention
gate's logits (its weight's rows appended), so the gate takes no GEMM of its own; kernels.qkv_norm_rope passes the
logits through and puts their gradient back into the GEMM output's gradient."""

from __future__ import annotations

import pytest
import torch

from lmcore.config import ConfigError, preset
from lmcore.kernels import qkv_norm_rope
from tests.conftest import assert_same_loss_and_grads, compiled_loss, compiled_without_and_with, loss_and_grads
from tests.conftest import next_token_batch
from tests.test_fold_attn_norm import _op_case, fused_model, trains_as_without

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _with_and_without_gate_columns(qkv, cos, sin, gain, scale, h, d, repeat, gate):
    """The op's outputs and qkv's gradient for qkv with `gate` more columns (their own random weights), and for qkv
    without them: [(outputs, grad), (outputs, grad)]."""
    g = torch.Generator().manual_seed(5)
    extra = torch.randn(*qkv.shape[:2], gate, generator=g).to(qkv.device, qkv.dtype)
    res = []
    for x in (torch.cat((qkv, extra), -1), qkv):
        x = x.detach().clone().requires_grad_()
        cols = x.size(-1) - qkv.size(-1)
        out = qkv_norm_rope(x, cos, sin, gain, h, d, repeat, repeat_v=True, vscale=scale, gate=cols)
        out = [o for o in out if o is not None]
        wg = torch.Generator().manual_seed(6)
        ws = [torch.randn(o.shape, generator=wg).to(qkv.device) for o in out]
        sum((o.float() * w).sum() for o, w in zip(out, ws, strict=True)).backward()
        res.append(([o.detach() for o in out], x.grad, ws))
    return res, extra


def test_the_op_passes_the_gate_columns_through_and_back():
    qkv, cos, sin, gain, scale = _op_case()
    ((got, dgot, ws), (ref, dref, _)), extra = _with_and_without_gate_columns(qkv, cos, sin, gain, scale, 4, 8, 2, 4)
    assert len(got) == len(ref) + 1
    for a, r in zip(got, ref):  # q, k, v, v repeated: as without the columns, bit for bit
        assert torch.equal(a, r)
    assert torch.equal(got[-1], extra) and got[-1].is_contiguous()  # the gate's logits
    assert torch.equal(dgot[..., :-4], dref) and torch.equal(dgot[..., -4:], ws[-1])  # their gradient, in place


@pytest.mark.parametrize("fold_norm", [False, True])
def test_model_with_the_gate_from_the_qkv_gemm_is_the_model_without(monkeypatch, fold_norm):
    # tiny: gated layers 0 and 2; in fp32 the loss and every gradient as with the gate's own GEMM, eager and compiled
    model = fused_model()
    if fold_norm:
        model.fold_attn_norm()
    ids, tgt = next_token_batch(model.cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fused_qkv(repeat_v=True, gate=True)
    for b in model.blocks:  # the gate's own GEMM is not run
        if b.attn.attn_gate is not None:
            monkeypatch.setattr(b.attn.attn_gate, "forward", lambda *a: pytest.fail("the gate's own GEMM ran"))
    loss, grads = loss_and_grads(model, ids, tgt)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert grads["blocks.0.attn.attn_gate.weight"].abs().sum() > 0 < grads["blocks.2.attn.attn_gate.bias"].abs().sum()
    monkeypatch.undo()
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_the_switch_needs_fused_qkv_and_trains_as_without(tmp_path):
    with pytest.raises(ConfigError, match="train.fused_qkv_gate=true needs train.fused_qkv=true"):
        preset("tiny", ["train.fused_qkv_gate=true"])
    trains_as_without(tmp_path, ["train.fused_qkv=true"], "fused_qkv_gate")


def _assert_ops_read_padded_rows_in_place(qkv, cos, sin, gain, scale, h, d, repeat, gate):
    """The raw ops (forward, then backward with fixed random gradients) on qkv (B, T, C) with `gate` columns appended,
    on the same values with each row padded to C + gate + 56 with NaN (a 1,032-wide GEMM output as inductor lays it
    out: stride 1,088), and on them as the first T tokens of 2T (copied by the op): every output and gradient equal,
    bit for bit, and q/k/v's gradient contiguous."""
    qkv = torch.cat((qkv, torch.randn(*qkv.shape[:2], gate, device=qkv.device, dtype=qkv.dtype)), -1)
    b, t, c = qkv.shape
    padded = torch.full((b, t, c + 56), float("nan"), dtype=qkv.dtype, device=qkv.device)[..., :c]
    padded.copy_(qkv)
    head = torch.cat((qkv, torch.full_like(qkv, float("nan"))), 1)[:, :t]
    res = []
    for x in (qkv, padded, head):
        outs = torch.ops.lmcore.qkv_norm_rope(x, cos, sin, gain, h, d, repeat, True, 0.0, scale, gate)
        wg = torch.Generator().manual_seed(7)
        gq, gk, gv, gv_rep = (torch.randn(o.shape, generator=wg).to(x.device, x.dtype) for o in outs[:4])
        g_gate = torch.randn(outs[7].shape, generator=wg).to(x.device, x.dtype)
        dqkv, dgain, dvs = torch.ops.lmcore.qkv_norm_rope_backward(gq, gk, gv, gv_rep, x, outs[4], outs[5], cos, sin,
                                                                  gain, h, d, repeat, 0.0, scale, g_gate)
        res.append(([*outs[:6], outs[7], dgain, dvs, dqkv]))
    for got in res[1:]:
        for r, a in zip(res[0], got, strict=True):
            assert torch.equal(a, r)
        assert got[-1].is_contiguous()


def test_the_ops_read_qkv_with_padded_rows_in_place():
    # inductor keeps a padded GEMM output padded for these ops (their tag fixes the stride order only): same values
    assert torch.Tag.needs_fixed_stride_order in torch.ops.lmcore.qkv_norm_rope.default.tags
    assert torch.Tag.needs_fixed_stride_order in torch.ops.lmcore.qkv_norm_rope_backward.default.tags
    _assert_ops_read_padded_rows_in_place(*_op_case(), 4, 8, 2, 4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_cuda_the_kernels_read_qkv_with_padded_rows_in_place(dtype):
    _assert_ops_read_padded_rows_in_place(*_op_case("cuda", b=4, t=2048, h=8, hkv=4, d=64, rope_dims=16, dtype=dtype),
                                          8, 64, 2, 8)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_cuda_the_kernels_read_q_k_v_past_the_gate_columns(dtype):
    # the token stride is (H + 2 Hkv) D + H: the Triton kernels against the PyTorch math on the same values
    case = _op_case("cuda", b=4, t=2048, h=8, hkv=4, d=64, rope_dims=16, dtype=dtype)
    got = _with_and_without_gate_columns(*case, 8, 64, 2, 8)[0][0]
    ref = _with_and_without_gate_columns(*(z.cpu() for z in case), 8, 64, 2, 8)[0][0]
    for a, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(a.cpu(), r)
    torch.testing.assert_close(got[1].cpu(), ref[1])


@pytest.mark.cuda
@needs_cuda
def test_on_cuda_the_compiled_model_with_the_switch_follows_the_model_without():
    model = fused_model("cuda", std=0.05, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16)
    model.fold_attn_norm()
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 128), "cuda")
    on = lambda: model.use_fused_qkv(repeat_v=True, gate=True)  # noqa: E731
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, on)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 2e-3, rtol=5e-2, atol=5e-3)
