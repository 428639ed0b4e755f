"""Speed ablations: each variant's step time against a baseline variant's, and the same-math
check (its training losses step by step against the baseline's at the same seed).

`SPEED_LEVERS` names the training step's speed switches as sweep variants (each against
today's defaults), `speed_variants(names, extra)` picks some of them by name for
`study.sweep`. `speed_table(df, baseline)`: one row per variant of a sweep's runs: runs, mean
step ms, tokens/s, the speedup over the baseline (its step ms over the variant's), the peak
GPU memory, the score and, with the card's bf16 matmul peak, MFU (the config's training
FLOPs a token, `lmcore.flops`). `loss_differences(df, baseline)`: one row per run of another
variant whose seed the baseline also ran: the steps both logged, the largest and the mean
|loss - loss| and both last losses. A lever that changes no formula should differ from the
baseline about as much as two runs of the baseline differ from each other (run the baseline
under two seeds' names, or twice, to see that noise). `loss_difference` is that comparison
for two loss curves ({step: loss}).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.errors import InputError
from lmcore.study.results import load_metrics

__all__ = ["SPEED_LEVERS", "loss_difference", "loss_differences", "speed_table", "speed_variants"]

TRAINED = ("trained", "packed", "ok")  # load_run's statuses of runs whose training completed

# the fastest set measured (session 21, one H200; train.step_batch_copy, on by default since session 22, with it)
_FASTEST_REPEAT_V = ["train.fused_qkv=true", "train.fused_qkv_repeat_v=true", "train.fused_xsa_gate=true",
                     "train.expand_kv=true", "train.fused_mlp=true", "train.fold_output_scales=true",
                     "train.foreach_grad_accum=true", "train.compile_mode=reduce-overhead"]

# session 31's gate set (benchmarks/lever_sets.sh's GATE), which the later levers are measured on
_GATE_SET = [*_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.fused_softcap_ce=true",
             "train.fa3_xsa_rowsum=true", "train.fa3_dq_accum=true", "train.fold_attn_norm=true",
             "train.fused_qkv_gate=true"]

SPEED_LEVERS: dict[str, list[str]] = {
    "defaults": [],
    "defaults_again": [],  # the baseline once more: its difference from `defaults` is the noise
    "session5": ["train.rope_cache=false", "train.inductor_mix_order_reduction=true"],  # the defaults before session 6
    "fused_qk": ["train.fused_qk_norm_rope=true"],
    "fused_xsa": ["train.fused_xsa_gate=true"],
    "fused_both": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true"],
    # k and v repeated to the query heads: attention runs MHA (FA3's GQA backward accumulates dk/dv in fp32).
    # Session 10, one H200 a job: -4.6 ms a step on the defaults, -6.7 ms with both fused ops
    "expand_kv": ["train.expand_kv=true"],
    "fused_both_expand_kv": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true", "train.expand_kv=true"],
    # the MLP's LeakyReLU^2 as Triton GEMM epilogues. On fused_both_expand_kv, one H200: -8.2 ms a step with the
    # TMA kernel (session 14), -2.2 ms with the pointer kernel (session 11)
    "fused_mlp": ["train.fused_mlp=true"],
    "fused_all": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                  "train.fused_mlp=true"],
    # fused_all with CUDA graphs: -1.7 ms a step on one H200 (session 15)
    "fused_all_graphs": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                         "train.fused_mlp=true", "train.compile_mode=reduce-overhead"],
    # fused_all with the MLP kernel's TMA descriptors built on the host at every launch (session 14's kernel):
    # 37-50 us more host time a launch, +0.5 ms a step on one H200 (session 15: within the noise)
    "fused_all_host_descriptors": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true",
                                   "train.expand_kv=true", "train.fused_mlp=true",
                                   "train.fused_mlp_descriptors=host"],
    # the micro-batches' gradients summed by foreach adds grouped by dtype, not an AccumulateGrad add a parameter
    # (918 small kernels a step at record's 8 micro-batches): on fused_all, one H200, -2.7 ms a step (session 16)
    "foreach_grad_accum": ["train.foreach_grad_accum=true"],
    # fused_all with foreach adds and CUDA graphs: -6.6 ms on fused_all (session 16), -7.2 (session 17)
    "fused_all_foreach_graphs": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                                 "train.fused_mlp=true", "train.foreach_grad_accum=true",
                                 "train.compile_mode=reduce-overhead"],
    # attn_scale and mlp_scale folded into the output projections' rows (a deliberate numeric change), alone and
    # on fused_all: -12.1 ms a step on fused_all, one H200 (session 17)
    "fold_scales": ["train.fold_output_scales=true"],
    "fused_all_fold": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                       "train.fused_mlp=true", "train.fold_output_scales=true"],
    # fused_all_fold with foreach adds and CUDA graphs: 518.9 ms against the original's 636.7 on one H200
    # (1.227x, session 17); 534.3 against 661.8 on another (1.239x, session 18)
    "fused_all_fold_foreach_graphs": ["train.fused_qk_norm_rope=true", "train.fused_xsa_gate=true",
                                      "train.expand_kv=true", "train.fused_mlp=true", "train.fold_output_scales=true",
                                      "train.foreach_grad_accum=true", "train.compile_mode=reduce-overhead"],
    # c_q, c_k and c_v as one GEMM, the q/k op on its output's slices, on fused_all (session 17's first version:
    # -3.3 ms a step on one H200)
    "fused_all_qkv": ["train.fused_qkv=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                      "train.fused_mlp=true"],
    # fused_all_fold_foreach_graphs with fused_qkv in place of fused_qk_norm_rope: the fastest step measured,
    # 525.4 ms against the original's 661.8 on one H200 (1.260x; -8.9 ms on the set without it, session 18);
    # on 2 ranks 267.5 ms against 323.6 (1.210x, two H200s, session 19)
    "fused_all_qkv_fold_foreach_graphs": ["train.fused_qkv=true", "train.fused_xsa_gate=true", "train.expand_kv=true",
                                          "train.fused_mlp=true", "train.fold_output_scales=true",
                                          "train.foreach_grad_accum=true", "train.compile_mode=reduce-overhead"],
    # that with the fused MLP keeping pre's signs instead of pre (train.fused_mlp_sign, a deliberate rounding
    # change; its kernels' bench on one H200, session 19: about 1.5 ms a step slower, not run in training)
    "fused_all_qkv_fold_foreach_graphs_sign": ["train.fused_qkv=true", "train.fused_xsa_gate=true",
                                               "train.expand_kv=true", "train.fused_mlp=true",
                                               "train.fused_mlp_sign=true", "train.fold_output_scales=true",
                                               "train.foreach_grad_accum=true",
                                               "train.compile_mode=reduce-overhead"],
    # that with k's kernels also repeating v for attention and summing its copies' gradients
    # (train.fused_qkv_repeat_v; on one H200, session 21: 516.5 -> 513.3 ms a step)
    "fused_all_qkv_fold_foreach_graphs_repeat_v": _FASTEST_REPEAT_V,
    # that with the fused MLP's GEMMs as the warp-specialized ping-pong kernel (train.fused_mlp_pingpong). Session 23,
    # two H200s: on 2 ranks 262.3 -> 257.2 ms a step (1.214x -> 1.237x); on one GPU 503.3 ms (1.261x, GPU 1)
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong": [*_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true"],
    # that with the compiled model as one graph under DDP (train.ddp_split_graph=false; 2+ ranks only). Session 24,
    # two H200s: on 2 ranks 264.7 -> 258.1 ms a step (1.223x -> 1.253x)
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_one_graph": [
        *_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.ddp_split_graph=false"],
    # the logit softcap and the training loss's cross-entropy as one Triton op (train.fused_softcap_ce), alone and
    # on the fastest set with the ping-pong kernel. Its bench on one H200: 0.194 ms a micro-batch forward + backward
    # against inductor's 0.323; in a training step (session 25) its kernels 1.71 ms against inductor's 3.28
    "fused_ce": ["train.fused_softcap_ce=true"],
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce": [
        *_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.fused_softcap_ce=true"],
    # that with FA3's backward given its rowsums rowsum(dO * O) by XSA's backward (train.fa3_xsa_rowsum: FA3 built with
    # FA3_DPSUM=1 scripts/build_fa3.sh; its preprocess then skips reading O and dO: 9.0 ms a 1-GPU step, session 25)
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce_rowsum": [
        *_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.fused_softcap_ce=true",
        "train.fa3_xsa_rowsum=true"],
    # that with q's backward kernel reading FA3's fp32 dQ accumulator, FA3's dQ postprocess skipped (train.fa3_dq_accum;
    # the FA3_DPSUM build's dq_accum_only). Session 28, one H200: 502.2 -> 498.0 ms a step (40 steps; bench: 4.27 ms)
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce_rowsum_dq": [
        *_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.fused_softcap_ce=true", "train.fa3_xsa_rowsum=true",
        "train.fa3_dq_accum=true"],
    # that with attention's input RMSNorm folded into v (train.fold_attn_norm: the q/k/v GEMM reads the residual
    # stream; q/k's own RMSNorm cancels the row scale, v and the gate take it). Session 30: about 0.5 ms off a
    # 2-rank step
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce_rowsum_dq_vnorm": [
        *_FASTEST_REPEAT_V, "train.fused_mlp_pingpong=true", "train.fused_softcap_ce=true", "train.fa3_xsa_rowsum=true",
        "train.fa3_dq_accum=true", "train.fold_attn_norm=true"],
    # that with the gate's logits from the q/k/v GEMM (train.fused_qkv_gate). Session 31, one H200: -2.1 ms a
    # step
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce_rowsum_dq_vnorm_gate": [*_GATE_SET],
    # a pin and a copy of x and y a micro-batch instead of the default's one pinned buffer and one copy a step
    # (train.step_batch_copy=false; the same batches). Session 22, the fastest set: 521.8 ms a step without it
    # (GPU 0) against 512.8 with it (GPU 1 of the same host), the profiled steps' kernel time equal
    "no_step_batch_copy": ["train.step_batch_copy=false"],
    "fused_all_qkv_fold_foreach_graphs_repeat_v_no_step_copy": [*_FASTEST_REPEAT_V, "train.step_batch_copy=false"],
    "ddp_buckets": ["train.ddp_bucket_cap_mb=100", "train.ddp_grad_as_bucket_view=true"],  # 2+ ranks only
    # the compiled model as one graph under DDP, not one a bucket (train.ddp_split_graph=false); 2+ ranks only.
    # Session 24 (two H200s, the fastest set with the ping-pong kernel): 264.7 -> 258.1 ms a step on 2 ranks
    "one_graph": ["train.ddp_split_graph=false"],
    # CUDA graphs (mix-order reduction off, as the defaults): -2.4 ms a step with both fused ops (session 9)
    "cuda_graphs": ["train.compile_mode=reduce-overhead"],
    # inductor's Triton GEMM templates: -2.3 ms a step, a compile of about 450 s; cuBLAS won every
    # large GEMM, so no epilogue fused (session 9)
    "max_autotune": ["train.compile_mode=max-autotune-no-cudagraphs"],
    # inductor's mix-order kernels (a norm's backward and the column sums in one pass) with their split size
    # benchmarked and their loads pipelined (train.inductor_mix_order_tuning); session 29 measured them untuned at
    # 2.2 TB/s; session 31, on the fastest set (few column sums left to fuse after the folds): no gain on one H200
    "mix_order_tuned": ["train.inductor_mix_order_reduction=true", "train.inductor_mix_order_tuning=true"],
    # inductor's Triton kernels' block sizes and warps tuned at compile (train.inductor_coordinate_descent). Session 32,
    # one H200: -1.8 ms a step on the fastest set (about 95 s more compile), -1.0 ms on record_fast's switches
    "coordinate_descent": ["train.inductor_coordinate_descent=true"],
    # inductor's combo kernels: independent kernels of one topological level (the weights' casts, ...) launched as one
    # (train.inductor_combo_kernels; the same values up to reductions' block sizes). Session 42, one H200, against CD:
    # no gain (the profiled step's kernels +3.1 ms, its wall +2.1 ms)
    "combo_kernels": ["train.inductor_combo_kernels=true"],
    # the fused MLP on the ping-pong kernel keeping pre's signs instead of pre (train.fused_mlp_sign, a deliberate
    # rounding change). Session 33, one H200, on the fastest set with coordinate descent: +0.4 ms a step (no gain),
    # peak memory 20,490 -> 17,520 MiB
    "mlp_sign_pingpong": ["train.fused_mlp=true", "train.fused_mlp_pingpong=true", "train.fused_mlp_sign=true"],
    # the ping-pong kernel's forward by quarter tiles, its ring a stage deeper (train.fused_mlp_quarter_tiles; the same
    # bits). Session 35, two H200s' benches: 0.291-0.315 ms a forward call against 0.321-0.346; one H200, on the
    # fastest set with coordinate descent: 499.1 ms a step against 497.4 (no gain)
    "mlp_quarter_tiles": ["train.fused_mlp=true", "train.fused_mlp_pingpong=true",
                          "train.fused_mlp_quarter_tiles=true"],
    # the gate set with the MLP's backward kernel zeroing FA3's dQ accumulator beside its GEMMs, FA3's preprocess
    # then not zeroing its own (train.mlp_zeroes_dq_accum; the FA3_DPSUM build with dq_accum_in). Session 34, one
    # H200, with coordinate descent too: 484.9 ms a step against 484.4 without it (no gain)
    "fused_all_qkv_fold_foreach_graphs_repeat_v_pingpong_ce_rowsum_dq_vnorm_gate_zero": [*_GATE_SET, "train.mlp_zeroes_dq_accum=true"],
    # the block's residual mix, its row scale and the q/k/v GEMM as one op whose backward writes resid_mix's gradient
    # in the pass that writes x's and x0's (train.fused_resid_mix; needs train.fold_attn_norm). Sessions 38-39
    "fused_resid_mix": [*_GATE_SET, "train.fused_resid_mix=true"],
    # the input stage as one op whose backward sums the embedding tables' gradients by token before adding them
    # (train.fused_embed; lmcore.embed_kernel), on the gate set. Sessions 40-41: no faster in training on one H200
    "fused_embed": [*_GATE_SET, "train.fused_embed=true"],
}


def speed_variants(names: list[str], extra: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """The sweep variants of `names` (keys of SPEED_LEVERS), then `extra` ({name: overrides});
    an unknown name is an InputError naming the known ones."""
    unknown = [n for n in names if n not in SPEED_LEVERS]
    if unknown:
        raise InputError(f"unknown speed lever(s) {unknown}: expected some of {list(SPEED_LEVERS)}")
    return {**{n: list(SPEED_LEVERS[n]) for n in names}, **(extra or {})}


def loss_difference(base: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    """Two training-loss curves ({step: loss}) compared on the steps both logged: how many,
    the largest and the mean |difference|, the last common step and both losses there."""
    steps = sorted(set(base) & set(other))
    if not steps:
        return {"steps": 0, "max_abs_diff": None, "mean_abs_diff": None, "last_step": None,
                "last_loss_baseline": None, "last_loss": None}
    diffs = [abs(base[s] - other[s]) for s in steps]
    return {"steps": len(steps), "max_abs_diff": max(diffs), "mean_abs_diff": statistics.mean(diffs),
            "last_step": steps[-1], "last_loss_baseline": base[steps[-1]], "last_loss": other[steps[-1]]}


def _ok(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    if "variant" not in df.columns or baseline not in set(df["variant"]):
        have = sorted(set(df["variant"])) if "variant" in df.columns else []
        raise InputError(f"baseline variant {baseline!r} is not among the runs' variants {have}")
    return df[df["status"].isin(TRAINED)] if "status" in df.columns else df


def speed_table(df: pd.DataFrame, baseline: str, peak_tflops: float | None = None) -> pd.DataFrame:
    """Per variant (in the runs' order): runs, mean step ms, tokens/s, speedup over `baseline`,
    peak memory, val_bpb (means over seeds), and MFU when `peak_tflops` is given."""
    ok = _ok(df, baseline)
    rows = []
    for variant, g in ok.groupby("variant", sort=False):
        row = {"variant": variant, "runs": len(g)}
        for col in ("mean_step_ms", "tokens_per_s", "peak_memory_mib", "val_bpb"):
            row[col] = pd.to_numeric(g[col], errors="coerce").mean() if col in g.columns else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows, columns=["variant", "runs", "mean_step_ms", "tokens_per_s", "peak_memory_mib", "val_bpb"])
    base_ms = out.loc[out["variant"] == baseline, "mean_step_ms"]
    out.insert(4, "speedup", (base_ms.iloc[0] / out["mean_step_ms"]) if len(base_ms) else float("nan"))
    if peak_tflops:
        out["mfu"] = [_mfu(ok[ok["variant"] == v], peak_tflops) for v in out["variant"]]
    return out


def _mfu(runs: pd.DataFrame, peak_tflops: float) -> float:
    """Mean over runs of tokens/s per GPU x training FLOPs a token / peak."""
    from lmcore.config import Config
    from lmcore.flops import count_flops

    vals = []
    for _, r in runs.iterrows():
        cfg = Config.load(Path(r["path"]) / "config.json")
        per_gpu = float(r["tokens_per_s"]) / max(1, int(r.get("world_size") or 1))
        vals.append(per_gpu * count_flops(cfg).train / (peak_tflops * 1e12))
    return statistics.mean(vals) if vals else float("nan")


def loss_differences(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per run of another variant with a baseline run of the same seed: loss_difference of
    their training losses (metrics.jsonl), with the variant and seed."""
    ok = _ok(df, baseline)
    curves = {}
    for _, r in ok.iterrows():
        m = load_metrics(r["path"])
        curves[(r["variant"], r["seed"])] = dict(zip(m["step"], m["train_loss"], strict=True)) if len(m) else {}
    rows = [{"variant": v, "seed": s, **loss_difference(curves[(baseline, s)], c)}
            for (v, s), c in curves.items() if v != baseline and (baseline, s) in curves]
    return pd.DataFrame(rows, columns=["variant", "seed", "steps", "max_abs_diff", "mean_abs_diff", "last_step",
                                       "last_loss_baseline", "last_loss"])
