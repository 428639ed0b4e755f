"""The exponential moving average (EMA) of a model's weights that training keeps (SPEC
section 4 and 7): fp32 shadows of every state_dict tensor, updated with foreach ops after
each optimizer step, in the seed's "original" mode or "bias_corrected"; either mode's
average of the same run can be derived from the other (`EMA.weights(mode)`), and the state
goes into checkpoints (`state_dict` / `load_state_dict`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """fp32 exponential moving average of every tensor of a model's state_dict.

    mode "original": the shadow starts at the current (initial) weights, as the seed;
    "bias_corrected": the shadow starts at zero and `weights()` divides by
    1 - decay^steps, so the initial weights carry no weight. The initial weights are kept
    (fp32, on the CPU) so that `weights(other_mode)` gives the other mode's average of
    the same run exactly: original = zero-started + decay^n * w0. Updates use foreach ops.
    """

    MODES = ("original", "bias_corrected")

    def __init__(self, model: nn.Module, decay: float, mode: str = "original"):
        if mode not in self.MODES:
            raise ValueError(f"EMA mode {mode!r}: expected one of {', '.join(self.MODES)}")
        self.decay, self.mode = float(decay), mode
        sd = model.state_dict()
        self.names = list(sd.keys())
        self._src = list(sd.values())  # alias the model's storage (updated in place)
        self.init = [t.detach().to("cpu", torch.float32, copy=True) for t in self._src]
        if mode == "original":
            self.shadow = [t.detach().float().clone() for t in self._src]
        else:
            self.shadow = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in self._src]
        self.steps = 0
        self._f32 = [i for i, t in enumerate(self._src) if t.dtype == torch.float32]
        self._other = [i for i, t in enumerate(self._src) if t.dtype != torch.float32]

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        sh = self.shadow
        dst = [sh[i] for i in self._f32]
        if dst:
            torch._foreach_mul_(dst, d)
            torch._foreach_add_(dst, [self._src[i] for i in self._f32], alpha=1.0 - d)
        for i in self._other:
            sh[i].mul_(d).add_(self._src[i].float(), alpha=1.0 - d)
        self.steps += 1

    @torch.no_grad()
    def weights(self, mode: str | None = None) -> dict[str, Tensor]:
        """The averaged weights (fp32) of `mode` (default: this EMA's own mode)."""
        mode = mode or self.mode
        if mode not in self.MODES:
            raise ValueError(f"EMA mode {mode!r}: expected one of {', '.join(self.MODES)}")
        dn = self.decay**self.steps
        out = {}
        for n, s, w0 in zip(self.names, self.shadow, self.init):
            if mode == self.mode == "original":
                out[n] = s.clone()
            elif mode == "original":  # zero-started shadow + the initial weights' share
                out[n] = s + dn * w0.to(s.device)
            elif self.steps == 0:  # bias corrected, nothing averaged yet: the initial weights
                out[n] = w0.to(s.device).clone()
            elif self.mode == "bias_corrected":
                out[n] = s / (1.0 - dn)
            else:  # from the original shadow: remove the initial weights' share
                out[n] = (s - dn * w0.to(s.device)) / (1.0 - dn)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "decay": self.decay,
            "steps": self.steps,
            "shadow": {n: s.detach().cpu() for n, s in zip(self.names, self.shadow)},
            "init": dict(zip(self.names, self.init)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"EMA state has mode {state['mode']!r}, this run uses {self.mode!r}")
        if set(state["shadow"]) != set(self.names):
            raise ValueError("EMA state does not match the model's tensors")
        for n, s, w0 in zip(self.names, self.shadow, self.init):
            s.copy_(state["shadow"][n])
            w0.copy_(state["init"][n])
        self.steps = int(state["steps"])
