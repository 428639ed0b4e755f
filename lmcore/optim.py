"""Optimizers of SPEC section 4: Muon for the matrices, AdamW for embeddings and control
tensors, the explicit parameter-group builder, and the LR / momentum schedules.

Muon: Nesterov momentum on the gradient, then the update is orthogonalised by 5
Newton-Schulz steps with coefficients (3.4445, -4.7750, 2.0315) in bf16 (on the
Frobenius-normalised update, transposed when rows > cols), scaled by
sqrt(max(1, rows / cols)) and applied with decoupled weight decay
(p <- p * (1 - lr * wd) - lr * update). Matrices of one shape are orthogonalised together
in one batched call. With torch.distributed initialised, every rank keeps the momentum
of all matrices (so optimizer states are identical on all ranks and checkpoints need no
gather) but orthogonalises only every world_size-th matrix; one all-reduce of a flat bf16
buffer then gives every rank all the updates. On CUDA the Newton-Schulz function is
torch.compile'd (on first use); on CPU it runs eagerly.

`build_param_groups(model, train_cfg)` sorts every parameter of a `GPT` into exactly one
of three groups ("muon", "embed", "scalar") and raises naming any parameter that fits no
rule or several; `build_optimizers` turns the groups into an `Optimizers` bundle (AdamW
fused on CUDA only) that the training loop drives with `set_lr_mul` / `set_momentum`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmcore.config import TrainConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)

__all__ = [
    "NS_COEFFS",
    "Muon",
    "Optimizers",
    "ParamGroupError",
    "build_optimizers",
    "build_param_groups",
    "lr_multiplier",
    "muon_momentum",
    "muon_scale",
    "newton_schulz",
]


# ---------------------------------------------------------------------------- Muon


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise G (2-D, or a batch (..., rows, cols)) in bf16.

    X = G / (||G||_F + eps) per matrix, transposed when rows > cols, then `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T. Returns bf16 of G's shape.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def muon_scale(rows: int, cols: int) -> float:
    """The update scale sqrt(max(1, rows / cols))."""
    return max(1.0, rows / cols) ** 0.5


_compiled_ns = None


def _ns_for(device: torch.device):
    """newton_schulz, torch.compile'd on CUDA (once, lazily); eager elsewhere."""
    global _compiled_ns
    if device.type != "cuda":
        return newton_schulz
    if _compiled_ns is None:
        _compiled_ns = torch.compile(newton_schulz)
    return _compiled_ns


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters (SPEC section 4).

    Per group: lr, momentum, ns_steps, nesterov, weight_decay. `process_group` (default:
    the world group when torch.distributed is initialised) shares the orthogonalisation:
    rank r computes matrices r, r + W, r + 2W, ... of each group.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        ns_steps: int = 5,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "ns_steps": ns_steps,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
        self.process_group = process_group

    def _dist(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._dist()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            grads = [p.grad for p in params]
            bufs = []
            for p, g in zip(params, grads):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(g)
                bufs.append(st["momentum_buffer"])
            # momentum on every rank (identical states everywhere), Nesterov look-ahead
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            upd = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else bufs

            sizes = [p.numel() for p in params]
            offsets = [0]
            for n in sizes:
                offsets.append(offsets[-1] + n)
            flat = torch.zeros(offsets[-1], device=params[0].device, dtype=torch.bfloat16)
            # this rank's matrices, batched by shape
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i in range(rank, len(params), world):
                by_shape.setdefault(tuple(params[i].shape), []).append(i)
            ns = _ns_for(params[0].device)
            for (rows, cols), idx in by_shape.items():
                G = torch.stack([upd[i] for i in idx]) if len(idx) > 1 else upd[idx[0]].unsqueeze(0)
                X = ns(G, group["ns_steps"])
                X = X * muon_scale(rows, cols)
                for j, i in enumerate(idx):
                    flat[offsets[i] : offsets[i + 1]].copy_(X[j].reshape(-1))
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            if wd > 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            flat32 = flat.float()  # bf16 -> fp32 is exact
            updates = [u.view_as(p).to(p.dtype) for u, p in zip(flat32.split(sizes), params)]
            torch._foreach_add_(params, updates, alpha=-lr)
        return loss


# ---------------------------------------------------------------------------- groups


class ParamGroupError(ValueError):
    """A parameter fits no optimizer group, or more than one; the message names it."""


# 2-D matrices outside the blocks that Muon trains (by parameter name).
MUON_EXTRA = ("ve_shared.proj.weight", "bigram.proj.weight")


def _matches_control(name: str) -> bool:
    from lmcore.model import CONTROL_PATTERNS

    return any(pat in name for pat in CONTROL_PATTERNS)


def build_param_groups(model: nn.Module, tcfg: TrainConfig) -> dict[str, dict]:
    """Sort every parameter of `model` (a GPT) into exactly one optimizer group.

    Returns {"muon": g, "embed": g, "scalar": g}, each g = {"names": [...], "params":
    [...], "lr": base lr}:
    - muon: 2-D matrices inside the blocks (attention gates included), ve_shared.proj and
      the hashed bigram's proj (lr = matrix_lr);
    - embed: model.embedding_params() (token, bigram and value embeddings; embed_lr);
    - scalar: control tensors (CONTROL_PATTERNS), anything 0/1-D (gains, scales, gate
      biases, ...), skip weights, smear gate, bigram / ve scales (scalar_lr).
    Raises ParamGroupError naming every parameter that fits no group or several.
    """
    embed_ids = {id(p) for p in model.embedding_params()} if hasattr(model, "embedding_params") else set()
    groups = {
        "muon": {"names": [], "params": [], "lr": tcfg.matrix_lr},
        "embed": {"names": [], "params": [], "lr": tcfg.embed_lr},
        "scalar": {"names": [], "params": [], "lr": tcfg.scalar_lr},
    }
    missed: list[str] = []
    multi: list[str] = []
    for name, p in model.named_parameters():
        hits = []
        if id(p) in embed_ids:
            hits.append("embed")
        control = _matches_control(name)
        if p.ndim < 2 or (control and id(p) not in embed_ids):
            hits.append("scalar")
        if (
            p.ndim == 2
            and not control
            and id(p) not in embed_ids
            and (name.startswith("blocks.") or name in MUON_EXTRA)
        ):
            hits.append("muon")
        if not hits:
            missed.append(f"{name} {tuple(p.shape)}")
        elif len(hits) > 1:
            multi.append(f"{name} ({', '.join(hits)})")
        else:
            groups[hits[0]]["names"].append(name)
            groups[hits[0]]["params"].append(p)
    if missed or multi:
        msg = []
        if missed:
            msg.append("parameters in no optimizer group: " + ", ".join(missed))
        if multi:
            msg.append("parameters in several optimizer groups: " + ", ".join(multi))
        raise ParamGroupError("; ".join(msg))
    # every parameter exactly once (tied / shared parameters are listed once by named_parameters)
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert len(seen) == len(set(seen)) == len({id(p) for p in model.parameters()})
    return groups


@dataclass
class Optimizers:
    """The three optimizers of a run, driven together by the training loop."""

    muon: Muon
    adam_embed: torch.optim.AdamW
    adam_scalar: torch.optim.AdamW

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.adam_embed, self.muon, self.adam_scalar]

    def set_lr_mul(self, mul: float) -> None:
        for opt in self.all:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mul

    def set_momentum(self, momentum: float) -> None:
        for g in self.muon.param_groups:
            g["momentum"] = momentum

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "adam_embed": self.adam_embed.state_dict(),
            "muon": self.muon.state_dict(),
            "adam_scalar": self.adam_scalar.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.adam_embed.load_state_dict(state["adam_embed"])
        self.muon.load_state_dict(state["muon"])
        self.adam_scalar.load_state_dict(state["adam_scalar"])


def build_optimizers(model: nn.Module, tcfg: TrainConfig, fused: bool | None = None) -> Optimizers:
    """Muon + two AdamW (betas, eps, adam_wd from `tcfg`) over `build_param_groups`.

    `fused` (default: True when the parameters are on CUDA) selects fused AdamW.
    """
    groups = build_param_groups(model, tcfg)
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    adam_kw: dict = {"betas": (tcfg.beta1, tcfg.beta2), "eps": tcfg.adam_eps, "weight_decay": tcfg.adam_wd}
    if fused:
        adam_kw["fused"] = True

    def adam(g: dict) -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "base_lr": g["lr"]}], **adam_kw)

    muon = Muon(
        [{"params": groups["muon"]["params"], "lr": tcfg.matrix_lr, "base_lr": tcfg.matrix_lr}],
        lr=tcfg.matrix_lr,
        momentum=tcfg.muon_momentum,
        ns_steps=tcfg.muon_ns_steps,
        nesterov=True,
        weight_decay=tcfg.muon_wd,
    )
    return Optimizers(muon=muon, adam_embed=adam(groups["embed"]), adam_scalar=adam(groups["scalar"]))


# ---------------------------------------------------------------------------- schedules


def lr_multiplier(step: int, elapsed_ms: float, tcfg: TrainConfig) -> float:
    """LR multiplier at `step` (SPEC section 4): 1, then a warmdown.

    Without a wallclock cap: linear to 0 over the last `warmdown_iters` of `iterations`.
    With a cap W (ms): remaining_ms / (warmdown_iters * mean_step_ms) once that is < 1,
    with mean_step_ms = elapsed_ms / step and remaining_ms = max(W - elapsed_ms, 0).
    """
    wd = tcfg.warmdown_iters
    if wd <= 0:
        return 1.0
    if tcfg.max_wallclock_seconds <= 0:
        start = max(tcfg.iterations - wd, 0)
        if start <= step < tcfg.iterations:
            return max((tcfg.iterations - step) / wd, 0.0)
        return 1.0
    cap_ms = 1000.0 * tcfg.max_wallclock_seconds
    warmdown_ms = wd * (elapsed_ms / max(step, 1))
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(step: int, tcfg: TrainConfig) -> float:
    """Muon momentum: linear from muon_momentum_start to muon_momentum over the warm-up steps."""
    n = tcfg.muon_momentum_warmup_steps
    frac = min(step / n, 1.0) if n > 0 else 1.0
    return (1.0 - frac) * tcfg.muon_momentum_start + frac * tcfg.muon_momentum
