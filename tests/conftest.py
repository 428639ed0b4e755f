"""Shared test fixtures: tiny configs and the location of ../shared (tests skip without it)."""

from __future__ import annotations

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
