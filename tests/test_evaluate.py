"""Tests of lmcore.evaluate: window/chunk planning, legality of score-first TTT, the fast
path against a plainly written reference of SPEC section 6, two ranks against one, and
the `lmcore eval` command line. Tiny random-weight models on CPU, synthetic byte tables."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmcore.bpb import ByteTables
from lmcore.config import RECORD, SMOKE, EvalConfig
from lmcore.evaluate import (
    Evaluator,
    plain_eval,
    plan_chunks,
    plan_windows,
    rank_slice,
    sliding_eval,
    ttt_eval,
    ttt_lr,
)
from lmcore.model import GPT, LatentMasks
from lmcore.runtime import DistInfo
from tests.conftest import randomize_, tiny_model_cfg

VOCAB = 64
CPU = torch.device("cpu")
ECFG = replace(
    SMOKE.eval,
    seq_len=32,
    stride=8,
    batch_seqs=5,
    ttt=True,
    ttt_lr=0.02,
    ttt_epochs=2,
    ttt_chunk_tokens=128,
    ttt_batch_seqs=3,
    compile=False,
)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_model_cfg(vocab_size=VOCAB))
    return randomize_(model, seed=seed, std=0.15).eval()


def tiny_tables(seed: int = 0) -> ByteTables:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (VOCAB,), generator=g).to(torch.int16)
    lead = torch.rand(VOCAB, generator=g) < 0.5
    bound = torch.zeros(VOCAB, dtype=torch.bool)
    bound[:3] = True  # pad/BOS/EOS-like control ids: 0 bytes, boundaries
    base[:3] = 0
    lead[:3] = False
    return ByteTables(base_bytes=base, leading_space=lead, boundary=bound)


def tiny_tokens(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, VOCAB, (n,), generator=g)
    t[::41] = 1  # documents start with BOS
    return t


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- reference


def reference_eval(model: GPT, tokens: torch.Tensor, cfg: EvalConfig, tables: ByteTables, ttt: bool) -> dict:
    """SPEC section 6 written plainly: window by window, token by token, block by block."""
    toks = tokens.tolist()
    total = len(toks) - 1
    L = min(cfg.seq_len, total)
    # window = (first input token, first scored target, end); window k ends at L + k*stride
    windows, prev_end, end = [], 0, L
    while prev_end < total:
        windows.append((end - L, prev_end, end))
        prev_end, end = end, min(end + cfg.stride, total)
    C = cfg.ttt_chunk_tokens
    n_chunks = math.ceil(total / C)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = LatentMasks(model.cfg, init=cfg.mask_init)
    tensors = [masks.mlp_mask, masks.mlp_bias, masks.attn_mask, masks.attn_bias]
    bufs = [[torch.zeros(t.shape[1]) for _ in range(t.shape[0])] for t in tensors]
    nats, nbytes, count = [0.0] * n_chunks, [0] * n_chunks, [0] * n_chunks
    for c in range(n_chunks):
        for ws, first, end in windows:
            if min(first // C, n_chunks - 1) != c:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([toks[ws:end]]), latent=masks if ttt else None)[0]
            logp = F.log_softmax(logits.float(), dim=-1)
            for j in range(first, end):  # target j is token j + 1, predicted at position j - ws
                tgt, prev = toks[j + 1], toks[j]
                nats[c] += -logp[j - ws, tgt].item()
                lead = bool(tables.leading_space[tgt]) and not bool(tables.boundary[prev])
                nbytes[c] += int(tables.base_bytes[tgt]) + int(lead)
                count[c] += 1
        if not ttt or c == n_chunks - 1:
            continue
        frac = c / max(n_chunks - 1, 1)
        if frac < cfg.ttt_warmup_frac:
            lr = cfg.ttt_lr * frac / cfg.ttt_warmup_frac
        elif frac < cfg.ttt_flat_until:
            lr = cfg.ttt_lr
        else:
            lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * (frac - cfg.ttt_flat_until) / (1 - cfg.ttt_flat_until)))
        start = c * C
        n_seqs = (min(start + C, total) - start) // cfg.seq_len
        for _epoch in range(cfg.ttt_epochs):
            for b in range(0, n_seqs, cfg.ttt_batch_seqs):
                seqs = range(b, min(b + cfg.ttt_batch_seqs, n_seqs))
                x = torch.tensor([toks[start + s * cfg.seq_len : start + (s + 1) * cfg.seq_len] for s in seqs])
                y = torch.tensor([toks[start + s * cfg.seq_len + 1 : start + (s + 1) * cfg.seq_len + 1] for s in seqs])
                masks.zero_grad()
                model(x, y, latent=masks).backward()
                torch.nn.utils.clip_grad_norm_(masks.parameters(), cfg.ttt_grad_clip)
                with torch.no_grad():
                    for t, tbufs in zip(tensors, bufs):
                        for i in range(t.shape[0]):  # one block's vector at a time
                            g = t.grad[i]
                            tbufs[i] = cfg.ttt_momentum * tbufs[i] + g
                            u = torch.sign(g + cfg.ttt_momentum * tbufs[i])
                            u = u * math.sqrt(u.numel()) / max(u.norm().item(), 1e-8)
                            t[i] -= lr * u
    return {
        "bpb": sum(nats) / math.log(2) / sum(nbytes),
        "tokens": sum(count),
        "bytes": sum(nbytes),
        "chunk_nats": nats,
        "chunk_bytes": nbytes,
    }


# ---------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    "total,seq_len,stride,chunk",
    [
        (600, 32, 8, 128),
        (603, 32, 8, 128),
        (20, 32, 8, 16),
        (32, 32, 8, 64),
        (1000, 64, 64, 100),
        (997, 48, 7, 50),
        (5, 4, 3, 2),
    ],
)
def test_every_target_scored_exactly_once(total, seq_len, stride, chunk):
    plan = plan_windows(total, seq_len, stride)
    counter = torch.zeros(total, dtype=torch.int64)
    for s, f in zip(plan.starts.tolist(), plan.score_from.tolist()):
        assert 0 <= s and s + plan.length <= total and plan.length == min(seq_len, total)
        assert (s == 0 and f == 0) or plan.length - f <= stride  # later windows: last <= stride targets
        counter[s + f : s + plan.length] += 1
    assert int(counter.sum()) == total
    assert bool((counter == 1).all())
    chunks = plan_chunks(plan, chunk)
    assert chunks.n_chunks == math.ceil(total / chunk) and chunks.bounds[-1] == plan.n
    for c in range(chunks.n_chunks):  # a window belongs to the chunk of its first scored target
        lo, hi = chunks.windows(c)
        assert bool((plan.first_scored[lo:hi] // chunk == c).all())
        shares = [rank_slice(hi - lo, r, 3) for r in range(3)]
        assert shares[0][0] == 0 and shares[-1][1] == hi - lo
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))


def original_window_rule(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The original script's windows as (start, length, score_from)."""
    out = []
    for ws in range(0, total, stride):
        wlen = min(ws + seq_len, total) - ws
        if wlen >= stride or ws == 0:
            out.append((ws, wlen, 0 if ws == 0 else max(wlen - stride, 0)))
    return out


def test_original_rule_rescored_the_tail():
    # Why lmcore's window rule differs from the original's at the tail: there the last
    # `stride` targets are scored once per short window (seq_len/stride times in all).
    total, seq_len, stride = 4096, 2048, 64
    counter = torch.zeros(total, dtype=torch.int64)
    for ws, wlen, s in original_window_rule(total, seq_len, stride):
        counter[ws + s : ws + wlen] += 1
    assert int(counter[: total - stride].max()) == 1
    assert int(counter[total - stride :].min()) == seq_len // stride
    ours = plan_windows(total, seq_len, stride)
    assert ours.n == len([w for w in original_window_rule(total, seq_len, stride) if w[1] == seq_len])


def test_lr_schedule():
    cfg = EvalConfig()
    n = 947
    assert ttt_lr(0, n, cfg) == 0.0
    assert ttt_lr(int(0.5 * (n - 1)), n, cfg) == cfg.ttt_lr
    assert ttt_lr(n - 1, n, cfg) == pytest.approx(0.0, abs=1e-12)
    assert 0 < ttt_lr(20, n, cfg) < cfg.ttt_lr  # still warming up (frac < 5%)


def test_latent_mask_param_count():
    with torch.device("meta"):
        masks = LatentMasks(RECORD.model)
    assert sum(p.numel() for p in masks.parameters()) == 45_056


# ---------------------------------------------------------------------------- scoring


def test_sliding_with_stride_equal_window_equals_plain():
    model, tables = tiny_model(), tiny_tables()
    tokens = tiny_tokens(10 * 32 + 1)
    cfg = replace(ECFG, stride=32, ttt=False)
    plain = plain_eval(model, tokens, 32, tables, CPU, batch_seqs=3)
    slide = sliding_eval(model, tokens, cfg, tables, CPU)
    assert slide["tokens"] == plain["tokens"] == 320
    assert slide["bytes"] == plain["bytes"]
    assert slide["bpb"] == pytest.approx(plain["bpb"], abs=1e-9)


def test_plain_eval_is_one_function_for_train_and_eval():
    """lmcore.validate.plain_eval (training's validation, evaluation's plain pass) against the
    sequences scored one by one: the batching, the padding and the train/eval mode change nothing."""
    from lmcore import validate

    model, tables = tiny_model(7), tiny_tables(7)
    tokens = tiny_tokens(11 * 32 + 5, seed=7)  # 11 sequences of 32 (+ a tail that is never scored)
    nats = nbytes = 0.0
    with torch.no_grad():
        for i in range(11):
            w = tokens[i * 32 : (i + 1) * 32 + 1]
            nll = model(w[None, :-1], w[None, 1:], reduction="none")
            nats += float(nll.double().sum())
            lead = tables.leading_space[w[1:]] & ~tables.boundary[w[:-1]]
            nbytes += float((tables.base_bytes[w[1:]].long() + lead.long()).sum())
    assert plain_eval is validate.plain_eval
    model.train()
    for batch_seqs, pad in ((1, False), (4, False), (4, True), (32, True), (512, False)):
        r = validate.plain_eval(model, tokens, 32, tables, CPU, batch_seqs=batch_seqs, pad=pad)
        assert r["tokens"] == 11 * 32 and r["bytes"] == nbytes, (batch_seqs, pad)
        assert r["nats"] == pytest.approx(nats, rel=1e-6), (batch_seqs, pad)
        assert r["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)
        assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="too few"):
        validate.plain_eval(model, tokens[:32], 32, tables, CPU)


@pytest.mark.parametrize("ttt", [False, True])
def test_fast_path_matches_reference(ttt):
    model, tables = tiny_model(1), tiny_tables(1)
    tokens = tiny_tokens(604, seed=1)  # 603 targets: 5 chunks, the last partial; 603 % 8 != 0
    ref = reference_eval(model, tokens, ECFG, tables, ttt)
    fast = (ttt_eval if ttt else sliding_eval)(tiny_model(1), tokens, ECFG, tables, CPU)
    assert fast["tokens"] == ref["tokens"] == 603
    assert fast["bytes"] == ref["bytes"]
    assert fast["chunks"] == 5
    assert abs(fast["bpb"] - ref["bpb"]) < 1e-4
    for a, b in zip(fast["chunk_nats"], ref["chunk_nats"]):
        assert a == pytest.approx(b, rel=1e-4)


def test_ttt_changes_scores_and_padding_is_neutral():
    tables = tiny_tables(2)
    tokens = tiny_tokens(604, seed=2)
    base = sliding_eval(tiny_model(2), tokens, ECFG, tables, CPU)
    res = ttt_eval(tiny_model(2), tokens, ECFG, tables, CPU)
    padded = Evaluator(tiny_model(2), ECFG, tables, CPU, pad=True).run(tokens, ttt=True)
    assert res["bpb"] != base["bpb"]
    assert padded["bpb"] == pytest.approx(res["bpb"], abs=1e-6)
    assert padded["tokens"] == res["tokens"]


def test_sliding_identity_masks_equal_no_masks():
    # The no-TTT path runs with identity masks; it must equal the model without masks.
    model, tables = tiny_model(3), tiny_tables(3)
    tokens = tiny_tokens(200, seed=3)
    res = sliding_eval(model, tokens, ECFG, tables, CPU)
    ref = reference_eval(tiny_model(3), tokens, ECFG, tables, ttt=False)
    assert res["bpb"] == pytest.approx(ref["bpb"], abs=1e-6)


def test_scores_of_early_chunks_ignore_later_tokens():
    tables = tiny_tables(4)
    tokens = tiny_tokens(604, seed=4)
    k = 1  # chunks 0..k: targets < (k + 1) * 128, i.e. tokens up to index (k + 1) * 128
    changed = tokens.clone()
    cut = (k + 1) * ECFG.ttt_chunk_tokens + 1
    changed[cut:] = tiny_tokens(604 - cut, seed=99)
    a = ttt_eval(tiny_model(4), tokens, ECFG, tables, CPU)
    b = ttt_eval(tiny_model(4), changed, ECFG, tables, CPU)
    assert a["chunk_nats"][: k + 1] == b["chunk_nats"][: k + 1]
    assert a["chunk_bytes"][: k + 1] == b["chunk_bytes"][: k + 1]
    assert a["chunk_nats"][k + 1] != b["chunk_nats"][k + 1]


# ---------------------------------------------------------------------------- two ranks


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokens = tiny_tokens(604, seed=5)
        res = ttt_eval(tiny_model(5), tokens, ECFG, tiny_tables(5), CPU, dist=DistInfo(rank, world, rank))
        plain = plain_eval(
            tiny_model(5), tokens, 32, tiny_tables(5), CPU, batch_seqs=4, dist=DistInfo(rank, world, rank)
        )
        if rank == 0:
            Path(out_dir, "res.json").write_text(json.dumps({"ttt": res, "plain": plain}))
    finally:
        dist.destroy_process_group()


def test_compile_train_comes_from_the_config():
    """cfg.compile_train decides whether mask training uses the compiled forward (the
    compile is lazy: constructing the Evaluator compiles nothing)."""
    tables = tiny_tables(3)
    on = Evaluator(tiny_model(3), replace(ECFG, compile_train=True), tables, CPU, compile=True)
    off = Evaluator(tiny_model(3), ECFG, tables, CPU, compile=True)
    assert on.compile_train and on.fwd_train is on.fwd and on.pad_train
    assert not off.compile_train and off.fwd_train is off.model and not off.pad_train
    eager = Evaluator(tiny_model(3), replace(ECFG, compile_train=True), tables, CPU, compile=False)
    assert not eager.compile_train and eager.fwd_train is eager.model


def test_two_ranks_equal_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    two = json.loads((tmp_path / "res.json").read_text())
    tokens = tiny_tokens(604, seed=5)
    one = ttt_eval(tiny_model(5), tokens, ECFG, tiny_tables(5), CPU)
    plain = plain_eval(tiny_model(5), tokens, 32, tiny_tables(5), CPU, batch_seqs=4)
    assert two["ttt"]["tokens"] == one["tokens"] and two["ttt"]["bytes"] == one["bytes"]
    assert abs(two["ttt"]["bpb"] - one["bpb"]) < 1e-6
    assert abs(two["plain"]["bpb"] - plain["bpb"]) < 1e-6


# ---------------------------------------------------------------------------- runs and CLI


def test_cli_bad_run_dir_exits_2(tmp_path, capsys):
    from lmcore.cli import main

    missing = tmp_path / "no_such_run"
    assert main(["eval", "--run-dir", str(missing), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "run_without_artifact"
    empty.mkdir()
    assert main(["eval", "--run-dir", str(empty), "--device", "cpu"]) == 2
    assert str(empty / "model.int6.ptz") in capsys.readouterr().err


def _packed_run(tmp_path: Path, attention: str = "math") -> tuple[Path, list[int]]:
    """A run folder holding only the packed artifact of a tiny model, its data and tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("brotli")
    from lmcore.data import write_shard
    from lmcore.pack import pack_state

    text = [f"the {w} of {v} is {w}{v} and more text here" for w in ("cat", "dog", "sun", "sea") for v in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join(text))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=VOCAB,
        model_type="bpe",
        bos_id=1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        byte_fallback=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    ids: list[int] = []
    for line in text[:30]:
        ids += [1] + sp.encode(line)
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", ids)
    cfg = replace(
        SMOKE,
        model=tiny_model_cfg(vocab_size=VOCAB, attention=attention),
        data=replace(SMOKE.data, data_dir=str(data), tokenizer=str(tmp_path / "tok.model"), seq_len=32),
        quant=replace(SMOKE.quant, calib_seqs=2, calib_len=32, calib_batch=2),
        eval=replace(ECFG, ttt_chunk_tokens=64),
    )
    run = tmp_path / "run"
    run.mkdir()
    blob, *_ = pack_state(tiny_model(6).state_dict(), cfg, CPU)
    (run / "model.int6.ptz").write_bytes(blob)
    return run, ids


def test_eval_run_writes_eval_json(tmp_path, capsys, monkeypatch):
    """`lmcore eval` end to end on a real packed artifact of a tiny model."""
    import lmcore.evaluate as evaluate_mod
    from lmcore.cli import main
    from lmcore.evaluate import eval_run

    run, ids = _packed_run(tmp_path)
    seen: list[bool] = []

    class Recording(evaluate_mod.Evaluator):  # eval.compile_train must reach the Evaluator
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.cfg.compile_train)

    monkeypatch.setattr(evaluate_mod, "Evaluator", Recording)
    args = ["eval", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--set", "eval.ttt_epochs=1"]
    assert main([*args, "--set", "eval.compile_train=true"]) == 0
    assert seen == [True]
    out = json.loads((run / "eval.json").read_text())
    assert out["eval_config"]["compile_train"] is True and out["compiled"] is False  # no compile on CPU
    n = (len(ids) - 1) // 32 * 32
    assert out["tokens"] == out["ttt"]["tokens"] == out["sliding"]["tokens"] == n
    assert out["bytes"] == sum(out["ttt"]["chunk_bytes"])
    assert out["ttt_gain_bpb"] == pytest.approx(out["sliding"]["bpb"] - out["ttt"]["bpb"])
    assert out["eval_config"]["ttt_epochs"] == 1 and out["world_size"] == 1 and out["card"] == "cpu"
    assert len(out["chunk_gain_bpb"]) == out["chunks"] == math.ceil(n / 64)
    assert {"load", "compile", "ttt_score", "ttt_train"} <= set(out["time_s"])
    ts = out["time_s"]  # the wall total spans every phase, from the artifact load to the score
    assert ts["total"] >= ts["load"] + ts["compile"] + ts["sliding"] + ts["ttt"] > 0
    assert ts["ttt"] >= ts["ttt_score"] + ts["ttt_train"]
    assert out["attention"] == {"requested": "math", "used": "math", "fallback": None}
    res = eval_run(run, ttt=False, stride=32, device="cpu", progress=False, write=False)
    assert "ttt" not in res and res["sliding"]["stride"] == 32
    # an eval-only variant goes to its own file; eval.json (the run's score) stays as it was
    before = (run / "eval.json").read_bytes()
    args = ["eval", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--set", "eval.ttt_lr=0.004"]
    assert main([*args, "--output", "eval-lr4.json"]) == 0
    variant = json.loads((run / "eval-lr4.json").read_text())
    assert variant["eval_config"]["ttt_lr"] == 0.004 and (run / "eval.json").read_bytes() == before
    capsys.readouterr()
    assert main([*args, "--output", "../escape.json"]) == 2
    assert "eval.json or eval-NAME.json" in capsys.readouterr().err and not (run.parent / "escape.json").exists()


def test_eval_run_reports_the_attention_fallback(tmp_path, capsys):
    """A model packed with fa3, evaluated on CPU: another backend, named with the reason in the
    log and eval.json; insisting on an unavailable backend is one line + exit 2."""
    from lmcore.cli import main
    from lmcore.evaluate import eval_run

    run, _ids = _packed_run(tmp_path, attention="fa3")
    lines: list[str] = []
    out = eval_run(run, ttt=False, device="cpu", progress=False, log=lines.append)
    att = json.loads((run / "eval.json").read_text())["attention"]
    assert att == out["attention"] and att["requested"] == "fa3" and att["used"] not in (None, "fa3")
    assert "'fa3' is not available on cpu" in att["fallback"], att
    assert any(f"attention fa3 cannot run here, using {att['used']}" in m for m in lines), lines
    args = ["eval", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--set", "model.attention=fa2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.attention=fa2" in err[0] and "not available on cpu" in err[0], err


def test_cli_bad_stride_is_one_line_and_writes_nothing(tmp_path, capsys):
    from lmcore.cli import main

    run, _ids = _packed_run(tmp_path)
    assert main(["eval", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--stride", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.stride=0" in err[0], err
    assert not (run / "eval.json").exists()
