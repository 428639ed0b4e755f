"""The artifact (lmcore.pack + the lmcore.artifact container): round trip, accounting, bad files, CLI."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import brotli
import pytest
import torch

from lmcore import pack
from lmcore.artifact import ArtifactError, read_artifact, serialize
from lmcore.cli import main
from lmcore.config import PRESETS, Config
from lmcore.export import code_bytes_of_export, export_script
from lmcore.model import GPT
from lmcore.quant import dequantize
from lmcore.runs import sha256_file
from tests.conftest import randomize_, tiny_model_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config() -> Config:
    smoke = PRESETS["smoke"]
    return replace(
        smoke,
        name="tiny-pack",
        model=tiny_model_cfg(model_dim=64, num_heads=4, num_kv_heads=2, mlp_hidden=128, rope_train_len=32, ve_dim=16),
        quant=replace(smoke.quant, calib_seqs=3, calib_len=24, calib_batch=3, passthrough_max_numel=1024, gptq_block=16),
    ).validate()


def _make_run(
    root: Path, bf16_embeddings: bool = True, wrap: bool = True, cfg: Config | None = None
) -> tuple[Path, Config, dict]:
    cfg = cfg or _tiny_config()
    torch.manual_seed(0)
    model = randomize_(GPT(cfg.model), seed=3, std=0.1)
    if bf16_embeddings:
        model.cast_embeddings(torch.bfloat16)  # as training on CUDA saves them
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = root / "run"
    run.mkdir()
    cfg.save(run / "config.json")
    torch.save({"model": sd, "config": cfg.to_dict()} if wrap else sd, run / "model.pt")
    return run, cfg, sd


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run, cfg, sd = _make_run(tmp_path_factory.mktemp("pack"))
    info = pack.pack_run(run, device="cpu", progress=False)
    torch.set_num_threads(n)
    return run, cfg, sd, info


# ---------------------------------------------------------------------------- round trip


def test_round_trip_exact_weights_and_logits(packed):
    run, cfg, sd, _info = packed
    path = run / pack.ARTIFACT_NAME
    stored, meta = read_artifact(path)
    deq = dequantize(stored, meta["tensors"])  # the dequantized model, in memory
    model, cfg2 = pack.load(path)
    assert cfg2 == cfg
    loaded = model.state_dict()
    assert set(loaded) == set(sd) == set(deq)
    for name, t in deq.items():
        assert loaded[name].dtype == sd[name].dtype == t.dtype, name
        assert torch.equal(loaded[name], t), name
    assert loaded["tok_emb.weight"].dtype == torch.bfloat16
    # the same logits as the dequantized weights loaded into a fresh model in memory
    ref = GPT(cfg.model)
    ref.load_state_dict(deq, assign=True)
    ref.set_attention_backend(model.attention_backend, "cpu")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 20))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 embeddings need autocast
        assert torch.equal(model.eval()(ids), ref.eval()(ids))
    # load_state gives the same tensors
    st, c3 = pack.load_state(path)
    assert c3 == cfg and all(torch.equal(st[k], deq[k]) for k in deq)
    # quantization changed the int6/int8 tensors but kept their shapes
    kinds = {n: e["kind"] for n, e in meta["tensors"].items()}
    assert {"int6", "int8", "fp16"} <= set(kinds.values())
    w = "blocks.0.mlp.fc.weight"
    assert kinds[w] == "int6" and not torch.equal(deq[w], sd[w])


def test_pack_json_accounting(packed):
    run, _cfg, _sd, info = packed
    path = run / pack.ARTIFACT_NAME
    on_disk = json.loads((run / pack.PACK_JSON).read_text())
    assert on_disk["sha256"] == info["sha256"] == sha256_file(path)
    assert on_disk["model_bytes"] == path.stat().st_size
    # code bytes: the exported single-file train_gpt.py for this config, nothing else
    script = export_script(Config.load(run / "config.json"))
    assert on_disk["code_bytes"] == len(script.encode("utf-8")) == code_bytes_of_export(_cfg)
    assert "train_gpt.py" in on_disk["code_bytes_definition"] and "code" not in on_disk
    assert on_disk["total_bytes"] == on_disk["model_bytes"] + on_disk["code_bytes"]
    assert on_disk["limit_bytes"] == 16_000_000 and on_disk["fits"] is True
    for k in ("calibration", "hessians", "quantize", "serialize", "compress", "write"):
        assert on_disk["timings_s"][k] >= 0
    assert on_disk["calibration"]["mode"] == "eager"
    assert on_disk["calibration_time_s"] == on_disk["timings_s"]["calibration"] > 0
    assert "reads no training data" in on_disk["calibration_budget"]
    assert on_disk["attention"] == {"requested": "math", "used": "math", "fallback": None}
    errs = on_disk["errors"]
    assert {"int6.attn", "int6.mlp", "int8", "fp16"} <= set(errs)
    assert 0 < errs["int6.mlp"]["hessian_rel_err"] < 1
    assert on_disk["tensor_kinds"]["int6"] == 4 * 6


def test_pack_is_deterministic_and_accepts_plain_state_dict(tmp_path, packed):
    run2, _cfg, _sd = _make_run(tmp_path, wrap=False)
    info2 = pack.pack_run(run2, device="cpu", progress=False)
    assert info2["sha256"] == packed[3]["sha256"]  # same weights, same bytes


def test_container_round_trip_all_dtypes():
    from lmcore.artifact import compress, decompress, deserialize

    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).half(),
        "c": torch.randn(2, 2).bfloat16(),
        "d": torch.randint(-31, 32, (6, 7), dtype=torch.int8),
        "e": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "f": torch.arange(4),
        "g": torch.tensor(1.5),
    }
    payload = serialize(tensors, {"x": 1})
    blob = compress(payload, chunk_size=64)  # many chunks
    back, meta = deserialize(decompress(blob))
    assert meta == {"x": 1}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


# ---------------------------------------------------------------------------- bad files


def _bad_files(good: bytes) -> dict[str, bytes]:
    mid = bytearray(good)
    mid[len(mid) // 2] ^= 0x40
    head = bytearray(good)
    head[20] ^= 0x01  # inside the stored sha256 / sizes
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("model.pt", b"0" * 100)
    g = torch.Generator().manual_seed(0)
    return {
        "flipped_byte": bytes(mid),
        "flipped_header": bytes(head),
        "truncated": good[: len(good) - 100],
        "truncated_header": good[:30],
        "trailing": good + b"\x00",
        "empty": b"",
        "random": bytes(torch.randint(0, 256, (5000,), generator=g, dtype=torch.uint8).tolist()),
        "zip": zbuf.getvalue(),
        "plain_brotli": brotli.compress(b"not an lmcore artifact" * 10),
    }


def test_bad_artifacts_raise_naming_the_file(packed, tmp_path):
    good = (packed[0] / pack.ARTIFACT_NAME).read_bytes()
    for what, data in _bad_files(good).items():
        p = tmp_path / f"{what}.ptz"
        p.write_bytes(data)
        with pytest.raises(ArtifactError) as ei:
            pack.load(p)
        assert str(p) in str(ei.value), (what, str(ei.value))
    with pytest.raises(ArtifactError, match="not found"):
        pack.load(tmp_path / "missing.ptz")


def test_valid_container_with_inconsistent_meta_is_rejected(packed, tmp_path):
    from lmcore.artifact import compress

    stored, meta = read_artifact(packed[0] / pack.ARTIFACT_NAME)
    del stored["blocks.0.mlp.fc.weight.su8"]
    p = tmp_path / "missing_part.ptz"
    p.write_bytes(compress(serialize(stored, meta)))
    with pytest.raises(ArtifactError, match="su8"):
        pack.load(p)
    p2 = tmp_path / "foreign_meta.ptz"
    p2.write_bytes(compress(serialize({"x": torch.zeros(2)}, {"format": "something else"})))
    with pytest.raises(ArtifactError, match="meta"):
        pack.load(p2)


# ---------------------------------------------------------------------------- CLI


def test_cli_verify_good_and_bad(packed, tmp_path, capsys):
    path = packed[0] / pack.ARTIFACT_NAME
    assert main(["pack", "--verify", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["sha256"] == packed[3]["sha256"] and out["config_name"] == "tiny-pack"
    bad = tmp_path / "bad.ptz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert main(["pack", "--verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "error" in err


def test_cli_pack_run(tmp_path, capsys):
    run, cfg, _sd = _make_run(tmp_path)
    rc = main(["pack", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--set", "quant.calib_seqs=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model bytes" in out and "fits" in out
    info = json.loads((run / pack.PACK_JSON).read_text())
    _, cfg2 = pack.load(run / pack.ARTIFACT_NAME)
    assert cfg2.quant.calib_seqs == 2 and info["calibration"]["seqs"] == 2
    # a run folder without weights: exit 2 with a message
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.save(empty / "config.json")
    assert main(["pack", "--run-dir", str(empty), "--device", "cpu", "--no-progress"]) == 2
    assert "model.pt" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcore pack: error:"), err
    return lines[0]


def test_cli_pack_foreign_weights_name_the_file(tmp_path, capsys):
    """A model.pt of another model, or not a torch file at all: one line naming R/model.pt,
    exit 2, and no artifact or pack.json written."""
    run, cfg, _sd = _make_run(tmp_path)
    weights = run / "model.pt"
    other = GPT(replace(cfg.model, num_layers=2, model_dim=32, mlp_hidden=64, ve_layers="1"))
    torch.save(other.state_dict(), weights)
    args = ["pack", "--run-dir", str(run), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{weights}: weights do not match the config's model" in line and "missing" in line, line
    weights.write_text("not a torch file\n")
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{weights}: cannot read the model file" in line, line
    assert not (run / pack.ARTIFACT_NAME).exists() and not (run / pack.PACK_JSON).exists()


def test_pack_on_cpu_reports_the_attention_fallback(tmp_path, capsys):
    """A config asking for fa3 packs on CPU with another backend and says so (log and pack.json)."""
    cfg = _tiny_config()
    cfg = replace(cfg, model=replace(cfg.model, attention="fa3"))
    run, _cfg, _sd = _make_run(tmp_path, cfg=cfg)
    info = pack.pack_run(run, device="cpu", progress=True)
    err = capsys.readouterr().err
    att = json.loads((run / pack.PACK_JSON).read_text())["attention"]
    assert att == info["attention"]
    assert att["requested"] == "fa3" and att["used"] not in (None, "fa3")
    assert "'fa3' is not available on cpu" in att["fallback"], att
    assert f"attention: fa3 cannot run here, using {att['used']}" in err, err
    # insisting on fa3 when loading is bad input naming the backend, not a silent fallback
    with pytest.raises(ArtifactError, match="fa3"):
        pack.load(run / pack.ARTIFACT_NAME, attention="fa3")
    info2: dict = {}
    model, _ = pack.load(run / pack.ARTIFACT_NAME, info=info2)
    assert info2["attention"] == att and model.attention_backend == att["used"]


def test_cli_pack_bad_calibration_setting_is_one_line(tmp_path, capsys):
    run, _cfg, _sd = _make_run(tmp_path)
    args = ["pack", "--run-dir", str(run), "--device", "cpu", "--no-progress", "--set", "quant.calib_seqs=0"]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "quant.calib_seqs=0" in line, line
    assert not (run / pack.ARTIFACT_NAME).exists() and not (run / pack.PACK_JSON).exists()
