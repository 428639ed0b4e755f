"""The training section of lmcore's config: `TrainConfig` (optimizer, schedule, logging, compile) and issue 16's
speed switches, each with what it does and what it measured. `lmcore.config` holds it with the other sections,
checks the switches' requirements and parses overrides into it.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    warmdown_iters: int = 3500
    compile_warmup_steps: int = 20
    batch_tokens: int = 786_432
    grad_accum: int = 8  # micro-batches per step on one process; divided by world size
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    matrix_lr: float = 0.028
    muon_momentum: float = 0.99
    muon_momentum_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_ns_steps: int = 5
    muon_wd: float = 0.0417
    embed_lr: float = 0.035
    scalar_lr: float = 0.025
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    grad_clip: float = 0.3
    ema_decay: float = 0.997
    ema: str = "original"  # original (starts at init) | bias_corrected | off
    compare_ema: bool = False  # also validate the other EMA mode's weights of the same run at the end
    # lmcore's own late QAT (off in every preset). The original's late QAT never runs: its switch is a class attribute
    # flipped inside a model compiled with fullgraph=True, which torch.compile constant-folds at the first trace
    # (openai/parameter-golf #315, #1032, #667). Measured on 2xH200, 400 steps with QAT "on" from step 1 (SPEC 8b):
    # the original's loss curve equals lmcore's without QAT to the 4th decimal (val_bpb 1.7997 vs 1.8002), while real
    # QAT gives 2.7617. So `record` trains without fake quantization, as the original effectively does. > 0: fake
    # int(model.qat_bits) (straight-through) in the block linears once the LR multiplier is below it (original: 0.15)
    lmcore_late_qat_threshold: float = 0.0
    val_every: int = 0  # steps between validations; 0 = only at the end
    log_every: int = 50
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True  # torch.compile on CUDA (never on CPU)
    # torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead (CUDA graphs),
    # given to torch.compile as the mode's inductor options, so it combines with the switches below
    compile_mode: str = "default"
    # inductor's mix-order reduction (torch >= 2.11; parameter-golf #1420: +5.9 ms a backward on 8xH100), true = torch's
    # default. Off: 627.4/625.3 -> 592.8/595.1 ms a step on one H200 with rope_cache (RESULTS.md "Speed"); session 29's
    # fused column-sum kernels ran at 2.2 TB/s. A torch without the option ignores off.
    inductor_mix_order_reduction: bool = False
    # inductor's Triton kernels' block sizes tuned at compile (the same sums, blocked otherwise: fp32 rounding).
    # Session 32, one H200: -1.8 ms a step on the fastest set, for about 95 s more compile; losses within the noise
    inductor_coordinate_descent: bool = False
    # inductor's mix-order kernels tuned (with inductor_mix_order_reduction): their split size benchmarked at compile
    # and their loads pipelined over stages (options a torch lacks are left out). Session 29: at torch 2.11's defaults
    # (a split of 64 rows walked one row at a time, one stage) they moved 2.2 TB/s where the plain norm backward moves
    # 3.9.
    # The same sums in another order: fp32 rounding. Session 31, one H200, on the fastest set: no gain (+1.3 ms)
    inductor_mix_order_tuning: bool = False
    # inductor's combo kernels (torch._inductor.config.combo_kernels): independent kernels of the same topological level
    # (the weights' casts, the per-layer scales' products, ...) run as one launch a group of up to 8. A pointwise
    # sub-kernel computes what it did alone; a reduction's block size may change (fp32 rounding). Session 39's profile:
    # about 6,000 kernels a one-GPU step, 5.6 ms of gaps under 20 us between them, the weights' casts 1.5-3.4 us kernels
    # of 88 calls each. Session 42, one H200, against CD: no gain (the profiled step's kernels +3.1 ms, wall +2.1 ms)
    inductor_combo_kernels: bool = False
    rope_cache: bool = True  # RoPE tables computed once for data.seq_len (GPT.cache_rope), not in the graph
    # q/k RMSNorm + RoPE + q_gain as one op (lmcore.kernels: Triton on CUDA, the same math in PyTorch
    # elsewhere; the same math as the plain path up to fp32 rounding). The exported script embeds the kernels.
    fused_qk_norm_rope: bool = False
    # XSA + the attention gate as one op on the XSA layers (lmcore.xsa_kernel.xsa_gate; the same math up
    # to fp32 rounding). The exported script embeds the kernels.
    fused_xsa_gate: bool = False
    # The logit softcap and the training loss's cross-entropy as one op (lmcore.ce_kernel: Triton on CUDA); the
    # same math up to fp32 rounding and the tanh formula. The exported script embeds the kernels.
    fused_softcap_ce: bool = False
    # c_q, c_k and c_v as one GEMM on their weights concatenated (1024 x 512 at record's widths), then the q/k
    # op (as fused_qk_norm_rope's, which it subsumes) on the q and k slices of its output in place; the
    # backward writes q's, k's and v's gradients into one tensor, so the input's gradient is one GEMM and the
    # weights' gradients one GEMM (lmcore.kernels.qkv_norm_rope). The normed input is read once instead of
    # three times each way. The same math up to the GEMMs' accumulation order. KV-cached decoding keeps the
    # three GEMMs. The exported script embeds the kernels. k's kernels move v's rows out of (and its gradient
    # into) its slice. On one H200: 534.3 -> 525.4 ms a step (benchmarks/RESULTS.md, session 18).
    fused_qkv: bool = False
    # With fused_qkv and expand_kv: k's kernels also write v's heads repeated for attention, and sum those copies'
    # gradients with v's own (XSA's) in fp32 into v's slice of the fused gradient, in place of inductor's repeat
    # and sum kernels (3.3 + 3.9 ms a step on one H200, session 18's profile), on the layers without value
    # embeddings. The same math up to the sum's rounding. On one H200: 516.5 -> 513.3 ms a step (session 21).
    fused_qkv_repeat_v: bool = False
    # With fused_qkv: the gated layers' q/k/v GEMM also gives the attention gate's logits (its weight's rows appended),
    # so x is not read again for them, nor dx a GEMM of its own. The bias is added in fp32: a rounding apart.
    fused_qkv_gate: bool = False
    # FA3's backward takes rowsum(dO * O) from fused_xsa_gate's backward (lmcore.fa3_xsa; FA3 built with FA3_DPSUM=1)
    fa3_xsa_rowsum: bool = False
    # With fa3_xsa_rowsum and fused_qkv: FA3 skips its dQ postprocess and q's backward kernel reads FA3's fp32 dQ
    # accumulator instead of a bf16 dq (lmcore.fa3_xsa; FA3_DPSUM build). One bf16 rounding of dq fewer.
    fa3_dq_accum: bool = False
    # The MLP's LeakyReLU^2 as its first GEMM's epilogue, act' as the backward GEMM's (lmcore.mlp_kernel; the same
    # math up to the GEMMs' accumulation order; the exported script embeds it). One H200 (session 14, TMA kernel):
    # 541.3 -> 533.1 ms a step; losses within run-to-run noise (benchmarks/RESULTS.md).
    fused_mlp: bool = False
    # Where the fused MLP's TMA kernel builds its descriptors: device (each program, at its start; the launch
    # takes pointers) | host (at every launch). The same kernel body and numbers and step time (session 15).
    fused_mlp_descriptors: str = "device"
    # With fused_mlp: both of its GEMMs as lmcore.mlp_pingpong's warp-specialized kernel (Gluon, Hopper only;
    # elsewhere the TMA kernel): two consumer warpgroups take tiles in turn, one's epilogue beside the other's
    # GEMM. Its outputs equal the TMA kernel's bit for bit (benchmarks/mlp_pingpong_bench.py). Session 23, H200s:
    # 0.316 / 0.308 ms a call forward / backward against the TMA kernel's 0.359 / 0.417; in the fastest set on
    # 2 ranks 262.3 -> 257.2 ms a step, losses within the noise (benchmarks/RESULTS.md). With fused_mlp_sign too.
    fused_mlp_pingpong: bool = False
    # With fused_mlp_pingpong (and without fused_mlp_sign): the ping-pong kernel's forward writes pre and post by
    # quarter tiles through half the shared memory, and its ring takes a sixth stage (lmcore.mlp_pingpong's
    # TILE_QUARTER). The same bits. Session 35, two H200s' benches: 0.291-0.315 ms a forward call against 0.321-0.346;
    # one H200 (the fastest set with coordinate descent): 499.1 ms a step against 497.4 without it, no gain (at the
    # card's power cap the kernel's 1.9 ms went back in clock; benchmarks/RESULTS.md).
    fused_mlp_quarter_tiles: bool = False
    # With fused_mlp: its forward keeps post and pre's signs instead of pre, and its backward takes act'(pre) from
    # them (lmcore.mlp_kernel._dpre_sign_math); a deliberate rounding change. mlp_hidden a multiple of 32. With the
    # TMA kernel slower on an H200 (session 19): 0.316 / 0.443 ms a call forward / backward against 0.339 / 0.403
    # without it. With fused_mlp_pingpong the ping-pong kernel's epilogues write and read the signs: on one H200
    # (session 33, the fastest set) 490.5 ms a step against 490.1 without it, peak memory 20,490 -> 17,520 MiB.
    fused_mlp_sign: bool = False
    # With fa3_dq_accum and fused_mlp_pingpong: the MLP's backward kernel writes zeros over the next attention
    # backward's fp32 dQ accumulator beside its GEMMs (a slice after each tile), and FA3 adds into it without its
    # preprocess zeroing one (201 MB a call at record's micro-batch; lmcore.fa3_xsa). The same math. FA3_DPSUM build.
    # One H200 (session 34, the fastest set with coordinate descent): 484.9 ms a step against 484.4 without it, no
    # gain (FA3's preprocess -3.71 ms in the profiled step, the ping-pong kernel +3.14).
    mlp_zeroes_dq_accum: bool = False
    # k and v repeated to the query heads before attention (GQA run as MHA: FA3's backward then writes dk/dv without
    # its fp32 GQA accumulators and their converts); autograd, or the q/k kernel (fused_qk_norm_rope), sums the
    # copies' gradients: the same math up to those sums' order (GPT.use_expanded_kv). Session 10, one H200: 578.5 ->
    # 573.9 ms a step on the defaults, 1.6 GB more peak memory; losses within run-to-run noise (RESULTS.md).
    expand_kv: bool = False
    # With fused_qkv and fold_output_scales: the q/k/v GEMM reads the residual stream, and v's rows (and the gate's)
    # take its RMSNorm's scale in the q/k/v kernels; q/k's RMSNorm cancels it (GPT.fold_attn_norm). A rounding fewer.
    fold_attn_norm: bool = False
    # With fold_attn_norm: each block's residual mix (x_in = m0 x + m1 x0), its row scale and the q/k/v GEMM as one
    # autograd op (GPT.use_fused_resid_mix, lmcore.mix_kernel): its backward writes dx, dx0 and resid_mix's gradient
    # (the column sums of g x and g x0) in one Triton pass, where inductor reads g, x and x0 again for the column sums
    # (10.7 ms of a 1-GPU record step, session 37). Within bf16 rounding of the plain path: x_in's gradient is not
    # rounded between, the column sums are summed in another order. Session 38, one H200: eager it gives the plain
    # path's gradients within 2e-7 (relative). Compiled under torch 2.11 they were wrong until session 39 (dynamo
    # lost x_in's gradient to a no-op .float() of it: lmcore.layers.as_dtype). Session 39, one H200: 15.4 ms a step
    # slower than without it (the op's kernel and the dx/dx0 passes inductor had fused); losses within noise.
    fused_resid_mix: bool = False
    # The input stage (token embedding, product-key bigram, RMS norm, SmearGate) as one op (GPT.use_fused_embed,
    # lmcore.embed_kernel): Triton on CUDA. Its backward sums the tables' gradients by token (positions sorted by id)
    # before it adds them, where inductor's adds every token's row with fp32 atomics (0.35 ms a micro-batch on one
    # H200, session 39's profile). The same math up to fp32 sums' order and one rounding of the rows' gradient to the
    # tables' dtype (eager's). Session 40, one H200, benchmarks/embed_bench.py: 564 us a micro-batch against 836;
    # session 41, in training on one H200: 0.9 ms of kernels saved a step, the same step time. Needs
    # model.bigram=product_key and model.smear_gate; KV-cached decoding keeps the plain path. The exported script
    # embeds the kernels.
    fused_embed: bool = False
    # attn_scale and mlp_scale folded into the rows of the output projections they scale (GPT.fold_output_scales):
    # x + (diag(s) W) h as one GEMM instead of x + s * (W h), so the scaled branches are never written and the
    # backward takes ds and dW from the scaled weight's gradient instead of a column sum over the tokens. A
    # deliberate numeric change: s W is rounded to bf16 once before the GEMM, where the plain path rounds W h and
    # then s * (W h). LatentMask TTT keeps the plain path. On one H200 (session 17, with both fused ops, expand_kv
    # and fused_mlp): 534.1 -> 522.0 ms a step, max |dloss| 0.0138 over 200 steps (benchmarks/RESULTS.md).
    fold_output_scales: bool = False
    # The micro-batches' gradients summed with foreach adds, one a dtype (torch.autograd.grad, then
    # torch._foreach_add_ into .grad) instead of autograd's AccumulateGrad, one add kernel a parameter: the same
    # fp32 sums in the same order. Under DDP the last micro-batch keeps .backward() for the all-reduce. One H200
    # (session 16): 4 multi-tensor kernels an accumulation instead of 134 adds, 545.8 -> 543.1 ms a step; max
    # |dloss| 0.0329 over 200 steps (two plain runs: 0.0316). Off by default, like the other speed switches.
    foreach_grad_accum: bool = False
    # A step's tokens for this rank read into one pinned host buffer (int32, two used in turn) and copied to the GPU
    # at once (x and y cast to int64 there), instead of a pin and a copy of x and of y for every micro-batch. The same
    # batches, so on by default since session 22. There, on two H200s of one host (the fastest set), steady step minus
    # the profiled step's kernel time: 18.1 ms without it (GPU 0, 521.8 ms a step), 9.2 with it (GPU 1, 512.8 ms), the
    # GPU waiting for the first micro-batch's two pins; on 2 ranks the same step time (266.6 against 266.7 ms). false:
    # the pin-and-copy path, to ablate.
    step_batch_copy: bool = True
    ddp_bucket_cap_mb: float = 25.0  # DDP gradient bucket size (torch's default 25)
    ddp_grad_as_bucket_view: bool = False  # DDP gradients as views into its buckets (saves a copy)
    # A compiled model under DDP: dynamo splits its graph at DDP's buckets (torch's optimize_ddp), so each bucket's
    # all-reduce starts while the backward goes on. false: one graph (optimize_ddp off), the all-reduce after the
    # whole backward; the same math. Two H200s (session 24, the fastest set): 264.7 -> 258.1 ms a step on 2 ranks.
    ddp_split_graph: bool = True
    profile_step: int = 0  # > 0: profile that optimizer step into RUN/profile/ (lmcore.profiling)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
