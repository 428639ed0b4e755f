#!/usr/bin/env bash
# Issue 16's lever sets by name, for speed.sh's LEVERS / SOLO / VARIANTS and fa3_rowsum_check.sh's LEVERS_*
# (`source benchmarks/lever_sets.sh` keeps device commands under their 2,000 characters):
#   QF        the fused q/k/v, MLP and graph levers (session 23's set)
#   FAST      QF + the softcapped CE kernel + FA3's rowsums from XSA (session 26's set; needs the FA3_DPSUM build)
#   DQ        FAST + train.fa3_dq_accum (session 29's after set)
#   VNORM     DQ + train.fold_attn_norm (session 29)
#   GATE      VNORM + train.fused_qkv_gate (session 29; session 30 took out its two copies)
#   PRESET    the `record_fast` preset's switches: GATE without the two that need the FA3_DPSUM build
#   MIXT      GATE + inductor's mix-order kernels, tuned (train.inductor_mix_order_tuning; session 30;
#             no gain on one GPU in session 31)
#   CD        GATE + inductor's coordinate descent (train.inductor_coordinate_descent; -1.8 ms on one GPU in
#             session 32, for about 95 s more compile)
#   SIGN      CD + the fused MLP keeping pre's signs instead of pre, on the ping-pong kernel (train.fused_mlp_sign;
#             a deliberate rounding change; session 33)
#   ZERO      CD + the MLP's backward kernel zeroing FA3's dQ accumulator (train.mlp_zeroes_dq_accum; needs the
#             FA3_DPSUM build with dq_accum_in; no gain on one GPU in session 34)
#   QUARTER   CD + the ping-pong forward by quarter tiles at a sixth stage (train.fused_mlp_quarter_tiles; the same
#             bits; session 35)
#   MIX       CD + the residual mix, its row scale and the q/k/v GEMM as one op whose backward sums the mix's
#             gradient in its pass (train.fused_resid_mix; session 38, right under torch 2.11's compile in 39)
#   EMB       CD + the input stage as one op, the tables' gradients summed by token (train.fused_embed; session 40;
#             the same step as CD in session 41)
#   COMBO     CD + inductor's combo kernels (train.inductor_combo_kernels: independent kernels as one launch;
#             session 42: 3.1 ms more kernel time a profiled step than CD, no gain)
#   SMALL     CD + the two levers that took kernel time out but were flat alone: the input stage's op (EMB) and the
#             ping-pong forward by quarter tiles (QUARTER); session 45, whether together they gain
QF="train.fused_qkv=true train.fused_qkv_repeat_v=true train.fused_xsa_gate=true train.expand_kv=true"
QF="$QF train.fused_mlp=true train.fold_output_scales=true train.foreach_grad_accum=true"
QF="$QF train.compile_mode=reduce-overhead train.fused_mlp_pingpong=true train.ddp_split_graph=false"
FAST="$QF train.fused_softcap_ce=true train.fa3_xsa_rowsum=true"
DQ="$FAST train.fa3_dq_accum=true"
VNORM="$DQ train.fold_attn_norm=true"
GATE="$VNORM train.fused_qkv_gate=true"
PRESET="$QF train.fused_softcap_ce=true train.fold_attn_norm=true train.fused_qkv_gate=true"
MIXT="$GATE train.inductor_mix_order_reduction=true train.inductor_mix_order_tuning=true"
CD="$GATE train.inductor_coordinate_descent=true"
SIGN="$CD train.fused_mlp_sign=true"
ZERO="$CD train.mlp_zeroes_dq_accum=true"
QUARTER="$CD train.fused_mlp_quarter_tiles=true"
MIX="$CD train.fused_resid_mix=true"
EMB="$CD train.fused_embed=true"
COMBO="$CD train.inductor_combo_kernels=true"
SMALL="$CD train.fused_embed=true train.fused_mlp_quarter_tiles=true"
export QF FAST DQ VNORM GATE PRESET MIXT CD SIGN ZERO QUARTER MIX EMB COMBO SMALL
