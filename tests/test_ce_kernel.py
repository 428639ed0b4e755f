"""lmcore.ce_kernel (train.fused_softcap_ce): the op's PyTorch kernels against F.cross_entropy of the
softcapped logits (values and autograd's gradient, with and without the softcap, fp32 and bf16);
the model with the op against the plain model, eager and compiled, its other paths untouched, and
a training run with the switch against the plain one. The Triton kernels against the PyTorch ones
on GPU (marked cuda)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmcore.ce_kernel as CE
from lmcore.config import preset
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


def _inputs(n: int, v: int, device: str = "cpu", seed: int = 0):
    """z (N, V) fp32 at a scale where the softcap bends (|z| up to ~80 against cap 30), targets, row weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, v, generator=g, device=device) * 20
    return z, torch.randint(0, v, (n,), generator=g, device=device), torch.rand(n, generator=g, device=device)


def _plain(z, targets, cap):
    return F.cross_entropy(cap * torch.tanh(z / cap) if cap > 0 else z, targets, reduction="none")


def _loss_and_grad(fn, z0, targets, w, cap):
    z = z0.clone().requires_grad_()
    loss = fn(z, targets, cap)
    (loss * w).sum().backward()  # a gradient of its own for each row
    return loss.detach(), z.grad


@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize(("n", "v"), [(37, 64), (8, 1000)])
def test_op_and_its_backward_are_cross_entropy_of_the_softcapped_logits(n, v, cap):
    z, t, w = _inputs(n, v)
    ref, ref_dz = _loss_and_grad(_plain, z.double(), t, w.double(), cap)  # fp64, from the same fp32 values
    loss, dz = _loss_and_grad(CE.softcap_cross_entropy, z, t, w, cap)
    assert loss.dtype == torch.float32 and loss.shape == (n,) and dz.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dz.double(), ref_dz, rtol=1e-5, atol=1e-9)
    if cap:
        assert (loss - _plain(z, t, 0.0)).abs().max() > 0.1  # the cap changed the loss
    assert dz[torch.arange(n), t].lt(0).all()  # the target's logit pulled up


def test_bf16_logits_give_a_bf16_gradient_of_the_fp32_math():
    z, t, w = _inputs(64, 128, seed=1)
    zb = z.bfloat16()
    loss, dz = _loss_and_grad(CE.softcap_cross_entropy, zb, t, w, 30.0)
    ref, ref_dz = _loss_and_grad(_plain, zb.float(), t, w, 30.0)  # the fp32 math on bf16's values
    assert loss.dtype == torch.float32 and dz.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dz, ref_dz.bfloat16())  # one rounding to bf16
    assert torch.equal(dz, CE._backward_math(w, zb, t, CE._forward_math(zb, t, 30.0)[1], 30.0))


def test_fused_loss_model_is_the_plain_model_eager_and_compiled():
    model = randomize_(GPT(tiny_model_cfg()), std=0.1).train()
    ids, tgt = next_token_batch(model.cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    plain_rows, plain_logits = model(ids, tgt, reduction="none"), model(ids)
    model.use_fused_softcap_ce()
    calls = []
    model.ce_op = lambda *a: calls.append(1) or CE.softcap_cross_entropy(*a)
    loss, grads = loss_and_grads(model, ids, tgt)
    assert calls == [1]  # the mean loss went through the op
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)
    assert grads["tok_emb.weight"].abs().sum() > 0
    assert torch.equal(model(ids, tgt, reduction="none"), plain_rows) and torch.equal(model(ids), plain_logits)
    assert calls == [1]  # per-token losses and logits: the plain path
    model.use_fused_softcap_ce()
    assert model.ce_op is CE.softcap_cross_entropy
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    c_loss, c_grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(c_loss, c_grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-6)


def test_training_with_the_switch_follows_the_plain_losses(tmp_path):
    on = ["train.iterations=3", "train.log_every=1"]
    plain = train(preset("tiny", on), tmp_path / "plain", progress=False)
    fused = train(preset("tiny", [*on, "train.fused_softcap_ce=true"]), tmp_path / "fused", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "fused")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert fused.val_bpb == pytest.approx(plain.val_bpb, abs=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cap", [30.0, 0.0])
@pytest.mark.parametrize(("n", "tile"), [(2048, None), (1000, None), (1000, (4, 4)), (2048, (8, 8))])
def test_triton_kernels_are_the_pytorch_kernels(n, tile, cap):
    assert CE.triton is not None
    z, t, g = _inputs(n, 1024, device="cuda")
    z = z.bfloat16()
    rows, warps = tile or (None, None)
    loss, lse = CE._forward_triton(z, t, cap, rows, warps)
    ref, ref_lse = CE._forward_math(z, t, cap)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=0)
    dz = CE._backward_triton(g, z, t, ref_lse, cap, rows, warps)
    assert dz.dtype == torch.bfloat16
    torch.testing.assert_close(dz, CE._backward_math(g, z, t, ref_lse, cap))  # bf16: at most a rounding apart
    z.requires_grad_()
    CE.softcap_cross_entropy(z, t, cap).mean().backward()  # the op on CUDA: Triton both ways
    torch.testing.assert_close(z.grad, CE._backward_math(torch.full_like(g, 1 / n), z.detach(), t, ref_lse, cap))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_model_on_cuda_compiled_is_the_plain_model(bf16):
    # inductor with the op's Triton kernels (vocabulary 64) against inductor's plain path, in fp32 and
    # under bf16 autocast as training runs (bf16 logits: the gradients a bf16 rounding apart)
    cfg = tiny_model_cfg(model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16)
    model = randomize_(GPT(cfg), std=0.05).cuda().train()
    ids, tgt = next_token_batch(cfg.vocab_size, (4, 64), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, model.use_fused_softcap_ce, bf16)
    tol = (1e-2, 1e-3) if bf16 else (1e-4, 1e-5)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, tol[1], rtol=tol[0], atol=tol[1])
