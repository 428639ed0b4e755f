"""Quantization pieces (lmcore.quant, lmcore.gptq) and self-generated calibration (lmcore.calibrate), on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lmcore.calibrate import sample_calibration, sample_reference
from lmcore.config import PRESETS, QuantConfig
from lmcore.gptq import (
    collect_hessians,
    gptq_quantize,
    gptq_quantize_many,
    hessian_error,
    rtn_quantize,
    scale_to_u8,
    u8_to_scale,
)
from lmcore.layers import CastedLinear
from lmcore.model import GPT
from lmcore.quant import FP16, INT6, INT8, plan, quantize_int8_rows
from tests.conftest import randomize_, tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- a small trained model


def _markov_stream(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """A token stream from a sparse random Markov chain (3 likely successors per token)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    probs = torch.tensor([0.6, 0.3, 0.1])
    out = torch.empty(n, dtype=torch.long)
    t = 0
    choices = torch.multinomial(probs, n, replacement=True, generator=g)
    noise = torch.rand(n, generator=g)
    rand_tok = torch.randint(0, vocab, (n,), generator=g)
    for i in range(n):
        out[i] = t
        t = int(rand_tok[i]) if noise[i] < 0.05 else int(succ[t, choices[i]])
    return out


TRAINED_CFG = tiny_model_cfg(model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, rope_train_len=64, ve_dim=16)
TRAINED_Q = replace(PRESETS["smoke"].quant, calib_seqs=8, calib_len=48, calib_batch=8, passthrough_max_numel=1024, gptq_block=16)


@pytest.fixture(scope="module")
def trained_model() -> GPT:
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(TRAINED_CFG)
    stream = _markov_stream(TRAINED_CFG.vocab_size, 16 * 33 * 40)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    seqs = stream[: (stream.numel() // 33) * 33].view(-1, 33)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        idx = torch.randint(0, seqs.shape[0], (16,), generator=g)
        b = seqs[idx]
        loss = model(b[:, :-1], b[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.set_num_threads(n_threads)
    assert loss.item() < 2.0  # learned the chain (uniform would be ln 64 = 4.16)
    return model.eval()


# ---------------------------------------------------------------------------- scales and int8


def test_u8_log_scale_round_trip_error_bound():
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(1000, generator=g) * 6 - 7).exp().to(torch.float16)  # e^-7 .. e^-1
    codes, base = scale_to_u8(s)
    assert codes.dtype == torch.uint8 and base.dtype == torch.float16 and base.shape == (2,)
    back = u8_to_scale(codes, base)
    assert back.dtype == torch.float16
    ratio = (s.float().max() / s.float().min()).item()
    # half a code step on the log scale, plus fp16 rounding of the result
    bound = ratio ** (0.5 / 255) * (1 + 2**-10) - 1
    rel = ((back.float() - s.float()).abs() / s.float()).max().item()
    assert rel <= bound
    assert codes.min() == 0 and codes.max() == 255
    # endpoints are exact
    assert back[s.float().argmin()] == s.float().min().half() and back[s.float().argmax()] == s.float().max().half()
    # constant scales
    c = torch.full((7,), 0.05, dtype=torch.float16)
    cc, cb = scale_to_u8(c)
    assert torch.all(cc == 128) and torch.equal(u8_to_scale(cc, cb), c)


def test_int8_rows_clip_and_range():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 2000, generator=g) * 0.5
    t[:, 7] = 40.0  # one outlier per row, beyond the 99.99984th percentile
    q, s = quantize_int8_rows(t, 99.99984)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (64,)
    assert q.abs().max() <= 127
    clip = torch.quantile(t.abs(), 0.9999984, dim=1)
    assert torch.equal(s, (clip / 127).clamp_min(1 / 127).half())
    assert clip.max() < 40.0  # the outlier is clipped ...
    assert torch.all(q[:, 7] == 127)  # ... to the top code
    deq = q.float() * s.float()[:, None]
    inside = t.abs() <= clip[:, None]
    err = (deq - t).abs()[inside]
    assert err.max() <= (s.float().max() / 2) * 1.001
    # 1-D tensors get one scale
    q1, s1 = quantize_int8_rows(t[0], 99.99984)
    assert s1.ndim == 0 and q1.shape == t[0].shape


def test_rtn_is_per_row_rounding():
    W = torch.randn(16, 40) * 2
    q, s = rtn_quantize(W, 31)
    assert q.abs().max() <= 31
    assert torch.equal(s, (W.abs().amax(1) / 31).clamp_min(1 / 31).half())
    assert torch.equal(q, torch.round(W / s.float()[:, None]).clamp(-31, 31).to(torch.int8))


# ---------------------------------------------------------------------------- which tensor gets what


def test_record_tensor_treatments():
    cfg = PRESETS["record"]
    with torch.device("meta"):
        model = GPT(cfg.model)
    kinds = plan(model.state_dict(), cfg.quant.passthrough_max_numel)
    int6 = sorted(n for n, k in kinds.items() if k == INT6)
    int8 = sorted(n for n, k in kinds.items() if k == INT8)
    expected6 = sorted(
        f"blocks.{i}.{m}.weight"
        for i in range(11)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert int6 == expected6
    assert int8 == sorted(["tok_emb.weight", "bigram.embed_prev.weight", "bigram.embed_cur.weight", "ve_shared.embed.weight"])
    others = {n: k for n, k in kinds.items() if k not in (INT6, INT8)}
    assert set(others.values()) == {FP16}  # control tensors, gates, ve.proj: all fp16
    assert "ve_shared.proj.weight" in others and "blocks.0.attn.attn_gate.weight" in others
    assert "blocks.3.attn.q_gain" in others and "skip_weights" in others
    sd = model.state_dict()
    n6 = sum(sd[n].numel() for n in int6)
    n8 = sum(sd[n].numel() for n in int8)
    n16 = sum(sd[n].numel() for n in others)
    assert n6 + n8 + n16 == 27_739_277
    assert n6 == 11 * (2 * 512 * 512 + 2 * 256 * 512 + 2 * 512 * 1536)


# ---------------------------------------------------------------------------- GPTQ


def _reference_gptq(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, damp: float, qmax: int = 31):
    """Textbook GPTQ, one column at a time without lazy blocks, for one fixed row scale."""
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    W[:, dead[perm]] = 0
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s = scale.double()
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = torch.clamp(torch.round(W[:, i] / s), -qmax, qmax)
        Q[:, i] = q
        err = (W[:, i] - q * s) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q[:, torch.argsort(perm)]


def _random_problem(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.6
    X = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    H = X.T @ X / X.shape[0]
    return W, H


def test_gptq_matches_textbook_reference():
    W, H = _random_problem(24, 48, 0)
    H[5, :] = 0
    H[:, 5] = 0  # a dead column
    q, s = gptq_quantize(W, H, block=16, quantiles=(1.0,), damp=0.01)
    ref = _reference_gptq(W, H, s.float(), 0.01)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert torch.all(q[:, 5] == 0)
    agree = (q.double() == ref).double().mean().item()
    assert agree > 0.99, agree


def test_gptq_batched_equals_single_and_codes_decode_exactly():
    probs = [_random_problem(24, 32, 1), _random_problem(40, 32, 2), _random_problem(16, 48, 3)]
    many = gptq_quantize_many(probs, block=8, return_codes=True)
    for (W, H), (q, s, codes, base) in zip(probs, many):
        q1, s1 = gptq_quantize(W, H, block=8)
        assert torch.equal(s, s1)
        assert (q == q1).float().mean() > 0.99
        assert torch.equal(u8_to_scale(codes, base), s)  # stored codes decode to the GPTQ scale
        assert q.shape == W.shape and q.abs().max() <= 31


def test_gptq_chooses_lowest_mse_candidate():
    W, H = _random_problem(32, 64, 4)
    W[0, 0] = 30.0  # an outlier makes clipping worthwhile for row 0
    qs = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
    q, s = gptq_quantize(W, H, quantiles=qs, block=16)
    best = None
    for qq in qs:
        qc, sc = gptq_quantize(W, H, quantiles=(qq,), block=16)
        mse = ((qc.float() * sc.float()[:, None] - W) ** 2).mean().item()
        if best is None or mse < best[0]:
            best = (mse, qc, sc)
    assert torch.equal(s, best[2]) and torch.equal(q, best[1])


def test_collect_hessians_matches_manual_and_removes_hooks():
    cfg = tiny_model_cfg(rope_train_len=16)
    torch.manual_seed(0)
    model = randomize_(GPT(cfg), std=0.2).eval()
    seqs = torch.randint(0, cfg.vocab_size, (3, 9))
    H = collect_hessians(model, seqs, "cpu", bf16=False, damp=0.01, batch_seqs=2)
    linears = {n + ".weight": m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    assert set(H) == set(linears)
    assert all(not m._forward_hooks for m in model.modules())
    # manual: the input of blocks.1.mlp.fc over seq[:, :-1]
    name = "blocks.1.mlp.fc.weight"
    xs = []
    h = linears[name].register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(seqs[:, :-1])
    h.remove()
    X = torch.cat(xs)
    ref = X.T @ X / 3
    ref += 0.01 * torch.diag(ref).mean() * torch.eye(ref.shape[0])
    assert torch.allclose(H[name], ref, rtol=1e-5, atol=1e-6)


def test_gptq_beats_rtn_on_trained_model(trained_model):
    model = trained_model
    q = TRAINED_Q
    seqs = sample_calibration(model, q, "cpu", bf16=False)
    H = collect_hessians(model, seqs, "cpu", bf16=False, damp=q.hessian_damp)
    sd = model.state_dict()
    kinds = plan(sd, q.passthrough_max_numel)
    names = [n for n, k in kinds.items() if k == INT6]
    assert len(names) == 4 * 6
    res = gptq_quantize_many([(sd[n], H[n]) for n in names], qmax=q.int6_range, block=q.gptq_block,
                             quantiles=q.clip_quantiles, damp=q.hessian_damp)
    for n, (qg, sg) in zip(names, res):
        W = sd[n]
        qr, sr = rtn_quantize(W, q.int6_range)
        e_gptq = hessian_error(W, qg.float() * sg.float()[:, None], H[n])
        e_rtn = hessian_error(W, qr.float() * sr.float()[:, None], H[n])
        assert e_gptq < e_rtn, (n, e_gptq, e_rtn)


# ---------------------------------------------------------------------------- calibration


CAL_CFG = tiny_model_cfg(rope_train_len=32)


@pytest.fixture(scope="module")
def cal_model() -> GPT:
    torch.manual_seed(0)
    return randomize_(GPT(CAL_CFG), std=0.3).eval()


def test_calibration_shape_range_determinism(cal_model):
    q = QuantConfig(calib_seqs=5, calib_len=20, calib_batch=2, calib_seed=42, calib_temperature=0.8)
    info: dict = {}
    a = sample_calibration(cal_model, q, "cpu", bf16=False, info=info)
    b = sample_calibration(cal_model, q, "cpu", bf16=False)
    assert a.shape == (5, 20) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < CAL_CFG.vocab_size
    assert torch.equal(a, b)
    assert info["mode"] == "eager" and info["seqs"] == 5 and info["seconds"] > 0
    c = sample_calibration(cal_model, replace(q, calib_seed=43), "cpu", bf16=False)
    assert not torch.equal(a, c)
    # not degenerate: several distinct tokens per sequence
    assert all(len(set(row.tolist())) > 3 for row in a)


def test_calibration_cache_equals_recomputed_prefix(cal_model):
    q = QuantConfig(calib_seqs=3, calib_len=24, calib_batch=2, calib_seed=7, calib_temperature=0.8)
    assert q.calib_len <= CAL_CFG.rope_train_len  # same RoPE tables for every prefix
    cached = sample_calibration(cal_model, q, "cpu", bf16=False)
    ref = sample_reference(cal_model, q, "cpu", bf16=False)
    assert torch.equal(cached, ref)


def test_calibration_first_token_uniform_and_temperature(cal_model):
    q = QuantConfig(calib_seqs=256, calib_len=2, calib_batch=256, calib_seed=1)
    toks = sample_calibration(cal_model, q, "cpu", bf16=False)
    first = toks[:, 0]
    assert len(set(first.tolist())) > 40  # 256 uniform draws over 64 ids
    # a near-zero temperature is greedy decoding
    qg = QuantConfig(calib_seqs=4, calib_len=6, calib_batch=4, calib_seed=3, calib_temperature=1e-4)
    g = sample_calibration(cal_model, qg, "cpu", bf16=False)
    with torch.no_grad():
        for t in range(1, 6):
            logits = cal_model(g[:, :t])[:, -1]
            assert torch.equal(g[:, t], logits.argmax(-1))


def test_graph_self_check_accepts_a_faithful_replay_and_rejects_a_broken_one(cal_model):
    """The CUDA-graph safety net, exercised on CPU with stand-in graphs."""
    from types import SimpleNamespace

    from lmcore.calibrate import _Decoder

    dec = _Decoder(cal_model, batch=3, length=12, temperature=0.8, device=torch.device("cpu"), bf16=False)
    dec.graph = SimpleNamespace(replay=dec.step)  # replays exactly the eager step
    assert dec.check_graph()
    dec.graph = SimpleNamespace(replay=lambda: None)  # a graph that does nothing
    assert not dec.check_graph()
    dec.graph = SimpleNamespace(replay=lambda: (dec.step(), dec.cache.pos.add_(1)))  # skips positions
    assert not dec.check_graph()


def _original_module():
    """The original record script from .ref/ (ignored, not committed), or skip."""
    import importlib
    import sys
    from pathlib import Path

    ref = Path(__file__).resolve().parents[1] / ".ref"
    if not (ref / "seed_train_gpt.py").is_file() or not (ref / "flash_attn_interface.py").is_file():
        pytest.skip(".ref/seed_train_gpt.py (the original script) is not present")
    pytest.importorskip("sentencepiece")
    if str(ref) not in sys.path:
        sys.path.insert(0, str(ref))
    return importlib.import_module("seed_train_gpt")


def test_bit_exact_with_the_original_quantizer_without_scale_snapping():
    orig = _original_module()
    W, H = _random_problem(96, 64, 5)
    H += 0.01 * torch.diag(H).mean() * torch.eye(64)  # as the original's collect_hessians leaves it
    qo, so = orig.quantize_int6_gptq(W, H, blksz=32)
    q, s = gptq_quantize(W, H, block=32, snap_scales=False)
    assert torch.equal(so, s) and torch.equal(qo, q)
    codes, base = scale_to_u8(s)
    oc, ob = orig._scale_to_u8(so)
    assert torch.equal(codes, oc) and torch.equal(base, ob)
    assert torch.equal(u8_to_scale(codes, base), orig._u8_to_scale(oc, ob))
    # int8 per row: same clip and scales; values rounded with the stored fp16 scale
    t = torch.randn(32, 300) * 0.02
    oq, osc = orig.quantize_float_tensor(t)
    q8, s8 = quantize_int8_rows(t)
    assert torch.equal(osc, s8)
    assert (oq.int() - q8.int()).abs().max() <= 1
