"""Time lmcore's LatentMask TTT eval against the original script's TTT phase, same card,
same dequantized weights, same validation tokens; print a table (and JSON under --out).

lmcore: the packed artifact RUN_DIR/model.int6.ptz is loaded through lmcore.pack; the
evaluator compiles its scoring forward (compile time reported apart), runs the plain
sliding eval (the baseline) and then the TTT eval. Original: `.ref/seed_train_gpt.py` is
imported (with the FA3 stand-in `flash_attn_interface.py` next to it), its GPT is built
as its main() builds the eval model (bf16, CastedLinear and low-dim tensors fp32, SDPA
flash only) and loaded with lmcore's dequantized state dict (names match), then its
`eval_val_sliding_ttt` runs unchanged on the same tokens.

usage: python benchmarks/eval_bench.py --run-dir runs/ID [--docs D --tokenizer T]
       [--data-dir DIR] [--max-tokens N] [--variants compiled,eager,compiled_train]
       [--skip-original] [--orig-qat] [--out DIR]
`--random-model` uses a randomly initialised model of the run's config (or `record`)
instead of the artifact: a plumbing check, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmcore.bpb import ByteTables
from lmcore.config import PRESETS, Config
from lmcore.corpus import build_shards, iter_docs
from lmcore.data import list_shards, load_val_tokens
from lmcore.evaluate import Evaluator
from lmcore.runtime import card_name, pick_device, synchronize


def log(msg: str) -> None:
    print(msg, flush=True)


def ensure_val_shards(data_dir: Path, pattern: str, docs: str | None, tokenizer: str, val_docs: int) -> None:
    try:
        if list_shards(data_dir, pattern):
            return
    except ValueError:
        pass
    if not docs:
        raise SystemExit(f"no validation shards in {data_dir} and no --docs to build them from")
    t0 = time.perf_counter()
    texts = itertools.islice(iter_docs(docs), val_docs)
    counts = build_shards(texts, tokenizer, data_dir, val_docs=val_docs, progress=False, require_train=False)
    log(f"built val shards in {data_dir}: {counts['val_tokens']:,} tokens in {time.perf_counter() - t0:.1f}s")


def load_lmcore(run_dir: Path, device: torch.device, random_model: bool) -> tuple[torch.nn.Module, Config]:
    if random_model:
        from lmcore.model import GPT

        cfg_path = run_dir / "config.json"
        cfg = Config.load(cfg_path) if cfg_path.is_file() else PRESETS["record"]
        torch.manual_seed(0)
        model = GPT(cfg.model)
        with torch.no_grad():  # the zero-init projections get weights so nothing is trivial
            for name, p in model.named_parameters():
                if p.ndim == 2 and float(p.abs().max()) == 0.0:
                    p.normal_(0, 0.02)
        if device.type == "cuda":
            model.cast_embeddings(torch.bfloat16)
        return model.to(device), cfg
    from lmcore.evaluate import _load_packed

    model, cfg = _load_packed(run_dir / "model.int6.ptz", device)
    return model.to(device), cfg


def run_lmcore(model, cfg: Config, tokens, tables, device, variant: str, baseline: bool) -> dict:
    ecfg = cfg.eval
    compiled = variant in ("compiled", "compiled_train") and device.type == "cuda"
    ev = Evaluator(
        model,
        replace(ecfg, compile=compiled),
        tables,
        device,
        bf16=device.type == "cuda",
        compile=compiled,
        compile_train=variant == "compiled_train",
    )
    t0 = time.perf_counter()
    ev.warmup(tokens)
    compile_s = time.perf_counter() - t0
    log(f"[lmcore {variant}] warm-up/compile {compile_s:.1f}s")
    out: dict = {"variant": variant, "compile_s": compile_s}
    if baseline:
        base = ev.run(tokens, ttt=False, progress=True, log=log)
        out["sliding_bpb"] = base["bpb"]
        out["sliding_s"] = base["time_s"]["total"]
        log(f"[lmcore {variant}] sliding bpb {base['bpb']:.6f} in {base['time_s']['total']:.1f}s")
    res = ev.run(tokens, ttt=True, progress=True, log=log)
    out.update(
        ttt_bpb=res["bpb"],
        ttt_loss=res["loss"],
        ttt_s=res["time_s"]["total"],
        ttt_score_s=res["time_s"]["score"],
        ttt_train_s=res["time_s"]["train"],
        tokens=res["tokens"],
        bytes=res["bytes"],
        chunks=res["chunks"],
        chunk_bpb=res["chunk_bpb"],
    )
    log(
        f"[lmcore {variant}] ttt bpb {res['bpb']:.6f} in {res['time_s']['total']:.1f}s "
        f"(score {res['time_s']['score']:.1f}s, train {res['time_s']['train']:.1f}s)"
    )
    return out


def import_original(ref_dir: Path):
    sys.path.insert(0, str(ref_dir))
    try:
        import brotli  # noqa: F401
    except ImportError:  # only its artifact writer needs brotli; the TTT phase does not
        sys.modules["brotli"] = types.ModuleType("brotli")
    return importlib.import_module("seed_train_gpt")


def run_original(ref_dir: Path, state: dict, cfg: Config, tokens_cpu, tokenizer: str, device, qat: bool) -> dict:
    import sentencepiece as spm
    from torch.backends import cuda as bc

    m = import_original(ref_dir)
    a = m.Hyperparameters()
    e = cfg.eval
    a.train_seq_len, a.eval_stride = e.seq_len, e.stride
    a.ttt_lr, a.ttt_epochs, a.ttt_chunk_tokens = e.ttt_lr, e.ttt_epochs, e.ttt_chunk_tokens
    a.ttt_momentum, a.ttt_batch_seqs, a.ttt_grad_clip = e.ttt_momentum, e.ttt_batch_seqs, e.ttt_grad_clip
    model = (
        m.GPT(
            vocab_size=a.vocab_size,
            num_layers=a.num_layers,
            model_dim=a.model_dim,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            mlp_mult=a.mlp_mult,
            tie_embeddings=a.tie_embeddings,
            tied_embed_init_std=a.tied_embed_init_std,
            logit_softcap=a.logit_softcap,
            rope_base=a.rope_base,
            qk_gain_init=a.qk_gain_init,
            xsa_last_n=a.xsa_last_n,
            rope_dims=a.rope_dims,
            ln_scale=a.ln_scale,
            ve_enabled=a.ve_enabled,
            ve_dim=a.ve_dim,
            ve_layers=a.ve_layers,
            gated_attention=a.gated_attention,
        )
        .to(device)
        .bfloat16()
    )
    for mod in model.modules():
        if isinstance(mod, m.CastedLinear):
            mod.float()
    m.restore_low_dim_params_to_fp32(model)
    model.load_state_dict(state, strict=True)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    luts = m.build_sentencepiece_luts(sp, a.vocab_size, device)
    m.CastedLinear._qat_enabled = qat
    saved = (bc.cudnn_sdp_enabled(), bc.flash_sdp_enabled(), bc.mem_efficient_sdp_enabled(), bc.math_sdp_enabled())
    bc.enable_cudnn_sdp(False), bc.enable_flash_sdp(True), bc.enable_mem_efficient_sdp(False), bc.enable_math_sdp(False)
    try:
        # Its Rotary caches cos/sin on first use; filled inside the scorer's inference_mode
        # they could not be saved for the TTT backward (depending on autocast dtypes), so
        # fill the cache once here, outside inference mode (same length, same device).
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.forward_logits(tokens_cpu[: a.train_seq_len][None].to(device))
        synchronize(device)
        t0 = time.perf_counter()
        # its autocast names "cuda"; on a CPU plumbing check bf16 comes from a CPU autocast
        cpu_ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu")
        with cpu_ac:
            loss, bpb = m.eval_val_sliding_ttt(
                a, model, 0, 1, device, tokens_cpu, *luts, stride=a.eval_stride, log0=log
            )
        synchronize(device)
        dt = time.perf_counter() - t0
    finally:
        bc.enable_cudnn_sdp(saved[0]), bc.enable_flash_sdp(saved[1])
        bc.enable_mem_efficient_sdp(saved[2]), bc.enable_math_sdp(saved[3])
        m.CastedLinear._qat_enabled = False
    log(f"[original] ttt bpb {bpb:.6f} loss {loss:.6f} in {dt:.1f}s (late-QAT flag {qat})")
    return {"ttt_s": dt, "ttt_bpb": bpb, "ttt_loss": loss, "qat": qat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data-dir", default=None, help="val shards (default: the run config's data.data_dir)")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the run config's)")
    ap.add_argument("--docs", default=None, help="proxy docs .jsonl.xz to build the val shards from if missing")
    ap.add_argument("--val-docs", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=0, help="cap the val tokens (0 = all)")
    ap.add_argument("--variants", default="compiled", help="lmcore variants: compiled,eager,compiled_train")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="eval.field=value for both")
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--original-first", action="store_true")
    ap.add_argument(
        "--orig-qat",
        action="store_true",
        help="run the original with CastedLinear._qat_enabled (as after its own late-QAT training)",
    )
    ap.add_argument("--ref-dir", default=str(ROOT / ".ref"))
    ap.add_argument("--random-model", action="store_true", help="plumbing check without an artifact")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="folder for eval_bench.json")
    args = ap.parse_args()

    device = pick_device(args.device)
    run_dir = Path(args.run_dir)
    model, cfg = load_lmcore(run_dir, device, args.random_model)
    cfg = cfg.override(args.overrides)
    backend = model.set_attention_backend(cfg.model.attention, device)
    data_dir = Path(args.data_dir or cfg.data.data_dir)
    tokenizer = args.tokenizer or cfg.data.tokenizer
    ensure_val_shards(data_dir, cfg.data.val_pattern, args.docs, tokenizer, args.val_docs)
    tokens = load_val_tokens(
        data_dir, cfg.data.val_pattern, cfg.eval.seq_len, args.max_tokens or cfg.data.val_max_tokens
    )
    tables = ByteTables.from_sentencepiece(tokenizer, cfg.model.vocab_size)
    card = card_name(device)
    log(
        f"card {card}, torch {torch.__version__}, lmcore attention {backend}, {tokens.numel() - 1:,} val targets, "
        f"eval {cfg.eval}"
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    results: dict = {
        "card": card,
        "torch": torch.__version__,
        "attention": backend,
        "targets": tokens.numel() - 1,
        "eval": cfg.eval.__dict__,
        "lmcore": [],
    }

    def save() -> None:  # after every phase, so a run cut short still leaves its numbers
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_bench.json").write_text(json.dumps(results, indent=2, default=str))

    def original() -> None:
        if args.skip_original:
            return
        try:
            results["original"] = run_original(Path(args.ref_dir), state, cfg, tokens, tokenizer, device, args.orig_qat)
        except Exception as e:  # noqa: BLE001 - report it and keep lmcore's numbers
            log(f"[original] failed: {type(e).__name__}: {e}")
            results["original_error"] = f"{type(e).__name__}: {e}"
        save()

    if args.original_first:
        original()
    for i, v in enumerate(x for x in args.variants.split(",") if x):
        results["lmcore"].append(run_lmcore(model, cfg, tokens, tables, device, v, baseline=i == 0))
        save()
    if not args.original_first:
        original()

    orig = results.get("original")
    base = results["lmcore"][0] if results["lmcore"] else {}
    rows = []
    for r in results["lmcore"]:
        ratio = r["ttt_s"] / orig["ttt_s"] if orig else float("nan")
        ratio_c = (r["ttt_s"] + r["compile_s"]) / orig["ttt_s"] if orig else float("nan")
        rows.append((r["variant"], r["ttt_s"], r["compile_s"], ratio, ratio_c, r["ttt_bpb"]))
    print()
    print(f"card: {card}   targets: {tokens.numel() - 1:,}   chunks: {base.get('chunks')}")
    if orig:
        print(f"original TTT: {orig['ttt_s']:.1f} s   bpb {orig['ttt_bpb']:.6f}")
    print(f"lmcore plain sliding bpb: {base.get('sliding_bpb', float('nan')):.6f}")
    print("| lmcore variant | TTT s | compile s | ratio vs original | ratio incl. compile | TTT bpb | TTT gain |")
    print("|---|---|---|---|---|---|---|")
    for v, t, c, r1, r2, b in rows:
        gain = base.get("sliding_bpb", float("nan")) - b
        print(f"| {v} | {t:.1f} | {c:.1f} | {r1:.3f} | {r2:.3f} | {b:.6f} | {gain:+.6f} |")
    save()


if __name__ == "__main__":
    main()
