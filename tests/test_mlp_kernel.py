"""lmcore.mlp_kernel (train.fused_mlp): the op and its backward against autograd of the model's
plain MLP (fp32 and bf16, leading dims kept); the PyTorch kernels' rounding; the model eager
and compiled with the switch against without, QAT's fake-quantized weights reaching the op,
LatentMask TTT's masks keeping the plain path; a training run's losses (in test_kernels.py with
the other switches). The Triton GEMM against the PyTorch kernels, and the compiled model under
bf16 autocast, on GPU (marked cuda)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmcore.mlp_kernel as MK
from lmcore.mlp_kernel import leaky_mlp
from lmcore.model import GPT, LatentMasks
from tests.conftest import assert_same_loss_and_grads, compiled_loss, loss_and_grads, randomize_, tiny_model_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SLOPE = 0.5


def _plain(x, w_fc, w_proj, slope=SLOPE):
    """The model's plain MLP (MLP.forward without masks) with its activation in fp32, as inductor
    computes it (eager bf16 also rounds leaky_relu's output: exact for slope 0.5 only)."""
    h = F.linear(x, w_fc)
    return F.linear(F.leaky_relu(h.float(), negative_slope=slope).square().to(h.dtype), w_proj)


def _run(fn, x0, wf0, wp0, dy, slope):
    x, wf, wp = (t.clone().requires_grad_() for t in (x0, wf0, wp0))
    y = fn(x, wf, wp, slope)
    y.backward(dy)
    return y.detach(), x.grad, wf.grad, wp.grad


@pytest.mark.parametrize("slope", [0.5, 0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(2, 7), (5,)])
def test_op_and_its_backward_are_the_plain_mlp(lead, dtype, slope):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(*lead, 16, generator=g).to(dtype)
    wf0 = (torch.randn(48, 16, generator=g) * 0.3).to(dtype)
    wp0 = (torch.randn(24, 48, generator=g) * 0.3).to(dtype)  # out dim != in dim: the transposes matter
    dy = torch.randn(*lead, 24, generator=g).to(dtype)
    ref = _run(_plain, x0, wf0, wp0, dy, slope)
    got = _run(leaky_mlp, x0, wf0, wp0, dy, slope)
    assert got[0].shape == (*lead, 24) and got[0].dtype == dtype
    for name, a, r in zip(("y", "dx", "dw_fc", "dw_proj"), got, ref, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5, msg=name)  # the same ops: equal
    neg = F.linear(x0, wf0) < 0
    assert neg.any() and (~neg).any()  # both branches of the activation ran


def test_pytorch_kernels_round_once_and_follow_the_activation():
    g = torch.Generator().manual_seed(1)
    x, wf = torch.randn(6, 8, generator=g).bfloat16(), torch.randn(12, 8, generator=g).bfloat16()
    pre, post = MK._fc_math(x, wf, SLOPE)
    assert pre.dtype == post.dtype == torch.bfloat16 and torch.equal(pre, x @ wf.t())
    p = pre.float()
    assert torch.equal(post, torch.where(p > 0, p * p, 0.25 * p * p).bfloat16())  # leaky(0.5)^2 = 0.25 h^2 below 0
    dy, wp = torch.randn(6, 5, generator=g).bfloat16(), torch.randn(5, 12, generator=g).bfloat16()
    dpre = MK._dpre_math(dy, wp, pre, SLOPE)
    d = (dy @ wp).float()
    assert dpre.dtype == torch.bfloat16 and torch.equal(dpre, (d * torch.where(p > 0, 2 * p, 0.5 * p)).bfloat16())


def test_triton_takes_only_shapes_its_int32_offsets_and_depth_tiles_hold():
    assert MK._triton_takes(98304, 512, 1536)  # record's micro-batch, both GEMMs
    assert not MK._triton_takes(98304, 500, 1536)  # depth not a multiple of BLOCK_K: the PyTorch math
    assert MK._triton_takes(2**31 // 1536, 512, 1536) and not MK._triton_takes(2**31 // 1536 + 1, 512, 1536)
    assert not MK._use_triton(torch.zeros(4, 512, dtype=torch.bfloat16), 1536)  # a CPU tensor


def test_tma_kernel_only_where_its_descriptors_take_the_tensors(monkeypatch):
    monkeypatch.setattr(MK, "TensorDescriptor", None)  # a Triton without TMA descriptors
    a = torch.zeros(64, 512, dtype=torch.bfloat16)
    assert MK._tile(a, 1536, forward=True) == MK._tile(a, 1536, forward=False) == MK.TILE_POINTERS
    monkeypatch.setattr(MK, "TensorDescriptor", object())
    assert MK._tile(a, 1536, forward=True) == MK.TILE_TMA_FWD and MK._tile(a, 1536, forward=False) == MK.TILE_TMA_BWD
    assert MK.TILE_TMA_FWD[5] == MK.TILE_TMA_BWD[5] == 2  # descriptors built on the device by default
    assert MK._tile(a, 1536, True, "host") == (*MK.TILE_TMA_FWD[:5], 1, *MK.TILE_TMA_FWD[6:])
    assert MK._tile(a, 1536, False, "host") == (*MK.TILE_TMA_BWD[:5], 1, *MK.TILE_TMA_BWD[6:])
    assert MK._tile(a, 1540, forward=True) == MK.TILE_POINTERS  # output rows not 16-byte aligned
    assert MK._tile(torch.zeros(64, 516, dtype=torch.bfloat16), 1536, forward=True) == MK.TILE_POINTERS
    assert MK._tile(a.view(-1)[4:4 + 63 * 512].view(63, 512), 1536,
                    forward=True) == MK.TILE_POINTERS  # a base 8 bytes past the allocation's
    assert all(t[2] == MK.BLOCK_K for t in (MK.TILE_POINTERS, MK.TILE_TMA_FWD, MK.TILE_TMA_BWD))


def test_the_descriptors_choice_reaches_both_gemms(monkeypatch):
    """train.fused_mlp_descriptors (or _pingpong) and train.fused_mlp_sign -> GPT.use_fused_mlp -> the op's
    forward and its backward's GEMM, every kernel choice with and without the signs."""
    seen = []

    def fc(x, w_fc, slope, tile=None, descriptors="device", sign=False):
        seen.append(("fc", descriptors, sign))
        return (MK._fc_sign_math if sign else MK._fc_math)(x, w_fc, slope)

    def dpre(g, w_proj, pre, slope, tile=None, descriptors="device", signs=None, zero=None):
        seen.append(("dpre", descriptors, signs is not None))
        assert zero is None  # no token: no buffer to zero
        if signs is not None:  # pre is post here
            return MK._dpre_sign_math(g, w_proj, pre, signs, slope)
        return MK._dpre_math(g, w_proj, pre, slope)

    monkeypatch.setattr(MK, "_use_triton", lambda *a: True)
    monkeypatch.setattr(MK, "_fc_triton", fc)
    monkeypatch.setattr(MK, "_dpre_triton", dpre)
    model, ids, tgt = _model_and_batch(mlp_hidden=64)
    layers = model.cfg.num_layers
    for descriptors in ("host", "device", "pingpong", "pingpong_quarter"):
        for sign in (False, True):
            model.use_fused_mlp(descriptors, sign)
            seen.clear()
            if sign and descriptors == "pingpong_quarter":  # the sign path's forward goes by half tiles
                with pytest.raises(ValueError, match="sign=True with descriptors 'pingpong_quarter'"):
                    loss_and_grads(model, ids, tgt)
                continue
            loss_and_grads(model, ids, tgt)
            assert seen == [("fc", descriptors, sign)] * layers + [("dpre", descriptors, sign)] * layers
    with pytest.raises(ValueError, match="descriptors='gpu'"):
        leaky_mlp(ids.float()[..., None], torch.ones(4, 1), torch.ones(1, 4), SLOPE, "gpu")


def test_pingpong_falls_back_to_the_tma_kernel_where_it_cannot_run(monkeypatch):
    """descriptors "pingpong" where lmcore.mlp_pingpong's kernel does not take the tensors (no
    Hopper GPU, or no Gluon): the TMA kernel on device-built descriptors, both ways; with a tile
    given (the benches'), that tile."""
    import lmcore.mlp_pingpong as PP

    launched = []
    monkeypatch.setattr(MK, "_launch", lambda a, b, pre, out, slope, backward, tile, signs=None: launched.append(tile))
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: False)
    monkeypatch.setattr(PP, "launch", lambda *a: pytest.fail("the ping-pong kernel ran"))
    a, w = torch.zeros(64, 512, dtype=torch.bfloat16), torch.zeros(1536, 512, dtype=torch.bfloat16)
    monkeypatch.setattr(MK, "TensorDescriptor", object())
    MK._fc_triton(a, w, SLOPE, descriptors="pingpong")
    MK._dpre_triton(a, w.t(), torch.zeros(64, 1536, dtype=torch.bfloat16), SLOPE, descriptors="pingpong")
    assert launched == [MK.TILE_TMA_FWD, MK.TILE_TMA_BWD]  # the defaults: descriptors on the device
    ran = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: True)
    monkeypatch.setattr(PP, "launch", lambda a, b, pre, out, slope, backward, sms, tile=None, b_kn=False, signs=None,
                        zero=None:
                        ran.append((b.shape, backward, b_kn, b.is_contiguous(), signs)))
    monkeypatch.setattr(MK, "_sm_count", lambda device: 132)
    MK._fc_triton(a, w, SLOPE, descriptors="pingpong")
    MK._dpre_triton(a, torch.zeros(512, 1536, dtype=torch.bfloat16), torch.zeros(64, 1536, dtype=torch.bfloat16),
                    SLOPE, descriptors="pingpong")
    # forward: w_fc (N, K); backward: w_proj as stored, (K, N), no transposed copy
    assert ran == [((1536, 512), False, False, True, None), ((512, 1536), True, True, True, None)]
    MK._fc_triton(a, w, SLOPE, (128, 128, 64, 4, 3), descriptors="pingpong")
    assert len(ran) == 2 and launched[-1] == (128, 128, 64, 4, 3)


def test_quarter_tiles_reach_the_pingpong_forward_only(monkeypatch):
    """train.fused_mlp_quarter_tiles ("pingpong_quarter"): the ping-pong forward at TILE_QUARTER, its backward at
    TILE; where the kernel cannot run, the TMA kernel's defaults, as with "pingpong"."""
    import lmcore.mlp_pingpong as PP

    ran = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: True)
    monkeypatch.setattr(MK, "_sm_count", lambda device: 132)
    monkeypatch.setattr(PP, "launch", lambda a, b, pre, out, slope, backward, sms, tile=PP.TILE, b_kn=False,
                        signs=None, zero=None: ran.append((backward, tile, b_kn)))
    a, w = torch.zeros(64, 512, dtype=torch.bfloat16), torch.zeros(1536, 512, dtype=torch.bfloat16)
    pre = torch.zeros(64, 1536, dtype=torch.bfloat16)
    for descriptors in ("pingpong", "pingpong_quarter"):
        MK._fc_triton(a, w, SLOPE, descriptors=descriptors)
        MK._dpre_triton(a, w.t(), pre, SLOPE, descriptors=descriptors)
    assert ran == [(False, PP.TILE, False), (True, PP.TILE, True),
                   (False, PP.TILE_QUARTER, False), (True, PP.TILE, True)]
    assert PP.TILE_QUARTER[:3] == PP.TILE[:3] and PP.TILE_QUARTER[3] == PP.TILE[3] + 1 and PP.TILE_QUARTER[6] == 4
    launched = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: False)
    monkeypatch.setattr(MK, "TensorDescriptor", object())
    monkeypatch.setattr(MK, "_launch", lambda a, b, pre, out, slope, backward, tile, signs=None: launched.append(tile))
    MK._fc_triton(a, w, SLOPE, descriptors="pingpong_quarter")
    MK._dpre_triton(a, w.t(), pre, SLOPE, descriptors="pingpong_quarter")
    assert launched == [MK.TILE_TMA_FWD, MK.TILE_TMA_BWD] and len(ran) == 4


def test_the_sign_path_reaches_the_pingpong_kernel_or_the_tma_kernel(monkeypatch):
    """train.fused_mlp_sign with the ping-pong kernel: its forward gets an (M, N // 32) int32 buffer for the
    signs and post in pre's place (pre is not written), its backward post and those signs, slope as given (the
    launch negates it, as _launch does); where the kernel cannot run, the TMA kernel gets the same."""
    import lmcore.mlp_pingpong as PP

    ran = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: True)
    monkeypatch.setattr(MK, "_sm_count", lambda device: 132)
    monkeypatch.setattr(PP, "launch", lambda a, b, pre, out, slope, backward, sms, tile=None, b_kn=False, signs=None,
                        zero=None:
                        ran.append((pre, out, slope, backward, b_kn, signs)))
    a, w = torch.zeros(64, 512, dtype=torch.bfloat16), torch.zeros(1536, 512, dtype=torch.bfloat16)
    signs, post = MK._fc_triton(a, w, SLOPE, descriptors="pingpong", sign=True)
    pre, out, slope, backward, b_kn, got = ran[-1]
    assert got is signs and signs.shape == (64, 48) and signs.dtype == torch.int32
    assert pre is post and out is post and (slope, backward, b_kn) == (SLOPE, False, False)
    dpre = MK._dpre_triton(a, w.t(), post, SLOPE, descriptors="pingpong", signs=signs)
    pre, out, slope, backward, b_kn, got = ran[-1]
    assert pre is post and out is dpre and got is signs and (slope, backward, b_kn) == (SLOPE, True, True)
    launched = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: False)
    monkeypatch.setattr(MK, "TensorDescriptor", object())
    monkeypatch.setattr(MK, "_launch", lambda a, b, pre, out, slope, backward, tile, signs=None:
                        launched.append((tile, signs is not None)))
    MK._fc_triton(a, w, SLOPE, descriptors="pingpong", sign=True)
    MK._dpre_triton(a, w.t(), post, SLOPE, descriptors="pingpong", signs=signs)
    assert launched == [(MK.TILE_TMA_FWD, True), (MK.TILE_TMA_BWD, True)] and len(ran) == 2


def test_the_buffer_to_zero_reaches_the_pingpong_kernel_or_is_zeroed_after_the_tma_kernel(monkeypatch):
    """train.mlp_zeroes_dq_accum: the backward's ping-pong launch gets the buffer (its kernel zeroes it); where
    that kernel cannot run, the TMA kernel runs and the buffer is zeroed after it."""
    import lmcore.mlp_pingpong as PP

    ran = []
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: True)
    monkeypatch.setattr(MK, "_sm_count", lambda device: 132)
    monkeypatch.setattr(PP, "launch", lambda a, b, pre, out, slope, backward, sms, tile=None, b_kn=False, signs=None,
                        zero=None:
                        ran.append((backward, zero)))
    a, w, pre = torch.zeros(64, 512, dtype=torch.bfloat16), torch.zeros(512, 1536, dtype=torch.bfloat16), \
        torch.zeros(64, 1536, dtype=torch.bfloat16)
    buf = torch.full((3, 100), float("nan"))
    MK._dpre_triton(a, w, pre, SLOPE, descriptors="pingpong", zero=buf)
    assert ran == [(True, buf)] and buf.isnan().all()  # the kernel's to zero, not the host's
    monkeypatch.setattr(MK, "_pingpong_takes", lambda a, n: False)
    monkeypatch.setattr(MK, "TensorDescriptor", object())
    monkeypatch.setattr(MK, "_launch", lambda *a, **kw: ran.append("tma"))
    MK._dpre_triton(a, w, pre, SLOPE, descriptors="pingpong", zero=buf)
    assert ran[-1] == "tma" and torch.equal(buf, torch.zeros(3, 100))


def _model_and_batch(**kw):
    cfg = tiny_model_cfg(**kw)
    model = randomize_(GPT(cfg), std=0.1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, ids, torch.roll(ids, -1, 1)


def _spy(monkeypatch, model):
    """Count the fused op's calls through GPT.use_fused_mlp."""
    calls = []

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return leaky_mlp(*args, **kw)

    monkeypatch.setattr(MK, "leaky_mlp", counted)
    model.use_fused_mlp()
    return calls


def test_fused_model_is_the_plain_model_eager_and_compiled(monkeypatch):
    model, ids, tgt = _model_and_batch()
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    calls = _spy(monkeypatch, model)
    loss, grads = loss_and_grads(model, ids, tgt)
    assert len(calls) == model.cfg.num_layers
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-6, rtol=1e-5, atol=1e-6)
    assert grads["blocks.0.mlp.fc.weight"].abs().sum() > 0
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_qat_reaches_the_fused_op():
    model, ids, tgt = _model_and_batch()
    model.set_qat(6)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fused_mlp()
    loss, grads = loss_and_grads(model, ids, tgt)
    assert loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    torch.testing.assert_close(grads["blocks.1.mlp.proj.weight"], plain_grads["blocks.1.mlp.proj.weight"])
    model.set_qat(0)
    assert abs(model(ids, tgt).item() - loss.item()) > 1e-4  # the fake quantization changed the loss


def test_latent_masks_keep_the_plain_path(monkeypatch):
    model, _, _ = _model_and_batch()
    mlp, masks = model.blocks[0].mlp, LatentMasks(model.cfg)
    with torch.no_grad():
        masks.mlp_mask.normal_()
    x = torch.randn(2, 16, model.cfg.model_dim)
    mask = (masks.mlp_mask[0], masks.mlp_bias[0])
    plain = mlp(x, mask)
    calls = _spy(monkeypatch, model)
    torch.testing.assert_close(mlp(x, mask), plain, rtol=0, atol=0)
    assert calls == []  # TTT's masked MLP runs the plain path
    mlp(x)
    assert calls == [x.shape]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("m", "d", "hidden", "tile"), [
    (98304 // 8, 512, 1536, None),  # record's widths, the default tiles (the TMA kernel's)
    (98304 // 8, 512, 1536, MK.TILE_POINTERS),  # the pointer kernel
    (1000, 128, 384, None),  # rows not a multiple of the block
    (300, 64, 200, (64, 64, 32, 4, 2)),  # columns not a multiple either; another tile
    (1000, 128, 384, (128, 128, 64, 4, 3, 1)),  # the persistent TMA kernel at another tile
    (300, 64, 200, (64, 64, 32, 4, 2, 1)),  # TMA's out-of-bounds tiles: zeros in, nothing out
    (98304 // 8, 512, 1536, (128, 256, 64, 8, 3, 2)),  # descriptors built on the device
    (300, 64, 200, (64, 64, 32, 4, 2, 2)),
    (98304 // 8, 512, 1536, (128, 128, 64, 8, 2, 2, 2)),  # two programs an SM
    (300, 64, 200, (64, 64, 32, 4, 2, 1, 3)),  # three, more than there are tiles
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gemm_is_the_pytorch_kernels(m, d, hidden, tile, dtype):
    assert MK.triton is not None
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(m, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    wf = (torch.randn(hidden, d, generator=g, device="cuda") * d**-0.5).to(dtype)
    wp = (torch.randn(d, hidden, generator=g, device="cuda") * hidden**-0.5).to(dtype)
    pre, post = MK._fc_triton(x, wf, SLOPE, tile)
    ref_pre, ref_post = MK._fc_math(x, wf, SLOPE)
    torch.testing.assert_close(pre, ref_pre)  # at most a rounding apart (accumulation order)
    torch.testing.assert_close(post, MK._act(pre, SLOPE), rtol=0, atol=0)  # the epilogue is the activation of its pre
    torch.testing.assert_close(post, ref_post, rtol=2e-2, atol=2e-2)
    dpre = MK._dpre_triton(dy, wp, ref_pre, SLOPE, tile)
    torch.testing.assert_close(dpre, MK._dpre_math(dy, wp, ref_pre, SLOPE), rtol=2e-2, atol=2e-2)
    assert (ref_pre < 0).any() and (ref_pre > 0).any()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("m", "d", "hidden", "tile"), [
    (98304 // 8, 512, 1536, None),  # record's widths, the default tile
    (98304 // 8, 512, 1536, (128, 128, 64, 4, 232, 1)),  # one consumer (no ping-pong), 4 stages
    (2880, 512, 1536, None),  # two or three tiles a program, a row tail
    (1000, 128, 384, None),  # one tile a program at most
    (300, 64, 200, (128, 128, 64, 3, 232, 2)),  # columns not a multiple of the tile either; 3 stages
    (98304 // 8, 512, 1536, "quarter"),  # the forward at TILE_QUARTER (train.fused_mlp_quarter_tiles)
    (300, 64, 200, "quarter"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pingpong_kernel_is_the_tma_kernel(m, d, hidden, tile, dtype):
    """lmcore.mlp_pingpong's kernel (train.fused_mlp_pingpong) against the TMA kernel's outputs
    (the same accumulation order of wgmma's k-slices: equal here) and the PyTorch kernels."""
    import lmcore.mlp_pingpong as PP

    if not MK._pingpong_takes(torch.zeros(8, 64, device="cuda", dtype=dtype), 64):
        pytest.skip("no Gluon or not a Hopper GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(m, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    wf = (torch.randn(hidden, d, generator=g, device="cuda") * d**-0.5).to(dtype)
    wp = (torch.randn(d, hidden, generator=g, device="cuda") * hidden**-0.5).to(dtype)
    pre, post = (torch.empty(m, hidden, device="cuda", dtype=dtype) for _ in range(2))
    if tile == "quarter":  # the forward by quarter tiles; the backward has only the default's halves
        PP.launch(x, wf, pre, post, SLOPE, False, MK._sm_count(x.device), PP.TILE_QUARTER)
        for backward, signs in ((True, None), (False, torch.empty(m, hidden // 32, device="cuda", dtype=torch.int32))):
            with pytest.raises(ValueError, match="by 4 on the forward without signs"):
                PP.launch(x, wf, pre, post, SLOPE, backward, MK._sm_count(x.device), PP.TILE_QUARTER, signs=signs)
        tile = None
    else:
        PP.launch(x, wf, pre, post, SLOPE, False, MK._sm_count(x.device), *([tile] if tile else []))
    ref_pre, ref_post = MK._fc_math(x, wf, SLOPE)
    dpre = torch.empty_like(pre)
    PP.launch(dy, wp.t().contiguous(), ref_pre, dpre, SLOPE, True, MK._sm_count(x.device), *([tile] if tile else []))
    dpre_kn = torch.empty_like(pre)  # B as stored, (K, N): its (BK, BN) tiles go to wgmma N-major
    PP.launch(dy, wp, ref_pre, dpre_kn, SLOPE, True, MK._sm_count(x.device), *([tile] if tile else []), b_kn=True)
    tma_pre, tma_post = MK._fc_triton(x, wf, SLOPE)
    tma_dpre = MK._dpre_triton(dy, wp, ref_pre, SLOPE)
    for got, want in ((pre, tma_pre), (post, tma_post), (dpre, tma_dpre), (dpre_kn, tma_dpre)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(pre, ref_pre)  # at most a rounding apart (accumulation order)
    torch.testing.assert_close(post, MK._act(pre, SLOPE), rtol=0, atol=0)
    torch.testing.assert_close(dpre, MK._dpre_math(dy, wp, ref_pre, SLOPE), rtol=2e-2, atol=2e-2)
    assert (ref_pre < 0).any() and (ref_pre > 0).any()


@pytest.mark.cuda
@needs_cuda
def test_fused_model_on_cuda_compiled_under_autocast_is_the_plain_model(monkeypatch):
    cfg = tiny_model_cfg(model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16, mlp_hidden=384)
    torch.manual_seed(0)
    model = randomize_(GPT(cfg), std=0.05).cuda().train()
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    tgt = torch.roll(ids, -1, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch._dynamo.reset()
        plain_loss, plain_grads = loss_and_grads(model, ids, tgt, forward=torch.compile(model, fullgraph=True))
        launched = []
        real = MK._launch
        monkeypatch.setattr(MK, "_launch", lambda *a: launched.append(a[5]) or real(*a))
        model.use_fused_mlp()
        torch._dynamo.reset()
        loss, grads = loss_and_grads(model, ids, tgt, forward=torch.compile(model, fullgraph=True))
    assert sorted(launched) == [False] * cfg.num_layers + [True] * cfg.num_layers  # Triton, both ways
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 2e-3, rtol=5e-2, atol=5e-3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("descriptors", "sign"), [("device", False), ("host", False), ("pingpong", False),
                                                 ("pingpong", True)])
def test_the_op_replays_in_a_cuda_graph(descriptors, sign):
    """train.compile_mode=reduce-overhead captures the op: the device-built descriptors' scratch
    comes from the graph's pool. Replays on new inputs equal eager runs on them (also with the
    ping-pong kernel's sign path, train.fused_mlp_sign)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1024, 128, generator=g, device="cuda").bfloat16().requires_grad_()
    wf = (torch.randn(384, 128, generator=g, device="cuda") * 0.1).bfloat16().requires_grad_()
    wp = (torch.randn(128, 384, generator=g, device="cuda") * 0.05).bfloat16().requires_grad_()
    dy = torch.randn(1024, 128, generator=g, device="cuda").bfloat16()

    def step():
        y = leaky_mlp(x, wf, wp, SLOPE, descriptors, sign)
        return (y, *torch.autograd.grad(y, (x, wf, wp), dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        with torch.no_grad():
            for t in (x, wf, wp, dy):
                t.copy_(torch.randn(t.shape, generator=g.manual_seed(seed), device="cuda") * t.float().std())
        graph.replay()
        for got, want in zip(outs, step()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_signs_pack_32_to_a_word_and_unpack_to_themselves():
    positive = torch.rand(3, 96, generator=torch.Generator().manual_seed(2)) > 0.5
    positive[0] = True  # bit 31 set: the word is negative as an int32
    words = MK._pack(positive)
    assert words.dtype == torch.int32 and words.shape == (3, 3)
    assert words[0].tolist() == [-1, -1, -1]
    assert words[1, 0].item() == sum(1 << j for j in range(31) if positive[1, j]) - (2**31 if positive[1, 31] else 0)
    assert torch.equal(MK._unpack(words, 96), positive)


@pytest.mark.parametrize("slope", [0.5, 0.0, -0.3])
def test_the_sign_backward_is_act_prime_from_post_and_the_signs(slope):
    g = torch.Generator().manual_seed(3)
    x, wf = torch.randn(40, 16, generator=g), torch.randn(64, 16, generator=g) * 0.3
    dy, wp = torch.randn(40, 24, generator=g), torch.randn(24, 64, generator=g) * 0.3
    pre, post = MK._fc_math(x, wf, slope)
    signs, post_s = MK._fc_sign_math(x, wf, slope)
    assert torch.equal(post_s, post) and torch.equal(MK._unpack(signs, 64), pre > 0)
    exact = MK._dpre_math(dy, wp, pre, slope)
    torch.testing.assert_close(MK._dpre_sign_math(dy, wp, post, signs, slope), exact, rtol=1e-5, atol=1e-5)  # fp32
    # bf16: sqrt(post) is |leaky(pre)| rounded twice (the square's rounding, halved by the root): within
    # 2^-8 of the magnitude, where pre itself is within 2^-8 of the GEMM's fp32 result
    pre_b, post_b = MK._fc_math(x.bfloat16(), wf.bfloat16(), slope)
    got = MK._dpre_sign_math(dy.bfloat16(), wp.bfloat16(), post_b, MK._pack(pre_b > 0), slope).float()
    ref = MK._dpre_math(dy.bfloat16(), wp.bfloat16(), pre_b, slope).float()
    assert not torch.equal(got, ref)  # a deliberate rounding change, not the same numbers
    torch.testing.assert_close(got, ref, rtol=2**-7, atol=1e-6)


def test_sign_model_keeps_signs_not_pre_and_follows_the_plain_model(monkeypatch):
    model, ids, tgt = _model_and_batch(mlp_hidden=64)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    kept = []
    real = MK._fc_sign_math
    monkeypatch.setattr(MK, "_fc_sign_math", lambda *a: kept.append(real(*a)) or kept[-1])
    model.use_fused_mlp(sign=True)
    loss, grads = loss_and_grads(model, ids, tgt)
    assert len(kept) == model.cfg.num_layers
    assert all(s.dtype == torch.int32 and s.shape == (ids.numel(), 2) for s, _ in kept)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-6, rtol=1e-4, atol=1e-6)
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)
    with pytest.raises(ValueError, match="multiple of 32, not 48"):
        leaky_mlp(torch.ones(2, 4), torch.ones(48, 4), torch.ones(4, 48), SLOPE, sign=True)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("m", "d", "hidden", "tile"), [
    (98304 // 8, 512, 1536, None),  # record's widths, the default tiles (the TMA kernel's)
    (98304 // 8, 512, 1536, MK.TILE_POINTERS),  # the pointer kernel
    (1000, 128, 384, (128, 128, 64, 4, 3, 1)),  # rows not a multiple of the block, host descriptors
    (300, 64, 224, (64, 64, 32, 4, 2, 2)),  # columns not a multiple of the block either
    (300, 64, 224, (64, 64, 32, 4, 2)),
])
def test_triton_sign_gemm_is_its_pytorch_kernels(m, d, hidden, tile):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(m, d, generator=g, device="cuda").bfloat16() for _ in range(2))
    wf = (torch.randn(hidden, d, generator=g, device="cuda") * d**-0.5).bfloat16()
    wp = (torch.randn(d, hidden, generator=g, device="cuda") * hidden**-0.5).bfloat16()
    pre, post = MK._fc_triton(x, wf, SLOPE, tile)
    signs, post_s = MK._fc_triton(x, wf, SLOPE, tile, sign=True)
    assert torch.equal(post_s, post) and torch.equal(signs, MK._pack(pre > 0))  # the same tile, the same pre
    dpre = MK._dpre_triton(dy, wp, post, SLOPE, tile, signs=signs)
    torch.testing.assert_close(dpre, MK._dpre_sign_math(dy, wp, post, signs, SLOPE), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("m", "d", "hidden", "tile"), [
    (98304 // 8, 512, 1536, None),  # record's widths, the default tile
    (2880, 512, 1536, None),  # two or three tiles a program, a row tail
    (1000, 128, 384, (128, 128, 64, 4, 232, 1)),  # one consumer (no ping-pong), 4 stages
    (300, 64, 224, (128, 128, 64, 3, 232, 2)),  # N = 224: the last tile's right half has one word of two
])
def test_pingpong_sign_kernel_is_the_tma_sign_kernel(m, d, hidden, tile):
    """train.fused_mlp_sign on the ping-pong kernel: the same sign words as _pack of its own pre (and the TMA
    sign kernel's), the same post, and dpre from post and the words equal to the TMA sign kernel's bit for bit
    (the same accumulation order) and near _dpre_sign_math; words past N are not written."""
    import lmcore.mlp_pingpong as PP

    if not MK._pingpong_takes(torch.zeros(8, 64, device="cuda", dtype=torch.bfloat16), 64):
        pytest.skip("no Gluon or not a Hopper GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(m, d, generator=g, device="cuda").bfloat16() for _ in range(2))
    wf = (torch.randn(hidden, d, generator=g, device="cuda") * d**-0.5).bfloat16()
    wp = (torch.randn(d, hidden, generator=g, device="cuda") * hidden**-0.5).bfloat16()
    sms, tiles = MK._sm_count(x.device), [tile] if tile else []
    pre, post = (torch.empty(m, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    PP.launch(x, wf, pre, post, SLOPE, False, sms, *tiles)
    post_s = torch.empty_like(post)
    words = torch.full((m, hidden // 32 + 1), 12345, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):  # a strided buffer would break the words' layout
        PP.launch(x, wf, post_s, post_s, SLOPE, False, sms, *tiles, signs=words[:, :-1])
    flat = torch.full((m * (hidden // 32) + 1,), 12345, dtype=torch.int32, device="cuda")  # + a canary past the end
    signs = flat[:-1].view(m, hidden // 32)
    PP.launch(x, wf, post_s, post_s, SLOPE, False, sms, *tiles, signs=signs)
    assert flat[-1].item() == 12345  # at N = 224 the last row's word 7 would land there unmasked
    tma_signs, tma_post = MK._fc_triton(x, wf, SLOPE, sign=True)
    assert torch.equal(signs, MK._pack(pre > 0)) and torch.equal(signs, tma_signs)
    assert torch.equal(post_s, post) and torch.equal(post_s, tma_post)
    dpre = torch.empty_like(post)
    PP.launch(dy, wp, post, dpre, SLOPE, True, sms, *tiles, b_kn=True, signs=signs)
    tma_dpre = MK._dpre_triton(dy, wp, post, SLOPE, signs=signs)
    torch.testing.assert_close(dpre, tma_dpre, rtol=0, atol=0)
    torch.testing.assert_close(dpre, MK._dpre_sign_math(dy, wp, post, signs, SLOPE), rtol=2e-2, atol=2e-2)
    assert (pre < 0).any() and (pre > 0).any()
