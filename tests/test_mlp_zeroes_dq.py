"""train.mlp_zeroes_dq_accum: the MLP's backward zeroes the attention backward's dQ accumulator (lmcore.fa3_xsa).

CPU: the token's wiring on the math backends (the op adds q's gradient into the buffer its token's gradient
brings, the MLP op's backward returns zeros of the token's shape, the model's gradients are the plain ones,
eager and compiled); `cuda`: the ping-pong kernel's zeroing and FA3's dq_accum_in (the FA3_DPSUM build's).
"""

from __future__ import annotations

import pytest
import torch

from lmcore import fa3_xsa as FX
from lmcore import mlp_kernel as MK
from lmcore.config import ConfigError, preset
from lmcore.kernels import from_accumulator
from lmcore.model import GPT
from tests.conftest import (
    assert_same_loss_and_grads,
    loss_and_grads,
    next_token_batch,
    randomize_,
    tiny_model_cfg,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class _GradIs(torch.autograd.Function):
    """x's gradient is `grad` (a stand-in for the MLP op: its backward hands the token a buffer)."""

    @staticmethod
    def forward(ctx, x, grad):
        ctx.grad = grad
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.grad, None


def _case(t=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, t, 4, 64, generator=g) for _ in range(3))
    v_kv, z = v[:, :, ::2].contiguous(), torch.randn(2, t, 4, generator=g)
    return q, k, v_kv.repeat_interleave(2, dim=2), v_kv, z, torch.randn(q.shape, generator=g)


@pytest.mark.parametrize("fill", [0.0, 0.25])
def test_op_adds_qs_gradient_into_the_buffer_its_token_brings(fill):
    q, k, v_att, v, z, w = _case()
    runs = []
    for token in (False, True):
        xs = [x.clone().requires_grad_() for x in (q, k, v_att, v)]
        slot = torch.zeros(2, 4, FX.rounded_rows(130) * 64, requires_grad=True)
        out = FX.attention_xsa(*xs, z, "math", slot, token=token)
        buf = torch.full(slot.shape, fill)
        loss = (out[0] * w).sum() + _GradIs.apply(out[1], buf) if token else (out * w).sum()
        loss.backward()
        runs.append((xs, slot.grad, buf))
    (xs, acc, _), (xs_t, acc_t, buf) = runs
    assert torch.equal(buf, acc_t)  # q's gradient was added into the given buffer, in place
    torch.testing.assert_close(acc_t, acc + fill, rtol=0, atol=1e-6)
    for a, b in zip(xs, xs_t, strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    torch.testing.assert_close(from_accumulator(acc_t - fill, 130) * 64 ** -0.5,
                               from_accumulator(acc, 130) * 64 ** -0.5, rtol=0, atol=1e-6)


def test_op_without_a_gradient_for_its_token_is_the_op_without_one():
    q, k, v_att, v, z, w = _case(t=70)
    grads = []
    for token in (False, True):
        slot = torch.zeros(2, 4, FX.rounded_rows(70) * 64, requires_grad=True)
        out = FX.attention_xsa(q, k, v_att, v, z, "math", slot, token=token)
        assert not token or (out[1].shape == slot.shape and out[1].dtype == torch.float32)
        ((out[0] if token else out) * w).sum().backward()  # the token unused: FA3 zeroes its own
        grads.append(slot.grad)
    assert torch.equal(*grads)
    with pytest.raises(ValueError, match="token needs a dq slot"):
        FX.attention_xsa(q, k, v_att, v, z, "math", None, token=True)


def test_mlp_ops_backward_gives_its_token_zeros_of_its_shape_and_the_plain_gradients():
    g = torch.Generator().manual_seed(1)
    x, w_fc, w_proj = torch.randn(40, 32, generator=g), torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)
    dy = torch.randn(40, 32, generator=g)
    runs = []
    for token in (None, torch.empty((), dtype=torch.float32).expand(2, 3, 640).requires_grad_()):
        xs = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        (MK.leaky_mlp(*xs, 0.5, token=token) * dy).sum().backward()
        runs.append(([t.grad for t in xs], None if token is None else token.grad))
    (plain, none), (grads, zeros) = runs
    assert none is None and zeros.shape == (2, 3, 640) and zeros.dtype == torch.float32 and zeros.is_contiguous()
    assert torch.equal(zeros, torch.zeros(2, 3, 640))
    for a, b in zip(plain, grads, strict=True):
        assert torch.equal(a, b)


def _model():
    cfg = tiny_model_cfg(model_dim=256, num_heads=4, num_kv_heads=2, rope_dims=16, gated_attn_layers="0,2")
    model = randomize_(GPT(cfg), std=0.05).train()
    model.use_expanded_kv()
    model.use_fused_xsa_gate()
    model.use_fused_qkv(True)
    model.use_fa3_xsa_rowsum(dq_accum=True)
    model.use_fused_mlp()
    return model


def test_model_with_the_switch_is_the_model_without_eager_and_compiled():
    model = _model()
    ids, tgt = next_token_batch(model.cfg.vocab_size, (2, 160))
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    with pytest.raises(RuntimeError, match="use_fused_mlp first"):
        _model_without_mlp().use_mlp_zeroes_dq_accum()
    model.use_mlp_zeroes_dq_accum()
    assert all(b.zero_dq for b in model.blocks)
    tokens = []
    for b in model.blocks:
        b.mlp.fused_op = lambda *a, f=b.mlp.fused_op, **kw: tokens.append(kw["token"]) or f(*a, **kw)
    loss, grads = loss_and_grads(model, ids, tgt)
    shape = (2, 4, FX.rounded_rows(160) * 64)
    assert len(tokens) == model.cfg.num_layers and all(t is not None and t.shape == shape for t in tokens)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 0.0, rtol=0, atol=0)
    tokens.clear()
    with torch.no_grad():  # evaluation: no slot, so no token
        assert model(ids, tgt).item() == pytest.approx(plain_loss.item(), abs=1e-6)
    assert tokens == [None] * model.cfg.num_layers
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    c_loss, c_grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(c_loss, c_grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)


def _model_without_mlp():
    cfg = tiny_model_cfg(model_dim=256, num_heads=4, num_kv_heads=2, rope_dims=16)
    return GPT(cfg)


def test_the_switch_needs_dq_accum_and_the_pingpong_kernel():
    base = ["train.fused_xsa_gate=true", "train.expand_kv=true", "train.fa3_xsa_rowsum=true", "train.fused_qkv=true",
            "train.fused_mlp=true"]
    for missing in ("train.fa3_dq_accum=true", "train.fused_mlp_pingpong=true"):
        rest = [o for o in (*base, "train.fa3_dq_accum=true", "train.fused_mlp_pingpong=true") if o != missing]
        with pytest.raises(ConfigError, match="mlp_zeroes_dq_accum=true needs"):
            preset("tiny", [*rest, "train.mlp_zeroes_dq_accum=true"])
    on = preset("tiny", [*base, "train.fa3_dq_accum=true", "train.fused_mlp_pingpong=true",
                         "train.mlp_zeroes_dq_accum=true"])
    assert on.train.mlp_zeroes_dq_accum


# ------------------------------------------------------------------------------------------------ cuda


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("sign", [False, True])
@pytest.mark.parametrize("m", [98_304, 1_000])
def test_pingpong_backward_zeroes_its_buffer_and_writes_what_it_writes_without(sign, m):
    from lmcore import mlp_pingpong as PP

    if PP.gluon is None or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the ping-pong kernel needs Gluon and an sm_90 GPU")
    g = torch.Generator(device="cuda").manual_seed(2)
    dy = torch.randn(m, 512, generator=g, device="cuda").bfloat16()
    w_proj = torch.randn(512, 1536, generator=g, device="cuda").bfloat16() * 0.05
    pre = torch.randn(m, 1536, generator=g, device="cuda").bfloat16()
    signs = MK._pack(pre > 0) if sign else None
    kept = (torch.nn.functional.leaky_relu(pre.float(), 0.5).square().bfloat16()) if sign else pre
    outs = []
    for n in (None, 201_326_592 // 4 if m > 1_000 else 12_345):
        zero = None if n is None else torch.full((n + 7,), float("nan"), device="cuda")
        dpre = torch.empty_like(pre)
        PP.launch(dy, w_proj, kept, dpre, 0.5, True, MK._sm_count(dy.device), b_kn=True, signs=signs,
                  zero=None if zero is None else zero[:n])
        outs.append(dpre)
        if zero is not None:
            assert torch.equal(zero[:n], torch.zeros(n, device="cuda")) and zero[n:].isnan().all()  # no store past n
    assert torch.equal(*outs)


def _needs_fa3_with_dq_accum_in() -> None:
    reason = FX.fa3_rowsum_reason(dq_accum=True, accum_in=True)
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@needs_cuda
def test_fa3_adds_into_a_given_accumulator_and_does_not_zero_it():
    _needs_fa3_with_dq_accum_in()
    from flash_attn_interface import _flash_attn_forward

    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(2, 1000, 8, 64, generator=g, device="cuda").bfloat16() for _ in range(3))
    scale = 64 ** -0.5
    out, lse, *_ = _flash_attn_forward(q, k, v, softmax_scale=scale, causal=True)
    dout = torch.randn_like(out)
    rowsum = torch.zeros(2, 8, FX.rounded_rows(1000), device="cuda")
    rowsum[..., :1000] = (dout.float() * out.float()).sum(-1).transpose(1, 2)
    acc, dk, dv = FX._fa3_backward(dout, q, k, v, out, lse, rowsum, scale, True, None)
    for fill in (0.0, 0.5):
        given = torch.full_like(acc, fill)
        empty, dk_g, dv_g = FX._fa3_backward(dout, q, k, v, out, lse, rowsum, scale, True, given)
        assert empty.numel() == 0
        torch.testing.assert_close(given, acc + fill, rtol=1e-5, atol=1e-5)  # added into, not zeroed first
        assert torch.equal(dk_g, dk) and torch.equal(dv_g, dv)  # no atomics: the same bits


@pytest.mark.cuda
@needs_cuda
def test_on_fa3_the_compiled_model_with_the_switch_is_the_model_without():
    from tests.conftest import compiled_without_and_with

    _needs_fa3_with_dq_accum_in()
    model = _model().cuda()
    model.use_fused_mlp(MK.PINGPONG)
    assert model.set_attention_backend("fa3", "cuda") == "fa3"
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 256), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, model.use_mlp_zeroes_dq_accum)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-3, rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
@needs_cuda
def test_pingpong_probes_and_launch_refuses_what_it_cannot_take():
    # benchmarks/mlp_pingpong_bench.py --probe: probe 1 writes neither pre nor post, probe 3 writes what the kernel
    # writes; the launch refuses a buffer to zero that is not contiguous fp32, and a probe on the backward
    from lmcore import mlp_pingpong as PP

    if PP.gluon is None or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the ping-pong kernel needs Gluon and an sm_90 GPU")
    x = torch.randn(1000, 512, device="cuda").bfloat16()
    w = torch.randn(1536, 512, device="cuda").bfloat16()
    pre, post = (torch.full((1000, 1536), float("nan"), device="cuda").bfloat16() for _ in range(2))
    sms = MK._sm_count(x.device)
    PP.launch(x, w, pre, post, 0.5, False, sms, probe=1)
    assert pre.isnan().all() and post.isnan().all()
    plain = [torch.empty_like(pre) for _ in range(2)]
    PP.launch(x, w, *plain, 0.5, False, sms)
    PP.launch(x, w, pre, post, 0.5, False, sms, probe=3)  # from the registers: the same values
    assert torch.equal(pre, plain[0]) and torch.equal(post, plain[1])
    for bad in (torch.zeros(64, device="cuda").half(), torch.zeros(64, 2, device="cuda").t()):
        with pytest.raises(ValueError, match="zero: .* needs a contiguous float32"):
            PP.launch(x, w, pre, post, 0.5, False, sms, zero=bad)
    with pytest.raises(ValueError, match="probe=1: 1, 2 or 3, on the forward"):
        PP.launch(x, w.t().contiguous(), pre, post, 0.5, True, sms, b_kn=True, probe=1)
