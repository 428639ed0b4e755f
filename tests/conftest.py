"""Shared test fixtures: tiny configs, the location of ../shared (tests skip without it), and
helpers: a model's loss and gradients, a run's logged training losses."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmcore.config import SMOKE, ModelConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_model_cfg(**kw) -> ModelConfig:
    base = replace(
        SMOKE.model,
        vocab_size=64,
        num_layers=4,
        model_dim=32,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=48,
        rope_dims=4,
        rope_train_len=8,
        ve_layers="1,3",
        ve_dim=8,
        attention="math",
    )
    return replace(base, **kw)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Give every parameter (zero-inited projections included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def next_token_batch(vocab: int, shape: tuple[int, int] = (2, 16), device: str = "cpu", seed: int = 1):
    """(ids, targets): random token ids and the next token of each (the ids rolled by one)."""
    ids = torch.randint(0, vocab, shape, device=device, generator=torch.Generator(device=device).manual_seed(seed))
    return ids, torch.roll(ids, -1, 1)


def loss_and_grads(model, ids, tgt, forward=None):
    """(loss, {name: grad}) of one forward (through `forward`, e.g. the compiled model, or the
    model itself) and backward, the model's gradients zeroed first."""
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(ids, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(loss, grads, plain_loss, plain_grads, loss_abs: float, rtol: float, atol: float):
    """loss within loss_abs of plain_loss, the same parameters with gradients, and each gradient
    close to the plain one (rtol, atol; the parameter named on failure)."""
    assert loss.item() == pytest.approx(plain_loss.item(), abs=loss_abs) and grads.keys() == plain_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=rtol, atol=atol, msg=n)


def compiled_without_and_with(model, ids, tgt, switch_on, bf16: bool = True):
    """[(loss, grads) without, (loss, grads) with]: the model compiled by inductor (fullgraph, static
    shapes, as training compiles it) before and after `switch_on()`, under bf16 autocast if bf16."""
    results = []
    for on in (False, True):
        if on:
            switch_on()
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            results.append(loss_and_grads(model, ids, tgt, forward=compiled))
    return results


def compiled_loss(model, ids, tgt) -> float:
    """The model's loss compiled whole (fullgraph, static shapes, aot_eager) after a dynamo reset:
    the fused ops and folded paths as torch.compile traces them."""
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(ids, tgt).item()


def script_env(keep_pythonpath: bool = False) -> dict[str, str]:
    """The environment an exported train_gpt.py runs in, in tests: one thread, no user site, no
    torchrun variables and no PYTHONPATH unless kept (on the GPU machines brotli is only on it)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK") + (() if keep_pythonpath else ("PYTHONPATH",))
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


def train_losses(run: Path) -> list[float]:
    """The training losses a run folder's metrics.jsonl logged, in order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["train_loss"] for r in lines if r.get("kind") == "train"]


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
