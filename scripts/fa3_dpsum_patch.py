"""Patch FlashAttention-3's backward to take rowsum(dO * O) from the caller (build_fa3.sh FA3_DPSUM=1).

usage: python3 scripts/fa3_dpsum_patch.py HOPPER_DIR

FA3's backward starts with a preprocess kernel that reads O and dO to compute each query row's
rowsum(dO * O) (`softmax_d`), writes the LSE in base 2 and zeroes the fp32 dQ accumulator. lmcore's
XSA backward (train.fa3_xsa_rowsum) already holds O and dO in registers and writes the rowsums as a
by-product, so the preprocess need not read either again. The patch:

- `flash_attn_3::bwd` gets one more argument, `Tensor? softmax_d = None` (last, so every existing
  caller is unchanged): (batch, heads, seqlen_q rounded up to the backward's kBlockM), float32,
  contiguous; fixed-length batches only;
- given it, `Flash_bwd_params::dpsum_given` is set and the preprocess kernel is launched with a null
  O pointer, which makes it skip the O / dO loads and the rowsum store (it still writes the base-2
  LSE, zeroes dQ's accumulator and the dQ semaphore);
- without it, every kernel runs as before: the only change on that path is one uniform branch in
  the preprocess kernel;
- and one more, `bool dq_accum_only = False`: true skips the postprocess that converts dQ's fp32
  accumulator into dq (dq is then not written; the caller reads the accumulator `bwd` returns, laid
  out as tests/test_fa3_xsa.py's `_dq_tile_index` says). lmcore's train.fa3_dq_accum (lmcore.fa3_xsa)
  passes it;
- and one more, `Tensor(dq_accum_in!)? dq_accum_in = None`: the caller's fp32 dQ accumulator, (batch,
  heads, seqlen_q rounded * head dim rounded), contiguous, already zero (fixed-length batches only).
  The backward adds into it, returns it as its third output, and the preprocess does not zero it
  (a null accumulator pointer skips that block, as a null O skips the rowsums). lmcore's
  train.mlp_zeroes_dq_accum passes one that the MLP's backward kernel zeroed.

Each anchor must occur exactly once at the pinned flash-attention commit, else the build stops
with the anchor named (fa3_setup_patch.apply).
"""

from __future__ import annotations

import os
import sys

from fa3_setup_patch import apply

NOTE = "lmcore fa3_dpsum_patch"

PATCHES: dict[str, list[tuple[str, str]]] = {
    "flash.h": [
        (
            "    bool deterministic;\n",
            f"    bool deterministic;\n    bool dpsum_given;  // {NOTE}: softmax_d from the caller\n"
            f"    bool dq_accum_only;  // {NOTE}: no dQ postprocess (the caller reads dq_accum)\n"
            f"    bool dq_accum_given;  // {NOTE}: the caller's dq_accum, already zero\n",
        ),
    ],
    "flash_bwd_preprocess_kernel.h": [
        (
            "        GmemTiledCopy gmem_tiled_copy_O;\n",
            f"        if (params.ptr_O != nullptr) {{  // {NOTE}: null when rowsum(dO * O) is given\n"
            "        GmemTiledCopy gmem_tiled_copy_O;\n",
        ),
        (
            "                gdPsum(row) = row < seqlen_o - m_block * kBlockM ? dP_sum(mi) : 0;\n"
            "            }\n"
            "        }\n",
            "                gdPsum(row) = row < seqlen_o - m_block * kBlockM ? dP_sum(mi) : 0;\n"
            "            }\n"
            "        }\n"
            f"        }}  // {NOTE}\n",
        ),
        (
            "        if constexpr (Clear_dQaccum) {\n",
            f"        if (Clear_dQaccum && params.ptr_dQaccum != nullptr) {{  // {NOTE}: null when it is given zeroed\n",
        ),
    ],
    "flash_bwd_launch_template.h": [
        (
            "        static_cast<Element const*>(params.o_ptr),\n",
            f"        params.dpsum_given ? nullptr : static_cast<Element const*>(params.o_ptr),  // {NOTE}\n",
        ),
        (  # the preprocess's arguments (the mainloop's stride line differs)
            "        static_cast<ElementAccum*>(params.dq_accum_ptr),\n"
            "        {seqlen_q_rounded * params.d_rounded, params.h, batch_q},  // shape_dQaccum\n"
            "        {_1{}, seqlen_q_rounded * params.d_rounded, !is_varlen_q ? params.d_rounded * seqlen_q_rounded * "
            "params.h : 0},  // stride_dQaccum\n",
            f"        params.dq_accum_given ? nullptr : static_cast<ElementAccum*>(params.dq_accum_ptr),  // {NOTE}\n"
            "        {seqlen_q_rounded * params.d_rounded, params.h, batch_q},  // shape_dQaccum\n"
            "        {_1{}, seqlen_q_rounded * params.d_rounded, !is_varlen_q ? params.d_rounded * seqlen_q_rounded * "
            "params.h : 0},  // stride_dQaccum\n",
        ),
        (
            "    CHECK_CUTLASS(cutlass::kernel_launch<PostprocessKernel>(grid_m_postprocess, ",
            f"    if (!params.dq_accum_only)  // {NOTE}\n"
            "    CHECK_CUTLASS(cutlass::kernel_launch<PostprocessKernel>(grid_m_postprocess, ",
        ),
    ],
    "flash_api_stable.cpp": [
        (  # mha_bwd's signature
            "    bool deterministic,\n    int64_t sm_margin\n) {\n",
            "    bool deterministic,\n    int64_t sm_margin,\n"
            f"    std::optional<Tensor> softmax_d_,  // {NOTE}: rowsum(dO * O), (b, h, seqlen_q_rounded) fp32\n"
            f"    bool dq_accum_only_,  // {NOTE}: skip dQ's postprocess\n"
            f"    std::optional<Tensor> dq_accum_in_  // {NOTE}: the caller's dQ accumulator, zero\n) {{\n",
        ),
        (
            "        dq_accum = torch::stable::new_empty(q, {batch_size, num_heads, seqlen_q_rounded * head_size_rounded}, "
            "std::make_optional(torch::headeronly::ScalarType::Float));\n",
            f"        if (dq_accum_in_.has_value()) {{  // {NOTE}\n"
            "            dq_accum = dq_accum_in_.value();\n"
            "            CHECK_DEVICE(dq_accum); CHECK_CONTIGUOUS(dq_accum);\n"
            "            STD_TORCH_CHECK(dq_accum.scalar_type() == torch::headeronly::ScalarType::Float, "
            '"dq_accum_in must be float32");\n'
            "            CHECK_SHAPE(dq_accum, batch_size, num_heads, seqlen_q_rounded * head_size_rounded);\n"
            "        } else {\n"
            "        dq_accum = torch::stable::new_empty(q, {batch_size, num_heads, seqlen_q_rounded * head_size_rounded}, "
            "std::make_optional(torch::headeronly::ScalarType::Float));\n"
            "        }\n",
        ),
        (
            "        dq_accum = torch::stable::new_empty(q, {num_heads, total_q_padded_rounded * head_size_rounded}, ",
            f'        STD_TORCH_CHECK(!dq_accum_in_.has_value(), "dq_accum_in is for fixed-length batches only");  // {NOTE}\n'
            "        dq_accum = torch::stable::new_empty(q, {num_heads, total_q_padded_rounded * head_size_rounded}, ",
        ),
        (
            "        softmax_d = torch::stable::new_empty(q, {batch_size, num_heads, seqlen_q_rounded}, "
            "std::make_optional(torch::headeronly::ScalarType::Float));\n",
            f"        if (softmax_d_.has_value()) {{  // {NOTE}\n"
            "            softmax_d = softmax_d_.value();\n"
            "            CHECK_DEVICE(softmax_d); CHECK_CONTIGUOUS(softmax_d);\n"
            "            STD_TORCH_CHECK(softmax_d.scalar_type() == torch::headeronly::ScalarType::Float, "
            '"softmax_d must be float32");\n'
            "            CHECK_SHAPE(softmax_d, batch_size, num_heads, seqlen_q_rounded);\n"
            "        } else {\n"
            "        softmax_d = torch::stable::new_empty(q, {batch_size, num_heads, seqlen_q_rounded}, "
            "std::make_optional(torch::headeronly::ScalarType::Float));\n"
            "        }\n",
        ),
        (
            "        softmax_d = torch::stable::new_empty(q, {num_heads, total_q_padded_rounded}, ",
            f'        STD_TORCH_CHECK(!softmax_d_.has_value(), "softmax_d is for fixed-length batches only");  // {NOTE}\n'
            "        softmax_d = torch::stable::new_empty(q, {num_heads, total_q_padded_rounded}, ",
        ),
        (
            "    params.total_q = total_q;\n    params.total_k = total_k;\n"
            "    params.softmax_lse_log2_ptr = softmax_lse_log2.data_ptr();\n",
            "    params.total_q = total_q;\n    params.total_k = total_k;\n"
            "    params.softmax_lse_log2_ptr = softmax_lse_log2.data_ptr();\n"
            f"    params.dpsum_given = softmax_d_.has_value();  // {NOTE}\n"
            f"    params.dq_accum_only = dq_accum_only_;  // {NOTE}\n"
            f"    params.dq_accum_given = dq_accum_in_.has_value();  // {NOTE}\n",
        ),
        (
            "    auto sm_margin = to<int64_t>(stack[21]);\n\n"
            "    auto [softmax_d, softmax_lse_log2, dq_accum, dk_accum, dv_accum] = mha_bwd(",
            "    auto sm_margin = to<int64_t>(stack[21]);\n"
            f"    auto softmax_d_in = to<std::optional<Tensor>>(stack[22]);  // {NOTE}\n"
            f"    auto dq_accum_only_in = to<bool>(stack[23]);  // {NOTE}\n"
            f"    auto dq_accum_in = to<std::optional<Tensor>>(stack[24]);  // {NOTE}\n\n"
            "    auto [softmax_d, softmax_lse_log2, dq_accum, dk_accum, dv_accum] = mha_bwd(",
        ),
        (
            "softcap, deterministic, sm_margin);\n\n    stack[0] = from(softmax_d);\n",
            f"softcap, deterministic, sm_margin, softmax_d_in, dq_accum_only_in, dq_accum_in);  // {NOTE}\n\n"
            "    stack[0] = from(softmax_d);\n",
        ),
        (
            '        "int sm_margin = 0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");\n',
            '        "int sm_margin = 0,"\n'
            '        "Tensor? softmax_d = None,"\n'
            '        "bool dq_accum_only = False,"\n'
            f'        "Tensor(dq_accum_in!)? dq_accum_in = None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");  // {NOTE}\n',
        ),
    ],
}


def main(hopper: str) -> int:
    for name, patches in PATCHES.items():
        if apply(os.path.join(hopper, name), patches, "fa3_dpsum_patch"):
            return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
