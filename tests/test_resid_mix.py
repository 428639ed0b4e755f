"""train.fused_resid_mix (GPT.use_fused_resid_mix, lmcore.mix_kernel): a block's residual mix, its row scale and the
q/k/v GEMM as one op whose backward writes dx, dx0 and resid_mix's gradient (column sums) in one pass. The forward
is the plain path's PyTorch; the backward is the same math with x_in's gradient kept in fp32 between."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmcore.mix_kernel as MK
from lmcore.config import ConfigError, preset
from lmcore.layers import as_dtype, rms_scale
from lmcore.mix_kernel import resid_mix_qkv
from lmcore.model import GPT
from tests.conftest import (
    assert_same_loss_and_grads,
    compiled_without_and_with,
    loss_and_grads,
    next_token_batch,
    tiny_model_cfg,
)
from tests.test_fold_attn_norm import FOLD_SETS, fused_model, trains_as_without

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _case(device: str = "cpu", b: int = 2, t: int = 7, d: int = 16, o: int = 40, dtype: torch.dtype = torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    x, x0 = (torch.randn(b, t, d, generator=g, device=device).to(dtype) for _ in range(2))
    mix = torch.randn(2, d, generator=g, device=device)
    w = (torch.randn(o, d, generator=g, device=device) / d**0.5).to(dtype)
    return x, x0, mix, w


def _plain(x, x0, mix, w, factor):
    m = mix.to(x.dtype)
    x_in = m[0] * x + m[1] * x0
    return x_in, rms_scale(x_in, factor), F.linear(x_in, w)


def _outputs_and_grads(fn, x, x0, mix, w, factor, same_x: bool = False):
    """fn's outputs and the gradients of x, x0, mix and w for a fixed random weighting of the three outputs
    (same_x: x0 is x itself, as at the first block)."""
    x, mix, w = (z.detach().clone().requires_grad_() for z in (x, mix, w))
    x0 = x if same_x else x0.detach().clone().requires_grad_()
    outs = fn(x, x0, mix, w, factor)
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=x.device)).sum() for o in outs)
    loss.backward()
    return outs, [z.grad for z in ((x, mix, w) if same_x else (x, x0, mix, w))]


@pytest.mark.parametrize("same_x", [False, True])
def test_the_op_is_the_plain_formula_and_its_gradients_in_fp32(same_x):
    case = _case()
    outs, grads = _outputs_and_grads(resid_mix_qkv, *case, 0.5, same_x)
    plain_outs, plain_grads = _outputs_and_grads(_plain, *case, 0.5, same_x)
    for a, p in zip(outs, plain_outs, strict=True):
        torch.testing.assert_close(a, p, rtol=0, atol=0)  # the forward is the same PyTorch
    for a, p in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-5)
    assert grads[-2].abs().sum() > 0 and grads[-2].shape == (2, 16)  # mix's


def test_in_bf16_the_gradients_are_as_close_to_fp32_as_the_plain_paths():
    # the op keeps x_in's gradient and the column sums in fp32, where eager bf16 rounds each product: against the
    # fp32 math on the same bf16 values (mix rounded to bf16 as both take it), the op's error is at most the plain
    # path's (a rounding of the largest value's slack), and both are within bf16's few percent
    x, x0, mix, w = _case(dtype=torch.bfloat16, t=64, d=32)
    _, grads = _outputs_and_grads(resid_mix_qkv, x, x0, mix, w, 0.7)
    _, plain_grads = _outputs_and_grads(_plain, x, x0, mix, w, 0.7)
    _, ref = _outputs_and_grads(_plain, x.float(), x0.float(), mix.bfloat16().float(), w.float(), 0.7)
    for a, p, f in zip(grads, plain_grads, ref, strict=True):
        assert a.dtype == p.dtype
        err, plain_err = (a.float() - f).abs().max(), (p.float() - f).abs().max()
        assert err <= plain_err + 2 ** -8 * f.abs().max()
        torch.testing.assert_close(a.float(), f, rtol=2e-2, atol=2e-2 * f.abs().max().item())


def test_the_backward_math_by_its_definition():
    # rows (N, D): g = g_in + g_mm + g_r coef r^3 x_in; dx = m0 g, dx0 = m1 g, dmix = the column sums of g x, g x0
    gen = torch.Generator().manual_seed(3)
    n, d = 5, 8
    g_in, g_mm, x, x0 = (torch.randn(n, d, generator=gen) for _ in range(4))
    g_r, r = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    mix = torch.randn(2, d, generator=gen)
    dx, dx0, dmix = MK._backward_math(g_in, g_mm, g_r, r, x, x0, mix, -0.25)
    g = g_in + g_mm - 0.25 * (g_r * r**3)[:, None] * (mix[0] * x + mix[1] * x0)
    torch.testing.assert_close(dx, mix[0] * g)
    torch.testing.assert_close(dx0, mix[1] * g)
    torch.testing.assert_close(dmix, torch.stack(((g * x).sum(0), (g * x0).sum(0))))


def test_the_op_refuses_shapes_that_do_not_fit():
    x, x0, mix, w = _case()
    with pytest.raises(ValueError, match=r"resid_mix_qkv: x \(2, 7, 16\), x0 \(2, 7, 15\)"):
        resid_mix_qkv(x, x0[..., :15], mix, w, 1.0)
    with pytest.raises(ValueError, match="mix \\(3, 16\\)"):
        resid_mix_qkv(x, x0, torch.zeros(3, 16), w, 1.0)


def _folded(device: str = "cpu", std: float = 0.1, **cfg_kw) -> GPT:
    model = fused_model(device, std=std, **cfg_kw)
    model.use_fused_qkv(repeat_v=True, gate=True)  # the gated layers' logits from the same GEMM
    model.fold_attn_norm()
    return model


def test_model_with_the_fused_mix_is_the_model_without(monkeypatch):
    # on the folded path (tiny: 4 layers, U-Net skips, gated layers 0 and 2, value embeddings on 1 and 3), in fp32:
    # the loss and every gradient as without the switch, eager and compiled (aot_eager); every block took the op
    model = _folded()
    ids, tgt = next_token_batch(model.cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fused_resid_mix()
    calls = []
    for b in model.blocks:
        monkeypatch.setattr(b, "mix_op", lambda *a, _op=b.mix_op: calls.append(a[3].shape) or _op(*a))
    loss, grads = loss_and_grads(model, ids, tgt)
    # q (32) + k and v (2 x 16) rows, and the gate's 4 (heads) on the gated layers
    assert calls == [(68, 32), (64, 32), (68, 32), (64, 32)]
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert all(grads[f"blocks.{i}.resid_mix"].abs().sum() > 0 for i in range(4))
    monkeypatch.undo()
    # and compiled (dynamo + AOT, no inductor), the loss within 1e-5 and the gradients: torch 2.11's dynamo gave
    # x_in's gradient to a no-op .float() of it inside the op's forward, so every gradient below the last block's mix
    # went wrong while the loss stayed right
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    loss, grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)


def test_as_dtype_gives_the_tensor_itself_in_its_own_dtype():
    # the op's forward takes x_in's fp32 view and its GEMM's operands through as_dtype: no second name for x_in
    x = torch.randn(3, 4)
    assert as_dtype(x, torch.float32) is x
    y = as_dtype(x, torch.bfloat16)
    assert y is not x and y.dtype == torch.bfloat16 and torch.equal(y, x.to(torch.bfloat16))


def test_the_switch_needs_the_folded_norm(tmp_path):
    with pytest.raises(ConfigError, match="train.fused_resid_mix=true needs train.fold_attn_norm=true"):
        preset("tiny", [*FOLD_SETS, "train.fused_resid_mix=true"])
    with pytest.raises(ValueError, match="use_fused_resid_mix needs fold_attn_norm first"):
        GPT(tiny_model_cfg()).use_fused_resid_mix()
    trains_as_without(tmp_path, [*FOLD_SETS, "train.fold_attn_norm=true"], "fused_resid_mix")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [98304, 37])
def test_on_cuda_the_kernel_is_the_pytorch_math(n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(4)
    d = 512
    g_in, g_mm, x, x0 = (torch.randn(n, d, generator=gen, device="cuda").to(dtype) for _ in range(4))
    g_r, r = torch.randn(n, generator=gen, device="cuda"), torch.rand(n, generator=gen, device="cuda") + 0.5
    mix = torch.randn(2, d, generator=gen, device="cuda")
    args = (g_in, g_mm, g_r, r, x, x0, mix, -1.0 / (0.5 * d))
    assert MK._use_triton(x)
    dx, dx0, dmix = MK._backward_triton(*args)
    rdx, rdx0, rdmix = MK._backward_math(*args)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(dx, rdx, **tol)  # a bf16 rounding at most: fp32 sums in another order before it
    torch.testing.assert_close(dx0, rdx0, **tol)
    torch.testing.assert_close(dmix, rdmix, rtol=1e-3, atol=2e-3 * n**0.5)  # fp32 column sums in another order


@pytest.mark.cuda
@needs_cuda
def test_on_cuda_the_compiled_model_with_the_switch_follows_the_model_without():
    model = _folded("cuda", std=0.05, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16)
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 128), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, model.use_fused_resid_mix)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-3, rtol=5e-2, atol=5e-3)
