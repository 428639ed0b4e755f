"""Whether two FA3 builds compute the same attention: run the build on the path at `record`'s micro-batch
(48 x 2,048 tokens, 8 heads after train.expand_kv, head dim 64, causal, seeded inputs) and save its forward's
output and LSE and its backward's dq, dk and dv (--save), or compare them with a file saved by another build
(--compare): max |difference| of each, and whether it is bit for bit. dq is summed by atomic adds in FA3's
backward, so run to run it may differ in its last bits; dk, dv, the output and the LSE are written once.

usage: python benchmarks/fa3_digest.py (--save PATH | --compare PATH) [--seqs 48]
GPU only (sm_90), with flash_attn_interface importable.
"""

from __future__ import annotations

import argparse

import torch

NAMES = ("out", "lse", "dq", "dk", "dv")


def attention_outputs(seqs: int, seq: int = 2048, heads: int = 8, dim: int = 64) -> dict[str, torch.Tensor]:
    from flash_attn_interface import flash_attn_func

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(seqs, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    o, lse = out[0], out[1]
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return dict(zip(NAMES, (o.detach(), lse.detach(), dq, dk, dv)))


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, tuple[float, bool]]:
    """name -> (max |a - b| in fp32, bit for bit equal) over NAMES."""
    return {n: ((a[n].float() - b[n].float()).abs().max().item(), torch.equal(a[n], b[n])) for n in NAMES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save")
    group.add_argument("--compare")
    ap.add_argument("--seqs", type=int, default=48)
    args = ap.parse_args()
    import flash_attn_interface

    outs = attention_outputs(args.seqs)
    print(f"# FA3 at {flash_attn_interface.__file__}, {args.seqs} x 2048 tokens")
    if args.save:
        torch.save({n: t.cpu() for n, t in outs.items()}, args.save)
        print(f"saved {', '.join(NAMES)} to {args.save}")
        return 0
    ref = {n: t.cuda() for n, t in torch.load(args.compare).items()}
    for n, (diff, same) in differences(ref, outs).items():
        print(f"{n}: max |diff| {diff:.3g}, {'bit for bit' if same else 'differs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
