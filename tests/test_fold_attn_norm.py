"""train.fold_attn_norm (GPT.fold_attn_norm): attention's q/k/v GEMM reads the residual stream x, not its
RMSNorm n = r x. q/k's own RMSNorm cancels the row scale r, so only v (kernels.qkv_norm_rope's vscale) and the
attention gate take it. The same function up to rounding (and eps's relative size in q/k's RMSNorm)."""

from __future__ import annotations

import json

import pytest
import torch

import lmcore.kernels as K
from lmcore.config import ConfigError, preset
from lmcore.kernels import qkv_norm_rope
from lmcore.layers import rms_norm, rms_scale, rope_tables
from lmcore.model import GPT, KVCache
from lmcore.train import train
from tests.conftest import (
    assert_same_loss_and_grads,
    compiled_loss,
    compiled_without_and_with,
    loss_and_grads,
    next_token_batch,
    randomize_,
    tiny_model_cfg,
    train_losses,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FOLD_SETS = ["train.fused_qkv=true", "train.fold_output_scales=true"]


def _op_case(device: str = "cpu", b: int = 2, t: int = 5, h: int = 4, hkv: int = 2, d: int = 8, rope_dims: int = 4,
             dtype: torch.dtype = torch.float32):
    cfg = tiny_model_cfg(rope_dims=rope_dims, model_dim=h * d, num_heads=h, num_kv_heads=hkv)
    cos, sin = (z.float().to(device) for z in rope_tables(cfg, t, torch.device("cpu")))
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=g, device=device).to(dtype)
    gain = torch.rand(h, generator=g, device=device) + 0.5
    scale = torch.rand(b, t, generator=g, device=device) + 0.5
    return qkv, cos, sin, gain, scale


def fused_model(device: str = "cpu", repeat_v: bool = True, std: float = 0.1, **cfg_kw) -> GPT:
    """A random tiny model on the fused q/k/v (v repeated by the op, or not) and folded-scales path."""
    model = randomize_(GPT(tiny_model_cfg(**cfg_kw)), std=std).to(device).train()
    model.use_fused_qkv(repeat_v)
    if repeat_v:
        model.use_expanded_kv()
    model.fold_output_scales()
    return model


def _outputs_and_grads(qkv, cos, sin, gain, scale, h, d, repeat, repeat_v, by_op: bool):
    """The op's outputs (q, k, v[, v repeated]) and the gradients of qkv and scale for a fixed random weighting of
    them: with the scale given to the op (by_op), or applied to v's slice afterwards by autograd."""
    qkv, scale = qkv.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    q, k, v, v_rep, _, _ = qkv_norm_rope(qkv, cos, sin, gain, h, d, repeat, repeat_v=repeat_v and by_op,
                                      vscale=scale if by_op else None)
    if not by_op:
        v = (v.float() * scale[:, :, None, None]).to(v.dtype)
        v_rep = v.repeat_interleave(repeat, dim=2) if repeat_v else None
    out = [o for o in (q, k, v, v_rep) if o is not None]
    g = torch.Generator().manual_seed(1)  # on the CPU: the same weights for a CUDA run and its CPU reference
    ws = [torch.randn(o.shape, generator=g).to(qkv.device) for o in out]
    sum((o.float() * w).sum() for o, w in zip(out, ws, strict=True)).backward()
    return [o.detach() for o in out], qkv.grad, scale.grad


@pytest.mark.parametrize("repeat_v", [False, True])
def test_the_op_scales_v_by_its_tokens_scale_and_gives_the_scales_gradient(repeat_v):
    case = _op_case()
    got, ref = (_outputs_and_grads(*case, 4, 8, 2, repeat_v, by_op) for by_op in (True, False))
    for a, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6)  # qkv's gradient: v's slice scaled
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)  # each token's sum(dv * v's slice)
    assert got[2].shape == (2, 5) and got[2].abs().min() > 0


def test_the_ops_fake_gives_the_scales_gradient_its_shape():
    qkv, cos, sin, gain, scale = _op_case()
    q, k, v = K._split_qkv(qkv, 4, 8)
    (_, rq), (_, rk) = K._forward_math(q, cos, sin, gain), K._forward_math(k, cos, sin, None, 2)
    args = (torch.ones(2, 5, 4, 8), torch.ones(2, 5, 4, 8), torch.ones(2, 5, 2, 8), None, qkv, rq, rk, cos, sin, gain,
            4, 8, 2, 0.0)
    for vscale, shape in ((scale, (2, 5)), (None, (0,))):
        real = K._qkv_norm_rope_backward(*args, vscale, None)
        with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
            fake = K._qkv_norm_rope_backward(*args, vscale, None)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real] and real[2].shape == shape


def test_the_row_scale_is_rms_norms():
    x = torch.randn(3, 7, 16) * 5
    torch.testing.assert_close(x * rms_scale(x, 0.5)[..., None], rms_norm(x) * 0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("repeat_v", [False, True])
def test_model_with_the_norm_folded_into_v_is_the_model_without(monkeypatch, repeat_v):
    # on the fused q/k/v and folded-scales path (tiny: gated layers 0 and 2, value embeddings on 1 and 3), in fp32:
    # the loss and every gradient as without the switch, eager and compiled (aot_eager)
    model = fused_model(repeat_v=repeat_v)
    cfg = model.cfg
    assert [b.attn.attn_gate is not None for b in model.blocks] == [True, False, True, False]
    ids, tgt = next_token_batch(cfg.vocab_size)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.fold_attn_norm()
    scales = []
    for b in model.blocks:
        monkeypatch.setattr(b.attn, "qkv_op", lambda *a, _op=b.attn.qkv_op: scales.append(a[9].shape) or _op(*a))
    loss, grads = loss_and_grads(model, ids, tgt)
    assert scales == [(2, 16)] * cfg.num_layers  # every layer's v took its tokens' scales
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert grads["blocks.0.attn.attn_gate.weight"].abs().sum() > 0
    monkeypatch.undo()
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_kv_cached_decoding_keeps_the_normed_input_and_matches_the_folded_forward():
    # the cached path (one token a call, no fused q/k/v op) normalizes as before; the full forward with the switch
    # gives the same logits
    cfg = tiny_model_cfg()
    model = randomize_(GPT(cfg), std=0.2).eval()
    model.use_fused_qkv()
    model.fold_output_scales()
    model.fold_attn_norm()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model, batch=2, max_len=12, device=torch.device("cpu"), dtype=torch.float32)
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(12)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_the_switch_needs_fused_qkv_and_folded_scales(tmp_path):
    with pytest.raises(ConfigError, match="train.fold_attn_norm=true needs train.fused_qkv=true"):
        preset("tiny", ["train.fold_attn_norm=true", "train.fused_qkv=true"])
    with pytest.raises(ValueError, match="fold_attn_norm needs use_fused_qkv and fold_output_scales"):
        GPT(tiny_model_cfg()).fold_attn_norm()
    trains_as_without(tmp_path, FOLD_SETS, "fold_attn_norm")


def trains_as_without(tmp_path, sets: list[str], switch: str) -> None:
    """3 steps of `tiny` with train.SWITCH on and off (both with `sets`): the same losses, the switch in config.json."""
    on = ["train.iterations=3", "train.log_every=1", *sets]
    train(preset("tiny", on), tmp_path / "plain", progress=False)
    train(preset("tiny", [*on, f"train.{switch}=true"]), tmp_path / "on", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "on")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert json.loads((tmp_path / "on" / "config.json").read_text())["train"][switch] is True


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("t", "repeat_v"), [(2048, True), (2048, False), (37, True)])
def test_on_cuda_the_kernels_scale_v_as_the_pytorch_math(t, repeat_v, dtype):
    case = _op_case("cuda", b=4, t=t, h=8, hkv=4, d=64, rope_dims=16, dtype=dtype)
    assert K._use_triton(K._split_qkv(case[0], 8, 64)[0], 8)
    got = _outputs_and_grads(*case, 8, 64, 2, repeat_v, True)
    ref = _outputs_and_grads(*(z.cpu() for z in case), 8, 64, 2, repeat_v, True)  # the PyTorch math, same values
    for a, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(a.cpu(), r)
    torch.testing.assert_close(got[1].cpu(), ref[1])
    torch.testing.assert_close(got[2].cpu(), ref[2], rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_on_cuda_the_compiled_model_with_the_switch_follows_the_model_without():
    model = fused_model("cuda", std=0.05, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16)
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 128), "cuda")
    (plain_loss, plain_grads), (loss, grads) = compiled_without_and_with(model, ids, tgt, model.fold_attn_norm)
    # bf16: n's rounding is gone and v is rounded after its scale instead: a rounding apart
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 2e-3, rtol=5e-2, atol=5e-3)
