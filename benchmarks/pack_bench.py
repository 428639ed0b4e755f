"""Benchmark `lmcore pack` against the original record script on one GPU (SPEC 5 and 8).

One call does everything and prints a table (phase, original s, lmcore s, ratio, card):

1. The original (`.ref/seed_train_gpt.py`, imported as a module with the
   `flash_attn_interface` stand-in from the same folder on sys.path) builds its GPT with
   the record hyperparameters. Weights: `--state` (an lmcore `model.pt`, e.g. a trained
   proxy1 run) or, without it, the original's init with every matrix replaced by
   N(0, 0.5^2) noise (random weights; timings only). The same tensors are loaded into
   lmcore's GPT (names must match exactly) and the two models' logits are compared.
2. Original: `gen_ar_calib(ns=8)` (its 8-sequence batch; 64 sequences would take 8x),
   `collect_hessians` on those 8 sequences, `mixed_quantize_int6` (GPTQ on the CPU), then
   `_custom_serialize` + Brotli-11.
3. lmcore, on the GPU: `sample_calibration` of 8 x 2048 (same work as the original's row)
   and of 64 x 2048, `collect_hessians`, `quantize_state_dict` (GPTQ int6 + int8), then
   `serialize` + `compress` (parallel Brotli-11); GPTQ and packing are timed cold and warm.
4. With `--state` and `--data-dir` (shards) + `--tokenizer`: the val bpb (plain,
   non-overlapping 2048-token windows) before packing, after lmcore's pack, after the
   original's quantizer with its own 8-sequence Hessians, and after the original's
   quantizer with lmcore's 64-sequence Hessians (same calibration data as lmcore), and
   the quantization losses (after - before).

Results go to stdout and, with `--out DIR`, to DIR/pack_bench.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *a, **k) -> tuple[Any, float]:
    sync()
    t = time.perf_counter()
    r = fn(*a, **k)
    sync()
    return r, time.perf_counter() - t


class SdpFlags:
    """The original's global SDPA/TF32 settings inside the block, ours restored after."""

    def __init__(self, device: torch.device | None = None):
        # the original hard-codes CUDA autocast; a CPU smoke run needs CPU autocast instead
        self.cpu_autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if device is not None and device.type == "cpu" else None
        )

    def __enter__(self):
        if self.cpu_autocast is not None:
            self.cpu_autocast.__enter__()
        b = torch.backends
        self.saved = (
            b.cuda.flash_sdp_enabled(),
            b.cuda.mem_efficient_sdp_enabled(),
            b.cuda.math_sdp_enabled(),
            b.cuda.cudnn_sdp_enabled(),
            b.cuda.matmul.allow_tf32,
            b.cudnn.allow_tf32,
        )
        b.cuda.matmul.allow_tf32 = True
        b.cudnn.allow_tf32 = True
        b.cuda.enable_cudnn_sdp(False)
        b.cuda.enable_flash_sdp(True)
        b.cuda.enable_mem_efficient_sdp(False)
        b.cuda.enable_math_sdp(False)
        return self

    def __exit__(self, *exc):
        b = torch.backends
        f, me, ma, cu, t1, t2 = self.saved
        b.cuda.enable_flash_sdp(f)
        b.cuda.enable_mem_efficient_sdp(me)
        b.cuda.enable_math_sdp(ma)
        b.cuda.enable_cudnn_sdp(cu)
        b.cuda.matmul.allow_tf32 = t1
        b.cudnn.allow_tf32 = t2
        if self.cpu_autocast is not None:
            self.cpu_autocast.__exit__(*exc)
        return False


def build_original(orig, device):
    H = orig.Hyperparameters
    m = orig.GPT(
        vocab_size=H.vocab_size, num_layers=H.num_layers, model_dim=H.model_dim, num_heads=H.num_heads,
        num_kv_heads=H.num_kv_heads, mlp_mult=H.mlp_mult, tie_embeddings=H.tie_embeddings,
        tied_embed_init_std=H.tied_embed_init_std, logit_softcap=H.logit_softcap, rope_base=H.rope_base,
        qk_gain_init=H.qk_gain_init, xsa_last_n=H.xsa_last_n, rope_dims=H.rope_dims, ln_scale=H.ln_scale,
        ve_enabled=H.ve_enabled, ve_dim=H.ve_dim, ve_layers=H.ve_layers, gated_attention=H.gated_attention,
    ).to(device).bfloat16()
    for mod in m.modules():
        if isinstance(mod, orig.CastedLinear):
            mod.float()
    orig.restore_low_dim_params_to_fp32(m)
    return m.eval()


def bpb_of(state, cfg, tokens, tables, device) -> float:
    from lmcore import pack

    model = pack.build_model(cfg, state, device)
    try:
        from lmcore.evaluate import plain_eval

        r = plain_eval(model, tokens, 2048, tables, device, bf16=True, batch_seqs=32)
        return float(r["bpb"])
    except ImportError:  # pragma: no cover - lmcore.evaluate not there
        from lmcore.bpb import BpbMeter

        meter = BpbMeter(tables, device)
        tok = tokens.to(device)
        n = (tok.numel() - 1) // 2048
        views = tok[: n * 2048 + 1]
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            for i in range(0, n, 32):
                j = min(n, i + 32)
                x = views[i * 2048 : j * 2048].view(-1, 2048)
                y = views[i * 2048 + 1 : j * 2048 + 1].view(-1, 2048)
                meter.add(model(x, y, reduction="none"), x, y)
        return meter.bpb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=str(ROOT / ".ref"), help="folder with seed_train_gpt.py and flash_attn_interface.py")
    ap.add_argument("--state", default=None, help="trained lmcore model.pt (e.g. proxy1); default random weights")
    ap.add_argument("--data-dir", default=None, help="shard folder with fineweb_val_*.bin (for bpb)")
    ap.add_argument("--tokenizer", default=None, help="SentencePiece model (for bpb)")
    ap.add_argument("--val-max-tokens", type=int, default=0)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--orig-calib-seqs", type=int, default=8)
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--calib-len", type=int, default=2048, help="calibration length (2048; smaller for smoke runs)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of this script)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the optional second original GPTQ if this many seconds have passed")
    ap.add_argument("--out", default=None, help="folder for pack_bench.json and the lmcore artifact")
    args = ap.parse_args()

    from lmcore import pack
    from lmcore.calibrate import sample_calibration
    from lmcore.config import PRESETS, Config
    from lmcore.quant import collect_hessians, compress, quantize_state_dict, serialize

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("pack_bench: needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
            return 2
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        card = torch.cuda.get_device_name(dev)
    else:
        dev = torch.device("cpu")
        card = "cpu"
    L = args.calib_len
    res: dict[str, Any] = {"card": card, "torch": torch.__version__, "phases": {}, "errors": {}}
    ph = res["phases"]
    t_start = time.perf_counter()

    def note_error(where: str) -> None:
        tb = traceback.format_exc()
        print(f"[{where}] FAILED:\n{tb}", flush=True)
        res["errors"][where] = tb.strip().splitlines()[-1]

    # ---------------------------------------------------------------- config and weights
    cfg = PRESETS["proxy1"]
    lm_state = None
    if args.state:
        obj = torch.load(args.state, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
            cfg = Config.from_dict(obj["config"], source=args.state)
        lm_state = pack.load_state_file(args.state)
    cfg = replace(
        cfg, quant=replace(cfg.quant, calib_seqs=args.calib_seqs, calib_batch=min(64, args.calib_seqs), calib_len=L)
    )
    res["config"] = cfg.name
    res["weights"] = args.state or "random (original init, matrices ~ N(0, 0.5^2))"

    orig = None
    orig_model = None
    if not args.skip_original:
        sys.path.insert(0, str(Path(args.ref).resolve()))
        orig = importlib.import_module("seed_train_gpt")
        if not args.state:  # the original's hyperparameters decide the architecture (record by default)
            H = orig.Hyperparameters
            cfg = replace(cfg, model=replace(
                cfg.model, num_layers=H.num_layers, model_dim=H.model_dim, num_heads=H.num_heads,
                num_kv_heads=H.num_kv_heads, mlp_hidden=int(H.mlp_mult * H.model_dim), rope_dims=H.rope_dims,
                ve_layers=H.ve_layers, ve_dim=H.ve_dim, xsa_layers=f"last:{H.xsa_last_n}",
            ))
        torch.manual_seed(1337)
        orig_model = build_original(orig, dev)
        if lm_state is None:
            g = torch.Generator(device="cpu").manual_seed(0)
            with torch.no_grad():
                for name, p in orig_model.named_parameters():
                    if p.ndim == 2 and p.numel() > 65536 and "tok_emb" not in name and "embed" not in name:
                        p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(p.dtype))
            lm_state = {k: v.detach().to("cpu", copy=True) for k, v in orig_model.state_dict().items()}
        else:
            missing = set(orig_model.state_dict()) ^ set(lm_state)
            res["name_mismatch"] = sorted(missing)
            orig_model.load_state_dict(lm_state, strict=True)
    if lm_state is None:
        torch.manual_seed(1337)
        from lmcore.model import GPT

        lm_state = {k: v.detach().clone() for k, v in GPT(cfg.model).state_dict().items()}

    lm_model = pack.build_model(cfg, lm_state, dev).eval()
    res["lmcore_attention"] = lm_model.attention_backend
    if orig_model is not None:
        res["name_mismatch"] = sorted(set(orig_model.state_dict()) ^ set(lm_model.state_dict()))
        ids = torch.randint(0, 1024, (2, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        try:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                with SdpFlags(dev):
                    lo = orig_model.forward_logits(ids).float()
                ll = lm_model(ids).float()
            res["logits_vs_original"] = {
                "max_abs_diff": float((lo - ll).abs().max()),
                "mean_abs_diff": float((lo - ll).abs().mean()),
                "mean_abs_logit": float(lo.abs().mean()),
            }
            print(f"logits lmcore vs original (same weights): {res['logits_vs_original']}", flush=True)
        except Exception:  # noqa: BLE001 - report and go on with the other phases
            note_error("logits_compare")

    # ---------------------------------------------------------------- original
    orig_h8 = None
    orig_deq8 = None
    if orig is not None:
        sd_cpu = {k: v.detach().cpu() for k, v in orig_model.state_dict().items()}
        try:
            with SdpFlags(dev):
                ctoks, t = timed(orig.gen_ar_calib, orig_model, dev, ns=args.orig_calib_seqs, seq_len=L,
                                 vocab_size=1024, temp=0.8, bsz=8, seed=42)
            ph["calib_8"] = {"original": t}
            ph["calib_64"] = {"original_extrapolated": t * 64 / args.orig_calib_seqs}
            print(f"original gen_ar_calib({args.orig_calib_seqs}): {t:.1f}s", flush=True)
            with SdpFlags(dev):
                orig_h8, t = timed(orig.collect_hessians, orig_model, ctoks, dev)
            ph["hessians_8"] = {"original": t}
            print(f"original collect_hessians({args.orig_calib_seqs}): {t:.1f}s", flush=True)
            (qr, qm), t = timed(orig.mixed_quantize_int6, sd_cpu, {"mlp", "attn"}, hessians=orig_h8)
            ph["gptq"] = {"original": t}
            print(f"original mixed_quantize_int6: {t:.1f}s", flush=True)
            raw, t1 = timed(orig._custom_serialize, qr, qm)
            import brotli

            blob, t2 = timed(brotli.compress, raw, quality=11)
            ph["serialize"] = {"original": t1}
            ph["compress"] = {"original": t2}
            ph["gptq_and_packing"] = {"original": ph["gptq"]["original"] + t1 + t2}
            res["original_model_bytes"] = len(blob)
            print(f"original serialize {t1:.2f}s, brotli-11 {t2:.1f}s -> {len(blob):,} bytes", flush=True)
            orig_deq8 = orig.dequantize_mixed_int6(qr, qm, sd_cpu)
        except Exception:  # noqa: BLE001 - report and go on with the other phases
            note_error("original")
        del orig_model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- lmcore
    extras: dict[str, Any] = {}
    lm_deq = None
    try:
        q8 = replace(cfg.quant, calib_seqs=8, calib_batch=8)
        info8: dict = {}
        _, t = timed(sample_calibration, lm_model, q8, dev, True, info=info8)
        ph.setdefault("calib_8", {})["lmcore"] = t
        res["lmcore_calib_8"] = info8
        print(f"lmcore calibration 8x{L}: {t:.2f}s ({info8['mode']})", flush=True)
        toks8 = sample_calibration(lm_model, q8, dev, True)
        _, t = timed(collect_hessians, lm_model, toks8, dev, True)
        ph.setdefault("hessians_8", {})["lmcore"] = t
    except Exception:  # noqa: BLE001 - report and go on with the other phases
        note_error("lmcore_calib_8")
    try:  # where a decode step's time goes: one step of the full batch, eager vs graph replay
        from lmcore.calibrate import _Decoder

        with torch.no_grad():
            dec = _Decoder(lm_model, min(64, args.calib_seqs), L, 0.8, dev, True)
            first = torch.zeros(dec.batch, 1, dtype=torch.long, device=dev)
            steps: dict[str, float] = {}
            res["decode_step_ms"] = steps
            for mode in ("eager", "graph"):
                if mode == "graph":
                    if dev.type != "cuda":
                        break
                    dec.capture()
                dec.reset(first)
                for _ in range(3):
                    dec.graph.replay() if mode == "graph" else dec.step()
                n = min(20, L - 4)
                fn = dec.graph.replay if mode == "graph" else dec.step
                _, t = timed(lambda fn=fn, n=n: [fn() for _ in range(n)])
                steps[mode] = 1000 * t / n
            print(f"lmcore decode step (batch {dec.batch}, cache {L}): {steps} ms", flush=True)
            del dec
    except Exception:  # noqa: BLE001 - report and go on with the other phases
        note_error("decode_step")
    del lm_model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        blob, report, lm_deq, meta = pack.pack_state(lm_state, cfg, dev, progress=True, bf16=True, extras=extras)
        tm = report["timings_s"]
        ph.setdefault("calib_64", {})["lmcore"] = tm["calibration"]
        ph["hessians_64"] = {"lmcore": tm["hessians"]}
        ph.setdefault("gptq", {})["lmcore"] = tm["quantize"]
        ph.setdefault("serialize", {})["lmcore"] = tm["serialize"]
        ph.setdefault("compress", {})["lmcore"] = tm["compress"]
        ph.setdefault("gptq_and_packing", {})["lmcore"] = tm["gptq_and_packing"]
        res["lmcore_model_bytes"] = len(blob)
        res["lmcore_payload_bytes"] = report["payload_bytes"]
        res["lmcore_calibration"] = report["calibration"]
        res["lmcore_errors"] = report["errors"]
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "model.int6.ptz").write_bytes(blob)
        # warm rerun of GPTQ + packing (kernels and cuSOLVER initialised)
        (stored, tmeta), t = timed(quantize_state_dict, lm_state, extras["hessians"], cfg.quant, device=dev)
        payload, t1 = timed(serialize, stored, meta | {"tensors": tmeta})
        blob2, t2 = timed(compress, payload, quality=cfg.quant.brotli_quality)
        ph["gptq_warm"] = {"lmcore": t}
        ph["gptq_and_packing_warm"] = {"lmcore": t + t1 + t2}
        res["lmcore_deterministic"] = blob2 == blob
    except Exception:  # noqa: BLE001 - report and go on with the other phases
        note_error("lmcore_pack")

    # ---------------------------------------------------------------- quantization loss
    if args.state and args.data_dir and args.tokenizer:
        try:
            from lmcore.bpb import ByteTables
            from lmcore.data import load_val_tokens

            tokens = load_val_tokens(args.data_dir, "fineweb_val_*.bin", 2048, args.val_max_tokens)
            tables = ByteTables.from_sentencepiece(args.tokenizer, cfg.model.vocab_size)
            loss: dict[str, Any] = {"val_tokens": int(tokens.numel() - 1)}
            loss["before"] = bpb_of(lm_state, cfg, tokens, tables, dev)
            if lm_deq is not None:
                loss["lmcore"] = bpb_of(lm_deq, cfg, tokens, tables, dev)
            if orig_deq8 is not None:
                loss["original_8seq_hessians"] = bpb_of(orig_deq8, cfg, tokens, tables, dev)
            if orig is not None and "hessians" in extras and time.perf_counter() - t_start > args.budget_s:
                res["skipped"] = "original quantizer with lmcore's Hessians (time budget)"
            elif orig is not None and "hessians" in extras:
                h64 = {k: v.cpu() for k, v in extras["hessians"].items()}
                sd_cpu = {k: v.detach().cpu() for k, v in lm_state.items()}
                (qr, qm), t = timed(orig.mixed_quantize_int6, sd_cpu, {"mlp", "attn"}, hessians=h64)
                deq = orig.dequantize_mixed_int6(qr, qm, sd_cpu)
                loss["original_quantizer_lmcore_hessians"] = bpb_of(deq, cfg, tokens, tables, dev)
                import brotli

                res["original_quantizer_lmcore_hessians_bytes"] = len(
                    brotli.compress(orig._custom_serialize(qr, qm), quality=11)
                )
            for k in list(loss):
                if k not in ("before", "val_tokens"):
                    loss[f"delta_{k}"] = loss[k] - loss["before"]
            res["bpb"] = loss
        except Exception:  # noqa: BLE001 - report and go on with the other phases
            note_error("bpb")

    res["total_s"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- table
    def fmt(v):
        return f"{v:9.2f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>9}"

    print(f"\npack benchmark on {card} (torch {torch.__version__}); calibration length {L}; weights: {res['weights']}")
    print(f"{'phase':<26}{'original s':>12}{'lmcore s':>12}{'ratio':>9}")
    for name, d in ph.items():
        o = d.get("original", d.get("original_extrapolated"))
        lm = d.get("lmcore")
        star = "~" if "original_extrapolated" in d else " "
        ratio = o / lm if (o is not None and lm) else None
        print(f"{name:<26}{star}{fmt(o):>11}{fmt(lm):>12}{(f'{ratio:8.1f}x' if ratio else '        -'):>9}")
    print("(~ = the original's 8-sequence time x 8)")
    for k in ("original_model_bytes", "lmcore_model_bytes", "original_quantizer_lmcore_hessians_bytes"):
        if k in res:
            print(f"{k:<42} {res[k]:>12,}")
    if "lmcore_calibration" in res:
        c = res["lmcore_calibration"]
        print(f"lmcore calibration mode: {c.get('mode')}, {c.get('tokens_per_s', 0):,.0f} tokens/s")
    if "bpb" in res:
        for k, v in res["bpb"].items():
            print(f"bpb {k:<40} {v:.6f}" if isinstance(v, float) else f"bpb {k:<40} {v}")
    if res["errors"]:
        print("ERRORS:", json.dumps(res["errors"], indent=1))
    print(f"total {res['total_s']:.1f}s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "pack_bench.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
