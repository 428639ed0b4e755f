"""`lmcore info`: parameter counts (total and per component), the attention backends
available on this machine, and the resolved configuration, as JSON."""

from __future__ import annotations

import argparse
import json

import torch

from lmcore.config import PRESETS, Config, preset


def describe(cfg: Config, device: str = "cpu") -> dict:
    from lmcore.attention import available_backends
    from lmcore.model import GPT, param_counts

    with torch.device("meta"):
        model = GPT(cfg.model)
    return {
        "preset": cfg.name,
        "params": param_counts(model),
        "attention_backends": available_backends(torch.device(device)),
        "config": cfg.to_dict(),
    }


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "smoke") -> None:
    """--preset / --config / --set, shared by every command that takes a config."""
    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS), help="configuration preset")
    p.add_argument("--config", default=None, help="a config.json to start from instead of a preset")
    add_overrides_arg(p)


def add_overrides_arg(p: argparse.ArgumentParser, example: str = "train.iterations=100") -> None:
    """--set SECTION.FIELD=VALUE (repeatable) into args.overrides."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override one config field, e.g. --set {example} (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    if getattr(args, "config", None):
        return Config.load(args.config).override(args.overrides)
    return preset(args.preset, args.overrides)


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(describe(cfg, dev), indent=2))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, attention backends and the config, as JSON")
    add_config_args(p, default_preset="record")
    p.set_defaults(func=_cmd_info)
