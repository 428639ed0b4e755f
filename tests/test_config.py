from __future__ import annotations

import json
import re
import subprocess
from dataclasses import fields, replace
from pathlib import Path

import pytest

from lmcore.config import PRESETS, Config, ConfigError, preset, resolve_layers
from lmcore.train import train
from tests.conftest import train_losses


def test_presets_validate_and_roundtrip(tmp_path):
    for name, cfg in PRESETS.items():
        cfg.validate()
        p = tmp_path / f"{name}.json"
        cfg.save(p)
        assert Config.load(p) == cfg


def test_proxy1_differs_from_record_only_where_stated():
    rec, px = PRESETS["record"], PRESETS["proxy1"]
    assert px.model == rec.model and px.quant == rec.quant and px.eval == rec.eval
    assert (px.train.batch_tokens, px.train.iterations, px.train.warmdown_iters) == (196_608, 1000, 400)
    assert px.train.max_wallclock_seconds == 0
    assert px.train.grad_accum == 8 and px.data.seq_len == 2048


def _lever_sets() -> dict[str, list[str]]:
    """benchmarks/lever_sets.sh's sets, in its export line's order: {name: overrides}."""
    sets = Path(__file__).resolve().parents[1] / "benchmarks" / "lever_sets.sh"
    script = f'source "{sets}"; for n in $(sed -n "s/^export //p" "{sets}"); do printf "%s %s\\n" "$n" "${{!n}}"; done'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


def _record_fast_switches() -> list[str]:
    """record_fast's train fields that differ from record's, as overrides."""
    rec, fast = PRESETS["record"].train, PRESETS["record_fast"].train
    return [f"train.{f.name}={str(getattr(fast, f.name)).lower()}" for f in fields(rec)
            if getattr(rec, f.name) != getattr(fast, f.name)]


def test_record_fast_is_record_with_the_lever_set_benchmarks_name_preset():
    # the set speed.sh measures as PRESET (benchmarks/lever_sets.sh) is this preset, and nothing else differs
    out = _lever_sets()["PRESET"]
    rec, fast = PRESETS["record"], PRESETS["record_fast"]
    assert fast == replace(preset("record", out), name="record_fast")
    assert sorted(_record_fast_switches()) == sorted(out) and len(out) == 13
    assert not {"train.fa3_xsa_rowsum=true", "train.fa3_dq_accum=true"} & set(out)  # need lmcore's own FA3 build
    assert (fast.model, fast.data, fast.quant, fast.eval) == (rec.model, rec.data, rec.quant, rec.eval)


def test_every_lever_set_benchmarks_name_is_a_valid_record_config():
    # speed.sh's LEVERS / VARIANTS take these sets: one the config refuses would end a device call's run at its start
    sets = _lever_sets()
    assert list(sets) == ["QF", "FAST", "DQ", "VNORM", "GATE", "PRESET", "MIXT", "CD", "SIGN", "ZERO", "QUARTER",
                          "MIX", "EMB", "COMBO", "SMALL"]
    for out in sets.values():
        cfg = preset("record", out)  # raises ConfigError on a refused combination
        assert out and all(o.startswith("train.") and "=" in o for o in out)
        assert cfg.train.fused_mlp and cfg.train.fused_mlp_pingpong
    assert preset("record", sets["SIGN"]).train.fused_mlp_sign  # the sign path on the ping-pong kernel
    assert preset("record", sets["ZERO"]).train.mlp_zeroes_dq_accum  # the MLP's backward zeroes FA3's accumulator
    assert preset("record", sets["QUARTER"]).train.fused_mlp_quarter_tiles  # the ping-pong forward by quarter tiles
    assert preset("record", sets["MIX"]).train.fused_resid_mix  # the mix op (needs fold_attn_norm, in CD)
    assert preset("record", sets["EMB"]).train.fused_embed  # the input stage's op
    assert preset("record", sets["COMBO"]).train.inductor_combo_kernels  # inductor's combo kernels on CD
    small = preset("record", sets["SMALL"]).train  # EMB's and QUARTER's levers together on CD
    assert small.fused_embed and small.fused_mlp_quarter_tiles and small.inductor_coordinate_descent


def test_record_fast_switches_train_tiny_as_records_defaults(tmp_path):
    # on CPU every switch runs its PyTorch math: 3 steps of `tiny` with all 13 on give the losses of all off
    on = _record_fast_switches()
    base = ["train.iterations=3", "train.log_every=1"]
    train(preset("tiny", base), tmp_path / "plain", progress=False)
    train(preset("tiny", [*base, *on]), tmp_path / "fast", progress=False)
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "fast")
    assert len(on) == 13 and len(a) == 3 and b == pytest.approx(a, abs=1e-4)
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["train"]["fused_qkv_gate"] is True


def test_overrides_parse_by_type():
    cfg = preset("smoke", ["train.iterations=7", "model.bos_mask=true", "train.matrix_lr=0.01",
                           "model.gated_attn_layers=0,2", "model.xsa_layers=none", "model.bigram=hashed"])
    assert cfg.train.iterations == 7 and cfg.model.bos_mask is True
    assert cfg.train.matrix_lr == 0.01
    assert cfg.model.gated_attn_layers == [0, 2] and cfg.model.xsa_layers == "none"
    assert cfg.model.bigram == "hashed"


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("train.nope=1", "train.nope"),
        ("nosection.x=1", "nosection"),
        ("train.iterations=abc", "train.iterations"),
        ("model.bos_mask=maybe", "model.bos_mask"),
        ("model.bigram=trigram", "model.bigram"),
        ("model.gated_attn_layers=0,99", "gated_attn_layers"),
        ("train.fused_mlp_descriptors=gpu", "train.fused_mlp_descriptors='gpu'"),
        ("train.fused_mlp_sign=true", "needs train.fused_mlp=true"),
        ("train.fused_mlp_pingpong=true", "needs train.fused_mlp=true"),
        ("train.fused_mlp=true train.fused_mlp_quarter_tiles=true", "needs train.fused_mlp_pingpong=true and "
         "train.fused_mlp_sign=false"),
        ("train.fused_mlp=true train.fused_mlp_pingpong=true train.fused_mlp_sign=true "
         "train.fused_mlp_quarter_tiles=true", "train.fused_mlp_quarter_tiles=true needs"),
        ("train.fused_qkv=true train.fused_qkv_repeat_v=true", "needs train.fused_qkv=true and train.expand_kv=true"),
        ("train.fused_mlp=true train.fused_mlp_sign=true model.mlp_hidden=100", "model.mlp_hidden a multiple of 32, not 100"),
        ("noequals", "noequals"),
    ],
)
def test_bad_overrides_name_the_field(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        preset("smoke", bad.split())


def test_bad_config_file_names_file_and_field(tmp_path):
    p = tmp_path / "c.json"
    d = PRESETS["smoke"].to_dict()
    d["train"]["bogus"] = 1
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"c\.json.*train\.bogus"):
        Config.load(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=r"c\.json"):
        Config.load(p)


def test_resolve_layers():
    assert resolve_layers("even", 11) == [0, 2, 4, 6, 8, 10]
    assert resolve_layers("odd", 5) == [1, 3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("none", 3) == []
    assert resolve_layers("last:2", 5) == [3, 4]
    assert resolve_layers([4, 1], 5) == [1, 4]
    with pytest.raises(ConfigError):
        resolve_layers("5", 5)


def test_every_preset_trains_without_qat():
    """The original's late QAT never runs (SPEC 3): no preset switches lmcore's own QAT on."""
    for name, cfg in PRESETS.items():
        assert cfg.train.lmcore_late_qat_threshold == 0.0, name
    assert preset("record", ["train.lmcore_late_qat_threshold=0.15"]).train.lmcore_late_qat_threshold == 0.15


def test_renamed_qat_field_says_where_it_went(tmp_path):
    with pytest.raises(ConfigError, match="renamed train.lmcore_late_qat_threshold"):
        preset("record", ["train.late_qat_threshold=0.15"])
    d = PRESETS["record"].to_dict()
    d["train"]["late_qat_threshold"] = 0.15
    del d["train"]["lmcore_late_qat_threshold"]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"old\.json: unknown field train\.late_qat_threshold \(renamed"):
        Config.load(p)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("train.grad_accum=0", "train.grad_accum=0 must be positive"),
        ("train.batch_tokens=0", "train.batch_tokens=0 must be positive"),
        ("train.iterations=0", "train.iterations=0 must be positive"),
        ("train.iterations=-5", "train.iterations=-5 must be positive"),
        ("train.matrix_lr=nan", "train.matrix_lr=nan must be a finite number"),
        ("train.embed_lr=inf", "train.embed_lr=inf must be a finite number"),
        ("train.warmdown_iters=-1", "train.warmdown_iters=-1 must be >= 0"),
        ("eval.stride=0", "eval.stride=0 must be positive"),
    ],
)
def test_degenerate_values_are_refused(bad, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        preset("smoke", [bad])


def test_tiny_preset_is_smoke_made_tiny():
    from lmcore.config import SMOKE, is_smoke_config

    tiny = preset("tiny")
    assert tiny.model == SMOKE.model and tiny.data.data_dir == SMOKE.data.data_dir and is_smoke_config(tiny)
    assert (tiny.train.iterations, tiny.train.batch_tokens, tiny.train.grad_accum, tiny.train.ema) == (10, 2048, 1, "off")
    assert tiny.data.val_max_tokens == 2048 and tiny.eval.ttt_chunk_tokens == 512
    assert not is_smoke_config(preset("tiny", ["data.data_dir=data/proxy"])) and not is_smoke_config(preset("record"))
