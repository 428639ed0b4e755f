"""Tests of lmcore.optim: parameter groups, Muon (Newton-Schulz, scaling, weight decay,
sharding over two gloo processes) and the LR / momentum schedules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lmcore.config import RECORD, SMOKE, TrainConfig, preset
from lmcore.model import GPT
from lmcore.optim import (
    Muon,
    ParamGroupError,
    build_optimizers,
    build_param_groups,
    lr_multiplier,
    muon_momentum,
    muon_scale,
    newton_schulz,
)

# ---------------------------------------------------------------------------- groups


def _meta_model(cfg):
    with torch.device("meta"):
        return GPT(cfg.model)


@pytest.mark.parametrize(
    "cfg",
    [
        RECORD,
        SMOKE,
        preset("smoke", ["model.bigram=hashed"]),
        preset("record", ["model.bigram=hashed", "model.bigram_dim=112"]),
        preset("smoke", ["model.bigram=none", "model.ve_layers=none", "model.gated_attn_layers=none"]),
    ],
    ids=["record", "smoke", "smoke-hashed", "record-hashed", "smoke-bare"],
)
def test_every_param_in_exactly_one_group(cfg):
    model = _meta_model(cfg)
    groups = build_param_groups(model, cfg.train)
    names = [n for g in groups.values() for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    muon, embed, scalar = (set(groups[k]["names"]) for k in ("muon", "embed", "scalar"))
    # SPEC 4: block matrices incl. attention gates (and ve / hashed-bigram proj) go to Muon
    assert all(groups["muon"]["params"][i].ndim == 2 for i in range(len(muon)))
    assert any("attn_gate.weight" in n for n in muon) == (cfg.model.gated_attn_layers != "none")
    assert not any(n.endswith("attn_gate.bias") for n in muon | embed)
    assert "tok_emb.weight" in embed
    assert {"skip_weights", "smear.gate"} <= scalar or not cfg.model.smear_gate
    if cfg.model.bigram == "hashed":
        assert "bigram.proj.weight" in muon and "bigram.embed.weight" in embed and "bigram.scale" in scalar
    if cfg.model.bigram == "product_key":
        assert {"bigram.embed_prev.weight", "bigram.embed_cur.weight"} <= embed
    if model.ve_shared is not None and model.ve_shared.proj is not None:
        assert "ve_shared.proj.weight" in muon
    assert not any(n.startswith("blocks.") and "resid_mix" in n for n in muon)
    if cfg is RECORD:
        count = lambda k: sum(p.numel() for p in groups[k]["params"])
        assert count("muon") + count("embed") + count("scalar") == 27_739_277
        assert groups["muon"]["lr"] == 0.028 and groups["embed"]["lr"] == 0.035 and groups["scalar"]["lr"] == 0.025


def test_builder_raises_on_unplaced_param():
    model = _meta_model(SMOKE)
    model.extra_head = nn.Parameter(torch.zeros(8, 8, device="meta"))  # 2-D, outside the blocks
    model.blocks[0].odd = nn.Parameter(torch.zeros(2, 3, 4, device="meta"))  # 3-D
    with pytest.raises(ParamGroupError) as e:
        build_param_groups(model, SMOKE.train)
    assert "extra_head" in str(e.value) and "blocks.0.odd" in str(e.value)


def test_build_optimizers_cpu():
    model = GPT(SMOKE.model)
    opts = build_optimizers(model, SMOKE.train)
    assert not opts.adam_embed.defaults.get("fused")
    assert opts.adam_scalar.param_groups[0]["weight_decay"] == SMOKE.train.adam_wd
    assert opts.adam_embed.param_groups[0]["betas"] == (0.9, 0.95)
    opts.set_lr_mul(0.5)
    assert opts.muon.param_groups[0]["lr"] == pytest.approx(SMOKE.train.matrix_lr * 0.5)
    assert opts.adam_embed.param_groups[0]["lr"] == pytest.approx(SMOKE.train.embed_lr * 0.5)
    opts.set_momentum(0.93)
    assert opts.muon.param_groups[0]["momentum"] == 0.93


# ---------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (8, 512)])
def test_newton_schulz_near_orthogonal(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g)
    X = newton_schulz(G, 5)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.float())
    # 5 quintic steps push every singular value of the normalised input into ~[0.68, 1.2];
    # only the few tiny ones of a square Gaussian matrix stay below (as in the seed)
    assert s.max() < 1.25, s
    assert (s > 0.6).float().mean() >= 0.9, s
    if max(shape) >= 4 * min(shape):  # well conditioned: all of them
        assert s.min() > 0.6, s
    # batched call == one call per matrix
    B = torch.randn((3, *shape), generator=g)
    XB = newton_schulz(B, 5)
    for i in range(3):
        torch.testing.assert_close(XB[i].float(), newton_schulz(B[i], 5).float(), atol=1e-2, rtol=0)


def test_muon_update_shape_scaling_and_weight_decay():
    torch.manual_seed(0)
    tall = nn.Parameter(torch.randn(128, 32))
    wide = nn.Parameter(torch.randn(32, 128))
    still = nn.Parameter(torch.randn(16, 16))  # zero gradient: only weight decay acts
    before = [p.detach().clone() for p in (tall, wide, still)]
    grads = [torch.randn(128, 32), torch.randn(32, 128), torch.zeros(16, 16)]
    for p, gr in zip((tall, wide, still), grads):
        p.grad = gr.clone()
    lr, wd = 0.05, 0.1
    opt = Muon([tall, wide, still], lr=lr, momentum=0.0, ns_steps=5, nesterov=True, weight_decay=wd)
    opt.step()
    assert muon_scale(128, 32) == 2.0 and muon_scale(32, 128) == 1.0
    for p, p0, gr in zip((tall, wide, still), before, grads):
        upd = (newton_schulz(gr.unsqueeze(0), 5)[0] * muon_scale(*gr.shape)).float()
        expect = p0 * (1 - lr * wd) - lr * upd
        torch.testing.assert_close(p.detach(), expect, atol=1e-6, rtol=0)
    # both orthogonalised updates have Frobenius norm ~ sqrt(32); the tall one is scaled by 2
    rms_tall = ((before[0] * (1 - lr * wd) - tall.detach()) / lr).pow(2).mean().sqrt()
    rms_wide = ((before[1] * (1 - lr * wd) - wide.detach()) / lr).pow(2).mean().sqrt()
    assert float(rms_tall / rms_wide) == pytest.approx(2.0, rel=0.1)
    torch.testing.assert_close(still.detach(), before[2] * (1 - lr * wd), atol=0, rtol=0)


def test_muon_nesterov_momentum():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(16, 32))
    g1, g2 = torch.randn(16, 32), torch.randn(16, 32)
    opt = Muon([p], lr=0.1, momentum=0.9, ns_steps=5, weight_decay=0.0)
    p0 = p.detach().clone()
    p.grad = g1.clone()
    opt.step()
    p1 = p.detach().clone()
    torch.testing.assert_close(p1, p0 - 0.1 * newton_schulz(g1 + 0.9 * g1, 5).float(), atol=1e-6, rtol=0)
    p.grad = g2.clone()
    opt.step()
    buf = 0.9 * g1 + g2
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)
    torch.testing.assert_close(p.detach(), p1 - 0.1 * newton_schulz(g2 + 0.9 * buf, 5).float(), atol=1e-6, rtol=0)


def _muon_problem():
    g = torch.Generator().manual_seed(7)
    shapes = [(64, 32), (32, 64), (64, 32), (16, 16), (64, 32), (8, 48), (32, 64)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads


def _run_muon(params, grads):
    opt = Muon(params, lr=0.02, momentum=0.95, ns_steps=5, weight_decay=0.04)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
    return [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]


def _sharded_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        params, grads = _muon_problem()
        out = _run_muon(params, grads)
        if rank == 1:
            torch.save(out, out_file)
        else:
            torch.save(out, out_file + ".r0")
        dist.barrier()  # both ranks done before teardown: gloo aborted (SIGABRT) about 1 run in 3 without it
    finally:
        dist.destroy_process_group()


def test_muon_sharded_two_processes_matches_one(tmp_path):
    params, grads = _muon_problem()
    ref_w, ref_b = _run_muon(params, grads)
    out = tmp_path / "out.pt"
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    for f in (out, tmp_path / "out.pt.r0"):
        w, b = torch.load(f)
        for a, r in zip(w, ref_w):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
        for a, r in zip(b, ref_b):  # every rank keeps every momentum buffer
            assert torch.equal(a, r)


# ---------------------------------------------------------------------------- schedules


def test_lr_schedule_without_cap():
    tc = replace(TrainConfig(), iterations=1000, warmdown_iters=400, max_wallclock_seconds=0.0)
    assert lr_multiplier(0, 0.0, tc) == 1.0
    assert lr_multiplier(599, 1e9, tc) == 1.0  # elapsed time is ignored without a cap
    assert lr_multiplier(600, 0.0, tc) == 1.0
    assert lr_multiplier(601, 0.0, tc) == pytest.approx(399 / 400)
    assert lr_multiplier(800, 0.0, tc) == pytest.approx(0.5)
    assert lr_multiplier(999, 0.0, tc) == pytest.approx(1 / 400)
    assert lr_multiplier(1000, 0.0, tc) == 1.0  # past the end (never used)
    short = replace(tc, iterations=100)  # warmdown longer than the run: starts at step 0
    assert lr_multiplier(0, 0.0, short) == pytest.approx(100 / 400)
    assert lr_multiplier(5, 0.0, replace(tc, warmdown_iters=0)) == 1.0


def test_lr_schedule_with_cap():
    tc = replace(TrainConfig(), iterations=20000, warmdown_iters=3500, max_wallclock_seconds=600.0)
    assert lr_multiplier(0, 0.0, tc) == 1.0
    # 100 ms/step: warmdown spans 350 s, so it starts when 350 s remain (250 s elapsed)
    assert lr_multiplier(2000, 200_000.0, tc) == 1.0
    assert lr_multiplier(2500, 250_000.0, tc) == pytest.approx(1.0)
    assert lr_multiplier(4000, 400_000.0, tc) == pytest.approx(200_000 / 350_000)
    # the mean step time, not the step count, sets the warmdown length
    assert lr_multiplier(2000, 400_000.0, tc) == pytest.approx(200_000 / (3500 * 200.0))
    assert lr_multiplier(6000, 600_000.0, tc) == 0.0
    assert lr_multiplier(6100, 610_000.0, tc) == 0.0
    # the iteration count does not matter with a cap
    assert lr_multiplier(4000, 400_000.0, replace(tc, iterations=4001)) == pytest.approx(200_000 / 350_000)


def test_momentum_warmup():
    tc = TrainConfig()
    assert muon_momentum(0, tc) == pytest.approx(0.92)
    assert muon_momentum(750, tc) == pytest.approx(0.955)
    assert muon_momentum(1500, tc) == pytest.approx(0.99)
    assert muon_momentum(10_000, tc) == pytest.approx(0.99)
    assert muon_momentum(3, replace(tc, muon_momentum_warmup_steps=0)) == pytest.approx(0.99)
