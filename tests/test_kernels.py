"""lmcore.kernels (train.fused_qk_norm_rope, train.fused_qkv) and lmcore.xsa_kernel (train.fused_xsa_gate): each op's PyTorch kernels
against autograd of the model's plain path (q/k: rms_norm, apply_rope, gain, for partial and
whole-head RoPE, with and without a gain, each head written once or twice (train.expand_kv);
XSA: F.normalize and the projection, then the sigmoid gate, with and without it, 1-4 query
heads a kv head); the model and a training run with each switch against the plain path, and
with k and v repeated to the query heads (train.expand_kv) against without; compiled with
fullgraph; the exported script, which embeds them with a switch on and trains as lmcore does,
and a run trained with them packed and exported. The Triton kernels against the PyTorch ones
on GPU (marked cuda)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmcore.attention_layer
from lmcore import cli
from lmcore.config import preset
from lmcore.evaluate import eval_run
from lmcore.export import (
    KERNEL_MODULES,
    KERNEL_SWITCHES,
    code_bytes_of_export,
    embedded_sources,
    export_script,
    fused_kernels,
)
from lmcore.kernels import _backward_math, _forward_math, qk_norm_rope, qkv_norm_rope
from lmcore.xsa_kernel import xsa_gate
from lmcore.layers import apply_rope, repeat_heads, rms_norm, rope_tables
from lmcore.model import GPT
from lmcore.pack import pack_run
from lmcore.train import train
from tests.conftest import (
    assert_same_loss_and_grads,
    compiled_loss,
    loss_and_grads,
    randomize_,
    script_env,
    tiny_model_cfg,
    train_losses,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [  # rope_dims, head_dim, heads, seq len
    (16, 64, 8, 12),  # record's head: partial RoPE (16 of 64 dims)
    (0, 16, 4, 10),  # RoPE over the whole head
    (4, 16, 2, 7),
]


def _plain(x, cos, sin, gain, repeat=1):
    y = apply_rope(rms_norm(x), cos, sin)
    return repeat_heads(y if gain is None else y * gain[None, None, :, None], repeat)


@pytest.mark.parametrize("repeat", [1, 2])
@pytest.mark.parametrize("with_gain", [True, False])
@pytest.mark.parametrize(("rope_dims", "d", "h", "t"), CASES)
def test_op_and_its_backward_are_the_plain_math(rope_dims, d, h, t, with_gain, repeat):
    cfg = tiny_model_cfg(rope_dims=rope_dims, model_dim=d * h, num_heads=h, num_kv_heads=h)
    cos, sin = rope_tables(cfg, t, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, t, h, d, generator=g)
    gain0 = torch.rand(h, generator=g) + 0.5
    w = torch.randn(2, t, h * repeat, d, generator=g)  # each copy its own gradient
    grads = []
    for fn in (_plain, qk_norm_rope):
        x = x0.clone().requires_grad_()
        gain = gain0.clone().requires_grad_() if with_gain else None
        out = fn(x, cos, sin, gain, repeat)
        (out * w).sum().backward()
        grads.append((out.detach(), x.grad, gain.grad if with_gain else None))
    (ref, ref_dx, ref_dg), (out, dx, dg) = grads
    assert out.shape == (2, t, h * repeat, d)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=2e-6)
    if with_gain:
        torch.testing.assert_close(dg, ref_dg, rtol=1e-5, atol=1e-5)
    assert (out[:, :, ::repeat] - x0).abs().max() > 0.1  # it did something: x itself is not the answer


def test_pytorch_kernels_keep_the_input_dtype_and_compute_in_fp32():
    cfg = tiny_model_cfg(rope_dims=4, model_dim=64, num_heads=4, num_kv_heads=4)
    cos, sin = rope_tables(cfg, 6, torch.device("cpu"))
    x = torch.randn(1, 6, 4, 16)
    gain = torch.rand(4) + 0.5
    out, rstd = _forward_math(x.bfloat16(), cos, sin, gain)
    ref, ref_rstd = _forward_math(x.bfloat16().float(), cos, sin, gain)
    assert out.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (1, 6, 4)
    assert torch.equal(out, ref.bfloat16()) and torch.equal(rstd, ref_rstd)  # one rounding, at the end
    dx, dgain = _backward_math(out, x.bfloat16(), rstd, cos, sin, gain)
    assert dx.dtype == torch.bfloat16 and dgain.dtype == torch.float32 and dgain.shape == (4,)


SWITCHES = [  # (train switch, GPT method, Attention attribute, the op, a parameter its backward reaches)
    ("fused_qk_norm_rope", "use_fused_qk_norm_rope", "qk_op", qk_norm_rope, "blocks.0.attn.q_gain"),
    ("fused_xsa_gate", "use_fused_xsa_gate", "xsa_op", xsa_gate, "blocks.0.attn.attn_gate.weight"),
    ("fused_qkv", "use_fused_qkv", "qkv_op", qkv_norm_rope, "blocks.0.attn.c_k.weight"),
]


@pytest.mark.parametrize(("switch", "method", "attr", "op", "param"), SWITCHES)
def test_fused_model_is_the_plain_model_eager_and_compiled(switch, method, attr, op, param):
    cfg = tiny_model_cfg()
    model = randomize_(GPT(cfg), std=0.1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    tgt = torch.roll(ids, -1, 1)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    getattr(model, method)()
    assert all(getattr(b.attn, attr) is op for b in model.blocks)  # tiny: XSA on every layer
    loss, grads = loss_and_grads(model, ids, tgt)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert param in grads and grads[param].abs().sum() > 0
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_every_fast_path_at_once_is_the_plain_model_in_fp32():
    # the fastest lever set and fused q/k/v together (foldfg + train.fused_qkv): the same loss and
    # gradients as the plain model in fp32 on CPU, so the switches compose
    cfg = tiny_model_cfg()
    model = randomize_(GPT(cfg), std=0.1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    tgt = torch.roll(ids, -1, 1)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    for method in ("use_fused_qkv", "use_fused_xsa_gate", "use_expanded_kv", "use_fused_mlp", "fold_output_scales"):
        getattr(model, method)()
    loss, grads = loss_and_grads(model, ids, tgt)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert model.blocks[0].fold_scales and model.blocks[0].mlp.fused_op is not None
    assert model.blocks[0].attn.qkv_op is qkv_norm_rope


@pytest.mark.parametrize("fused", [None, "use_fused_qk_norm_rope", "use_fused_qkv"])
def test_expanded_kv_model_is_the_plain_model_eager_and_compiled(monkeypatch, fused):
    cfg = tiny_model_cfg()  # 4 query heads, 2 kv heads
    model = randomize_(GPT(cfg), std=0.1).train()
    if fused:
        getattr(model, fused)()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    tgt = torch.roll(ids, -1, 1)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    heads = []  # (q, k, v) heads of each attention call
    real = lmcore.attention_layer.attention

    def counted(q, k, v, backend):
        heads.append((q.size(2), k.size(2), v.size(2)))
        return real(q, k, v, backend)

    monkeypatch.setattr(lmcore.attention_layer, "attention", counted)
    model.use_expanded_kv()
    loss, grads = loss_and_grads(model, ids, tgt)
    assert heads == [(4, 4, 4)] * cfg.num_layers
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_fused_qkv_writing_v_repeated_is_the_repeat_in_fp32():
    # train.fused_qkv_repeat_v's op (the PyTorch kernels here): v's heads repeated as attention reads them,
    # and v's gradient its own plus the sum of its copies', against autograd through repeat_interleave
    cos, sin = (z.float() for z in rope_tables(tiny_model_cfg(rope_dims=4), 5, torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, (4 + 2 * 2) * 8, generator=g, requires_grad=True)
    gain = torch.rand(4, generator=g) + 0.5
    w_v, w_rep = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 5, 4, 8, generator=g)
    q, k, v, v_rep, slot, gate = qkv_norm_rope(qkv, cos, sin, gain, 4, 8, 2, repeat_v=True)
    assert slot is None and gate is None  # train.fa3_dq_accum and train.fused_qkv_gate off
    assert torch.equal(v_rep, v.repeat_interleave(2, dim=2)) and v_rep.shape == (2, 5, 4, 8)
    ((q + k).sum() + (v * w_v).sum() + (v_rep * w_rep).sum()).backward()
    got = qkv.grad.clone()
    qkv.grad = None
    q, k, v, none, _, _ = qkv_norm_rope(qkv, cos, sin, gain, 4, 8, 2)
    assert none is None
    ((q + k).sum() + (v * w_v).sum() + (v.repeat_interleave(2, dim=2) * w_rep).sum()).backward()
    torch.testing.assert_close(got, qkv.grad, rtol=1e-6, atol=1e-6)
    assert got[..., -16:].abs().sum() > 0 and not torch.equal(got[..., -16:], w_v.flatten(2))  # the copies counted


def test_model_with_v_repeated_by_the_fused_op_is_the_plain_model(monkeypatch):
    # GPT.use_fused_qkv(repeat_v=True) with use_expanded_kv: attention reads the op's repeated v on the layers
    # without value embeddings (tiny: 1 and 3 have them); loss and gradients as the plain model's, eager and compiled
    cfg = tiny_model_cfg()
    model = randomize_(GPT(cfg), std=0.1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    tgt = torch.roll(ids, -1, 1)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fused_qkv(repeat_v=True)
    model.use_expanded_kv()
    calls = []
    for b in model.blocks:
        monkeypatch.setattr(b.attn, "qkv_op", lambda *a, _op=b.attn.qkv_op: calls.append(a[7]) or _op(*a))
    loss, grads = loss_and_grads(model, ids, tgt)
    assert calls == [True, False, True, False]  # repeat_v a layer: layers 1 and 3 add ve to v first
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-5, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()  # the op itself again, for the compiled graph
    assert compiled_loss(model, ids, tgt) == pytest.approx(plain_loss.item(), abs=1e-5)


def test_training_with_v_repeated_by_the_fused_op_follows_the_plain_losses(tmp_path):
    on = ["train.iterations=3", "train.log_every=1"]
    train(preset("tiny", on), tmp_path / "plain", progress=False)
    sets = ["train.fused_qkv=true", "train.expand_kv=true", "train.fused_qkv_repeat_v=true"]
    train(preset("tiny", [*on, *sets]), tmp_path / "fused", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "fused")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["train"]["fused_qkv_repeat_v"] is True


@pytest.mark.parametrize("switch", [*(sw[0] for sw in SWITCHES), "expand_kv", "fused_mlp", "fold_output_scales"])
def test_training_with_the_switch_follows_the_plain_losses(tmp_path, switch):
    on = ["train.iterations=3", "train.log_every=1"]
    plain = train(preset("tiny", on), tmp_path / "plain", progress=False)
    fused = train(preset("tiny", [*on, f"train.{switch}=true"]), tmp_path / "fused", progress=False)
    a = train_losses(tmp_path / "plain")
    b = train_losses(tmp_path / "fused")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert fused.val_bpb == pytest.approx(plain.val_bpb, abs=1e-4)


def test_training_with_the_fused_mlp_keeping_signs_follows_the_plain_losses(tmp_path, monkeypatch):
    # train.fused_mlp_sign through the config and session: a deliberate rounding change, but in fp32
    # on CPU sqrt(post) is |leaky(pre)| to within fp32 rounding
    import lmcore.mlp_kernel as MK

    on = ["train.iterations=3", "train.log_every=1"]
    train(preset("tiny", on), tmp_path / "plain", progress=False)
    backward_calls = []
    real = MK._dpre_sign_math
    monkeypatch.setattr(MK, "_dpre_sign_math", lambda *a: backward_calls.append(1) or real(*a))
    cfg = preset("tiny", [*on, "train.fused_mlp=true", "train.fused_mlp_sign=true"])
    train(cfg, tmp_path / "sign", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "sign")
    assert len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert len(backward_calls) == 3 * cfg.train.grad_accum * cfg.model.num_layers  # every MLP backward took signs
    assert json.loads((tmp_path / "sign" / "config.json").read_text())["train"]["fused_mlp_sign"] is True


@pytest.mark.parametrize("switch", KERNEL_SWITCHES)
def test_the_exported_script_embeds_the_kernels_with_a_switch_on(switch):
    cfg = preset("record", [f"train.{switch}=true"])
    assert fused_kernels(cfg) == [f"train.{switch}=true"] and fused_kernels(preset("record")) == []
    with_kernels, plain = embedded_sources(cfg), embedded_sources(preset("record"))
    assert set(with_kernels) - set(plain) == {f"lmcore/{KERNEL_MODULES[switch]}.py"}
    script = export_script(cfg)
    assert code_bytes_of_export(cfg) == len(script.encode("utf-8"))
    assert 0 < len(script) - len(export_script(preset("record"))) < 5500  # the kernels, Brotli-compressed (4,343 bytes with lmcore.kernels in session 17, 5,062 in session 30)
    assert json.loads(ast.literal_eval(script.split("CONFIG_JSON = ", 1)[1].split("\n", 1)[0]))["train"][switch] is True


def test_the_exported_script_embeds_the_pingpong_kernel_only_with_its_option():
    mlp, pingpong = preset("record", ["train.fused_mlp=true"]), preset("record", ["train.fused_mlp=true",
                                                                                   "train.fused_mlp_pingpong=true"])
    assert set(embedded_sources(pingpong)) - set(embedded_sources(mlp)) == {"lmcore/mlp_pingpong.py"}
    assert "lmcore/mlp_pingpong.py" not in embedded_sources(preset("record"))


PROBE = Path(__file__).with_name("embedded_kernels_probe.py")


def _probe(script: Path, *flags: str, keep_pythonpath: bool = False) -> dict:
    """tests/embedded_kernels_probe.py on an exported script, in a fresh process: its JSON line."""
    r = subprocess.run([sys.executable, str(PROBE), str(script), *flags], cwd=script.parent,
                       env=script_env(keep_pythonpath), check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_the_exported_script_trains_with_the_embedded_kernels(tmp_path, one_thread):
    # the script imports lmcore.kernels from its own SOURCES (without triton, as on this CPU
    # machine, the kernels' PyTorch math) and trains as lmcore does with both switches
    both = [f"train.{sw[0]}=true" for sw in SWITCHES]
    cfg = preset("tiny", ["train.iterations=3", "train.log_every=1", *both])
    train(cfg, tmp_path / "lmcore", progress=False)
    data = Path(cfg.data.data_dir).resolve()
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "train_gpt.py").write_text(export_script(cfg))
    found = _probe(work / "train_gpt.py")
    assert found["embedded"] and all(found[f].startswith(str(work / "train_gpt.py")) for f in ("file", "xsa_file"))
    env = script_env()
    cmd = [sys.executable, "train_gpt.py", "--no-progress", "--set", f"data.data_dir={data}",
           "--set", f"data.tokenizer={data / 'tokenizer.model'}"]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("run_seed")]
    assert len(runs) == 1
    assert len(train_losses(runs[0])) == 3 and train_losses(runs[0]) == pytest.approx(train_losses(tmp_path / "lmcore"), abs=1e-6)


def test_a_run_trained_with_the_switches_packs_and_exports(tmp_path, capsys):
    both = [f"train.{sw[0]}=true" for sw in SWITCHES]
    rd = tmp_path / "run"
    cfg = preset("tiny", ["train.iterations=3", *both])
    train(cfg, rd, progress=False)
    info = pack_run(rd, progress=False)
    assert info["code_bytes"] == code_bytes_of_export(cfg) > code_bytes_of_export(preset("tiny", ["train.iterations=3"]))
    eval_run(rd, progress=False, log=lambda m: None)
    out = tmp_path / "submission"
    assert cli.main(["submission", "export", "--runs", str(rd), "--out", str(out)]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["code_bytes"] == info["code_bytes"] and all(sub["config"]["train"][sw[0]] for sw in SWITCHES)
    assert (out / "train_gpt.py").read_text() == export_script(cfg)


@pytest.mark.cuda
@needs_cuda
def test_the_exported_scripts_kernels_run_triton_on_cuda(tmp_path):
    # Triton's JIT reads a kernel's source: here that of the script's embedded, minified module
    switches = [f"train.{sw}=true" for sw in KERNEL_SWITCHES]  # both fused ops and train.fused_mlp
    (tmp_path / "train_gpt.py").write_text(export_script(preset("record", switches)))
    found = _probe(tmp_path / "train_gpt.py", "--cuda", keep_pythonpath=True)  # lmcore still comes from the script
    assert found["embedded"] and found["xsa_file"].startswith(str(tmp_path / "train_gpt.py"))
    assert found["file"].startswith(str(tmp_path / "train_gpt.py")) and found["triton"] and found["qk_triton"] and found["xsa_triton"], found
    assert found["qk_max_diff"] < 1e-4 and found["xsa_max_diff"] < 1e-4, found
    assert found["mlp_file"].startswith(str(tmp_path / "train_gpt.py")) and found["mlp_triton"], found
    assert found["mlp_post_is_act_of_pre"] and found["mlp_pre_max_diff"] < 0.1 and found["mlp_dpre_rel_err"] < 1e-2, found


def _plain_xsa(y, v, z):  # the model's plain path (Attention.forward)
    b, t, h, d = y.shape
    yg = y.view(b, t, v.size(2), -1, d)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    out = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(b, t, h, d)
    return out if z is None else out * torch.sigmoid(z).unsqueeze(-1)


@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize(("h", "hkv", "d"), [(8, 4, 64), (4, 4, 16), (8, 2, 32)])
def test_xsa_op_and_its_backward_are_the_plain_math(h, hkv, d, with_gate):
    g = torch.Generator().manual_seed(5)
    y0, w = torch.randn(2, 7, h, d, generator=g), torch.randn(2, 7, h, d, generator=g)
    v0 = torch.randn(2, 7, hkv, d, generator=g)
    v0[0, 0, 0] = 0  # a zero value vector: F.normalize's clamp
    z0 = torch.randn(2, 7, h, generator=g)
    grads = []
    for fn in (_plain_xsa, xsa_gate):
        y, v = y0.clone().requires_grad_(), v0.clone().requires_grad_()
        z = z0.clone().requires_grad_() if with_gate else None
        out = fn(y, v, z)
        (out * w).sum().backward()
        grads.append((out.detach(), y.grad, v.grad, z.grad if with_gate else None))
    (ref, *ref_grads), (out, *op_grads) = grads
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    for a, b in zip(op_grads[:2 + with_gate], ref_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    assert (out - y0).abs().max() > 0.1 and op_grads[1].abs().max() > 0.01  # it did something


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("b", "t", "h", "d", "rope_dims", "with_gain", "tile", "repeat"), [
    (4, 2048, 8, 64, 16, True, None, 1), (4, 2048, 4, 64, 16, False, None, 1), (4, 2048, 8, 64, 16, True, (16, 4), 1),
    (3, 37, 4, 16, 0, True, None, 1), (3, 37, 4, 16, 0, False, (8, 2), 1),
    (4, 2048, 4, 64, 16, False, None, 2), (3, 37, 4, 16, 0, True, (8, 2), 2),  # train.expand_kv's k
])
def test_triton_kernels_are_the_pytorch_kernels(b, t, h, d, rope_dims, with_gain, tile, repeat, dtype):
    import lmcore.kernels as K

    assert K.triton is not None
    cfg = tiny_model_cfg(rope_dims=rope_dims, model_dim=d * h, num_heads=h, num_kv_heads=h)
    cos, sin = (z.cuda() for z in rope_tables(cfg, t, torch.device("cpu")))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, t, h, d, generator=g, device="cuda").to(dtype)
    dy = torch.randn(b, t, h * repeat, d, generator=g, device="cuda").to(dtype)
    gain = torch.rand(h, generator=g, device="cuda") + 0.5 if with_gain else None
    rows, warps = tile or (None, K.WARPS)
    out, rstd = K._forward_triton(x, cos, sin, gain, repeat, rows, warps)
    ref, ref_rstd = K._forward_math(x, cos, sin, gain, repeat)
    assert out.shape == (b, t, h * repeat, d)
    torch.testing.assert_close(out, ref)  # bf16: at most a rounding apart
    torch.testing.assert_close(rstd, ref_rstd)
    dx, dgain = K._backward_triton(dy, x, ref_rstd, cos, sin, gain, repeat, rows, warps)
    ref_dx, ref_dgain = K._backward_math(dy, x, ref_rstd, cos, sin, gain, repeat)
    torch.testing.assert_close(dx, ref_dx)
    assert dgain.shape == ((h,) if with_gain else (0,))
    torch.testing.assert_close(dgain, ref_dgain, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("b", "t", "h", "hkv", "d", "with_gate", "tile"), [
    (4, 2048, 8, 4, 64, True, None), (4, 2048, 8, 4, 64, False, None), (4, 2048, 8, 4, 64, True, (8, 4)),
    (3, 37, 4, 4, 16, True, None), (3, 37, 8, 2, 32, False, (4, 2)),
])
def test_xsa_triton_kernels_are_the_pytorch_kernels(b, t, h, hkv, d, with_gate, tile, dtype):
    import lmcore.xsa_kernel as K

    g = torch.Generator(device="cuda").manual_seed(0)
    y, dout = (torch.randn(b, t, h, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    v = torch.randn(b, t, hkv, d, generator=g, device="cuda").to(dtype)
    v[0, 0, 0] = 0
    z = torch.randn(b, t, h, generator=g, device="cuda").to(dtype) if with_gate else None
    rows, warps = tile or (None, K.XSA_WARPS)
    torch.testing.assert_close(K._xsa_forward_triton(y, v, z, rows, warps), K._xsa_forward_math(y, v, z))
    got, ref = K._xsa_backward_triton(dout, y, v, z, rows, warps), K._xsa_backward_math(dout, y, v, z)
    assert got[2].shape == ((b, t, h) if with_gate else (0,))
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("b", "t", "h", "hkv", "d", "rope_dims", "repeat", "repeat_v"), [
    (4, 2048, 8, 4, 64, 16, 2, False), (4, 2048, 8, 4, 64, 16, 1, False), (3, 37, 4, 2, 16, 0, 2, False),
    (4, 2048, 8, 4, 64, 16, 2, True), (3, 37, 4, 2, 16, 0, 2, True)])
def test_fused_qkv_kernels_read_and_write_the_slices_in_place(b, t, h, hkv, d, rope_dims, repeat, repeat_v, dtype):
    # train.fused_qkv: the Triton kernels on q's and k's slices of one (B, T, (H + 2 Hkv) D) tensor, and
    # the backward's three gradients in one such tensor, against the PyTorch kernels on copies;
    # repeat_v (train.fused_qkv_repeat_v): v repeated too, v's gradient its own plus its copies' (fp32 sum)
    import lmcore.kernels as K

    cfg = tiny_model_cfg(rope_dims=rope_dims, model_dim=d * h, num_heads=h, num_kv_heads=hkv)
    cos, sin = (z.cuda() for z in rope_tables(cfg, t, torch.device("cpu")))
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, generator=g, device="cuda").to(dtype).requires_grad_()
    gain = (torch.rand(h, generator=g, device="cuda") + 0.5).requires_grad_()
    out = [o for o in qkv_norm_rope(qkv, cos, sin, gain, h, d, repeat, repeat_v) if o is not None]
    ws = [torch.randn(o.shape, generator=g, device="cuda").to(dtype) for o in out]
    sum((o * w).float().sum() for o, w in zip(out, ws, strict=True)).backward()
    q, k, v = (z.contiguous() for z in K._split_qkv(qkv.detach(), h, d))
    (ref_q, rq), (ref_k, rk) = K._forward_math(q, cos, sin, gain.detach()), K._forward_math(k, cos, sin, None, repeat)
    refs = (ref_q, ref_k, v) + ((v.repeat_interleave(repeat, dim=2),) if repeat_v else ())
    for got, ref in zip(out, refs, strict=True):
        torch.testing.assert_close(got, ref)
    dq, dgain = K._backward_math(ws[0], q, rq, cos, sin, gain.detach())
    dk, _ = K._backward_math(ws[1], k, rk, cos, sin, None, repeat)
    dv = ws[2] if not repeat_v else (ws[2].float() + ws[3].float().unflatten(2, (hkv, repeat)).sum(3)).to(dtype)
    torch.testing.assert_close(qkv.grad, torch.cat((dq.flatten(2), dk.flatten(2), dv.flatten(2)), -1))
    torch.testing.assert_close(gain.grad, dgain, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("expand_kv", "qkv"), [(False, False), (True, False), (True, True), (True, "repeat_v")])
def test_fused_model_on_cuda_compiled_is_the_plain_model(expand_kv, qkv):  # both switches on, k/v repeated or not
    cfg = tiny_model_cfg(model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16)
    torch.manual_seed(0)
    model = randomize_(GPT(cfg), std=0.05).cuda().train()
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    tgt = torch.roll(ids, -1, 1)
    plain_loss, plain_grads = loss_and_grads(model, ids, tgt)
    model.use_fused_qk_norm_rope()
    model.use_fused_xsa_gate()
    if expand_kv:
        model.use_expanded_kv()
    if qkv:  # and q, k and v from one GEMM (and v repeated by its op: train.fused_qkv_repeat_v)
        model.use_fused_qkv(repeat_v=qkv == "repeat_v")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    loss, grads = loss_and_grads(model, ids, tgt, forward=compiled)
    assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, 1e-4, rtol=1e-3, atol=1e-4)
