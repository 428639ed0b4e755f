"""train.fused_resid_mix against the plain path on one GPU: the largest gradient difference of each parameter
(relative to its largest gradient), eager and compiled, with the op's Triton kernel and with its PyTorch math,
in bf16 autocast on a 512-wide tiny model (as tests/test_resid_mix.py's cuda test). Prints a table.

    python3 benchmarks/resid_mix_check.py
"""

from __future__ import annotations

import torch

import lmcore.mix_kernel as MK
from tests.conftest import loss_and_grads, next_token_batch
from tests.test_resid_mix import _folded


def run(compiled: bool, fused: bool, triton: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _folded("cuda", std=0.05, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16)
    if fused:
        model.use_fused_resid_mix()
    ids, tgt = next_token_batch(model.cfg.vocab_size, (4, 128), "cuda")
    MK._use_triton = (lambda x: x.is_cuda) if triton else (lambda x: False)
    torch._dynamo.reset()
    fwd = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, ids, tgt, forward=fwd)
    return loss.item(), grads


def main() -> None:
    base = {c: run(c, False, False) for c in (False, True)}
    print("| run | loss | worst parameter | max abs diff / max abs grad | median over parameters |")
    print("|---|---|---|---|---|")
    for compiled, fused, triton in [(False, False, False), (True, False, False), (False, True, False),
                                    (False, True, True), (True, True, False), (True, True, True)]:
        loss, grads = run(compiled, fused, triton)
        ref_loss, ref = base[compiled] if fused else base[False]
        rel = {n: ((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n in ref}
        worst = max(rel, key=rel.get)
        med = sorted(rel.values())[len(rel) // 2]
        name = f"{'compiled' if compiled else 'eager'} {'fused' if fused else 'plain'}{' triton' if triton else ''}"
        print(f"| {name} vs {'same mode plain' if fused else 'eager plain'} | {loss:.5f} ({ref_loss:.5f}) | {worst} "
              f"| {rel[worst]:.3e} | {med:.3e} |")


if __name__ == "__main__":
    main()
