from __future__ import annotations

import json

import pytest

from lmcore.config import PRESETS, Config, ConfigError, preset, resolve_layers


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
        ("noequals", "noequals"),
    ],
)
def test_bad_overrides_name_the_field(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        preset("smoke", [bad])


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
