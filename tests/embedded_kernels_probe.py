"""Run by tests/test_kernels.py in a fresh process, outside lmcore:

    python tests/embedded_kernels_probe.py PATH/train_gpt.py [--cuda]

imports lmcore.kernels and lmcore.xsa_kernel from the exported script's SOURCES (its importer first on sys.meta_path)
and prints one JSON line: the modules' files, whether the script embeds them, whether triton
imported. With --cuda it also runs both fused ops forward and backward on CUDA (where Triton
serves them: the JIT reads the kernels' source through the script's importer) and on CPU (the
PyTorch math), and adds the largest differences of outputs and gradients; where the script embeds
lmcore.mlp_kernel, its Triton GEMMs against its PyTorch math on CUDA too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _run(op, inputs, device):
    """op(*inputs) on `device` in fp32 with a fixed output gradient: (output, input gradients)."""
    import torch

    xs = [None if x is None else x.to(device).requires_grad_() for x in inputs]
    out = op(*xs)
    out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
    return [out.detach().cpu()] + [x.grad.cpu() for x in xs if x is not None]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def cuda_checks(kernels, xsa) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    b, t, h, hkv, d, half = 2, 64, 8, 4, 64, 8
    angle = torch.rand(t, half, generator=g) * 6.0
    x, gain = torch.randn(b, t, h, d, generator=g), torch.rand(h, generator=g) + 0.5
    y, v, z = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, hkv, d, generator=g), torch.randn(b, t, h, generator=g)
    cos, sin = angle.cos(), angle.sin()
    qk = lambda x_, gain_: kernels.qk_norm_rope(x_, cos.to(x_.device), sin.to(x_.device), gain_)
    return {
        "qk_triton": kernels._use_triton(x.cuda(), half),
        "xsa_triton": xsa._xsa_use_triton(y.cuda(), v.cuda()),
        "qk_max_diff": _max_diff(_run(qk, [x, gain], "cuda"), _run(qk, [x, gain], "cpu")),
        "xsa_max_diff": _max_diff(_run(xsa.xsa_gate, [y, v, z], "cuda"), _run(xsa.xsa_gate, [y, v, z], "cpu")),
    }


def mlp_checks(mk) -> dict:
    """lmcore.mlp_kernel's Triton GEMMs (forward and backward, at its default tiles) on CUDA bf16
    against its PyTorch math on the same inputs."""
    import torch

    g = torch.Generator().manual_seed(1)
    m, d, hidden = 1024, 512, 1536
    x, dy = (torch.randn(m, d, generator=g).cuda().bfloat16() for _ in range(2))
    wf = (torch.randn(hidden, d, generator=g) * d**-0.5).cuda().bfloat16()
    wp = (torch.randn(d, hidden, generator=g) * hidden**-0.5).cuda().bfloat16()
    pre, post = mk._fc_triton(x, wf, 0.5)
    ref_pre, _ = mk._fc_math(x, wf, 0.5)
    dpre, ref_dpre = mk._dpre_triton(dy, wp, ref_pre, 0.5).float(), mk._dpre_math(dy, wp, ref_pre, 0.5).float()
    return {
        "mlp_triton": mk._use_triton(x, hidden),
        "mlp_tiles": [list(mk._tile(x, hidden, forward=f)) for f in (True, False)],
        "mlp_pre_max_diff": float((pre.float() - ref_pre.float()).abs().max()),
        "mlp_post_is_act_of_pre": bool(torch.equal(post, mk._act(pre, 0.5))),
        "mlp_dpre_rel_err": float((dpre - ref_dpre).norm() / ref_dpre.norm()),
    }


def main(argv: list[str]) -> int:
    script = Path(argv[0]).resolve()
    sys.path.insert(0, str(script.parent))
    import train_gpt

    finder = train_gpt.install(vars(train_gpt))
    from lmcore import kernels, xsa_kernel

    out = {"file": kernels.__file__, "xsa_file": xsa_kernel.__file__, "triton": kernels.triton is not None,
           "embedded": all(f"lmcore/{m}.py" in finder.sources for m in ("kernels", "xsa_kernel"))}
    if "--cuda" in argv:
        out.update(cuda_checks(kernels, xsa_kernel))
        if "lmcore/mlp_kernel.py" in finder.sources:
            from lmcore import mlp_kernel

            out["mlp_file"] = mlp_kernel.__file__
            out.update(mlp_checks(mlp_kernel))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
