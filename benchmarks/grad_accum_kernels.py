"""Kernels that summing micro-batch gradients launches (train.foreach_grad_accum), at `record`'s
model with its embeddings in bf16 as training stores them on a GPU: autograd's AccumulateGrad
(an add a parameter) against lmcore.session.Session._accumulate (foreach adds grouped by dtype
and strides). Counts the profiler's CUDA kernels of one accumulation after a first micro-batch;
with --cpu (a check of the script, not of the kernels) the CPU ops instead.

    python benchmarks/grad_accum_kernels.py [--cpu]
"""

from __future__ import annotations

import argparse
import collections
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from lmcore.config import preset
from lmcore.model import GPT
from lmcore.session import Session


def _launched(fn, device: torch.device) -> collections.Counter:
    """The CUDA kernels (on CPU: the aten ops) that fn launches, by name."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    want = "CUDA" if cuda else "CPU"
    return collections.Counter(e.name for e in prof.events() if e.device_type.name == want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU and count aten ops (checks the script)")
    device = torch.device("cpu" if ap.parse_args().cpu else "cuda")
    cfg = preset("record").model
    model = GPT(cfg).to(device)
    model.cast_embeddings(torch.bfloat16)
    params = tuple(p for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, cfg.vocab_size, (1, 256), device=device)

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):  # as training runs the bf16 embeddings
            return model(ids, torch.roll(ids, -1, 1))

    loss().backward()
    plain = _launched(lambda: loss().backward(), device)
    for p in params:
        p.grad = None
    host = SimpleNamespace(params=params, cuda_graphs=False)
    Session._accumulate(host, torch.autograd.grad(loss(), params, allow_unused=True))
    grads = torch.autograd.grad(loss(), params, allow_unused=True)
    foreach = _launched(lambda: Session._accumulate(host, grads), device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (aten ops, not kernels)"
    dtypes = collections.Counter(str(p.dtype) for p in params)
    print(f"{name}, torch {torch.__version__}; {len(params)} parameters {dict(dtypes)}")
    adds = lambda c: sum(n for k, n in c.items() if "CUDAFunctor_add" in k or k == "aten::add_")
    multi = lambda c: sum(n for k, n in c.items() if "multi_tensor_apply" in k or k == "aten::_foreach_add_")
    print("\n| path | launched | of which adds (one a tensor) | foreach (multi-tensor) |\n|---|---|---|---|")
    print(f"| forward + backward, AccumulateGrad | {sum(plain.values())} | {adds(plain)} | {multi(plain)} |")
    print(f"| Session._accumulate alone | {sum(foreach.values())} | {adds(foreach)} | {multi(foreach)} |")


if __name__ == "__main__":
    main()
