"""The exported train_gpt.py's make-up (lmcore.export, lmcore.bootstrap, lmcore.runlog), without
training: what the script holds, the in-memory importer, the import graph, the log format.
(The script run end to end, reproducing an lmcore run: tests/test_submission.py.)"""

from __future__ import annotations

import ast
import base64
import importlib
import json
import sys
import traceback
from pathlib import Path

import brotli
import pytest

import lmcore
from lmcore import artifact, gptq, quant
from lmcore.bootstrap import EmbeddedPackage
from lmcore.config import Config, preset
from lmcore.export import SCRIPT_HEAD, export_script, minify_source, needed_modules
from lmcore.runlog import format_log, parse_log

PKG = Path(lmcore.__file__).resolve().parent


def _literal(tree: ast.Module, name: str) -> str:
    (node,) = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name]
    assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    return node.value.value


def test_script_is_a_docstring_two_literals_and_the_bootstrap():
    """Every line of code in train_gpt.py is lmcore/bootstrap.py (minified); the rest is data:
    the config, readable, and the embedded modules, each exactly its minified lmcore file."""
    cfg = preset("record")
    script = export_script(cfg)
    assert script.startswith(SCRIPT_HEAD)
    tree = ast.parse(script)
    assert ast.get_docstring(tree).startswith("train_gpt.py: a parameter-golf submission")
    assert [type(n) for n in tree.body[1:3]] == [ast.Assign, ast.Assign]
    boot = ast.parse(minify_source((PKG / "bootstrap.py").read_text(encoding="utf-8")))
    assert ast.dump(ast.Module(body=tree.body[3:], type_ignores=[])) == ast.dump(boot)
    assert Config.from_dict(json.loads(_literal(tree, "CONFIG_JSON"))) == cfg.validate()
    sources = json.loads(brotli.decompress(base64.b85decode(_literal(tree, "SOURCES"))))
    mods = needed_modules(cfg)
    assert set(sources) == {"lmcore/__init__.py"} | {f"lmcore/{m}.py" for m in mods}
    for key, src in sources.items():
        assert src == minify_source((PKG.parent / key).read_text(encoding="utf-8")), key
    assert {"entry", "runlog", "train", "pack", "evaluate", "quant", "gptq", "artifact"} <= set(mods)
    assert not {"bootstrap", "export", "submission", "compliance"} & set(mods)
    # the plain (uncompressed) part is the docstring, the config and the importer: small
    plain = len(script) - len(_literal(tree, "SOURCES")) - len(_literal(tree, "CONFIG_JSON"))
    assert plain < 3_500, plain


def _calls(tree: ast.AST, name: str) -> list[int]:
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
    ]


def test_no_module_execs_source():
    """No lmcore module calls exec() or the builtin compile(): the embedded modules are run by
    the import system (bootstrap's SourceLoader), and the log format is a real module."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hits = _calls(tree, "exec") + _calls(tree, "compile") + _calls(tree, "eval")
        if hits:
            found[path.name] = hits
    assert not found, found
    assert len(list(PKG.rglob("*.py"))) > 10  # the walk saw the package


@pytest.fixture
def fake_package():
    """An in-memory package `fakepkg` (a subpackage, a relative import, a module that raises),
    served by EmbeddedPackage first on sys.meta_path; removed afterwards."""
    sources = {
        "fakepkg/__init__.py": "X = 41\n",
        "fakepkg/sub/__init__.py": "",
        "fakepkg/sub/helper.py": "from fakepkg import X\nY = X + 1\n",
        "fakepkg/sub/mod.py": "from .helper import Y\n\n\ndef boom():\n    raise ValueError(f'boom {Y}')\n",
    }
    finder = EmbeddedPackage(sources, "/nowhere/script.py", package="fakepkg")
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.partition(".")[0] == "fakepkg"]:
            del sys.modules[name]


def test_bootstrap_imports_from_memory(fake_package):
    from fakepkg.sub import mod

    assert mod.Y == 42 and mod.__file__ == "/nowhere/script.py/fakepkg/sub/mod.py"
    assert sys.modules["fakepkg.sub"].__path__ == ["/nowhere/script.py/fakepkg/sub"]
    with pytest.raises(ValueError, match="boom 42") as info:
        mod.boom()
    # tracebacks show the embedded source line (the loader's get_source)
    assert "raise ValueError(f'boom {Y}')" in "".join(traceback.format_exception(info.value))
    with pytest.raises(ModuleNotFoundError, match="not embedded in /nowhere/script.py"):
        importlib.import_module("fakepkg.missing")
    assert fake_package.find_spec("json") is None  # other packages: the normal import path


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_needed_modules_follows_subpackages_and_relative_imports(tmp_path):
    """Modules added later are found from the imports: subpackages, `from pkg import module`,
    relative imports, lazy imports; CLI-only modules are left out when only imported lazily."""
    pkg = _write(
        tmp_path / "lmcore",
        {
            "__init__.py": "",
            "entry.py": "from lmcore import train\n\ndef main():\n    from lmcore.loop.step import f\n",
            "train.py": (
                "from typing import TYPE_CHECKING\nimport numpy\nif TYPE_CHECKING:\n    from lmcore.study import run\n"
                "def cli():\n    from lmcore import info\n    from lmcore.study import run\n"
            ),
            "loop/__init__.py": "from . import step\n",
            "loop/step.py": "from .state import S\nfrom ..helpers import h\n",
            "loop/state.py": "import torch\n",
            "helpers.py": "",
            "unused.py": "",
            "study/__init__.py": "",
            "study/run.py": "import pandas\n",
            "info.py": "",
        },
    )
    mods = needed_modules(preset("record"), pkg)
    assert mods == ["entry", "helpers", "loop", "loop.state", "loop.step", "train"]
    (pkg / "smoke_data.py").write_text("from lmcore import corpus\n")
    (pkg / "corpus.py").write_text("")
    assert {"smoke_data", "corpus"} <= set(needed_modules(preset("smoke"), pkg))
    assert not {"smoke_data", "corpus"} & set(needed_modules(preset("record"), pkg))
    (pkg / "bootstrap.py").write_text((PKG / "bootstrap.py").read_text(encoding="utf-8"))
    script = export_script(preset("record"), pkg)  # the exporter serves the subpackage files
    sources = json.loads(brotli.decompress(base64.b85decode(_literal(ast.parse(script), "SOURCES"))))
    assert "lmcore/loop/__init__.py" in sources and "lmcore/loop/step.py" in sources
    (pkg / "helpers.py").write_text("import pandas\n")  # a heavy import on the script's path: refused
    with pytest.raises(ValueError, match="pandas"):
        export_script(preset("record"), pkg)
    # a left-out module imported when a module on the path is imported: the script would fail there
    (pkg / "helpers.py").write_text("from lmcore.info import x\n")
    with pytest.raises(ValueError, match="lmcore.helpers imports lmcore.info when it is imported"):
        needed_modules(preset("record"), pkg)
    (pkg / "helpers.py").write_text("from lmcore.smoke_data import x\n")  # not embedded for record
    assert "smoke_data" in needed_modules(preset("smoke"), pkg)
    with pytest.raises(ValueError, match="lmcore.helpers imports lmcore.smoke_data"):
        needed_modules(preset("record"), pkg)


def test_log_format_round_trip():
    summary = {
        "seed": 7, "preset": "smoke", "card": "cpu", "world_size": 1, "steps": 10, "mean_step_ms": 12.5,
        "stopped_by": "iterations", "train_time_s": 1.25, "val_loss": 3.5, "val_bpb": 2.25,
    }  # fmt: skip
    metrics = [
        {"kind": "train", "step": 2, "train_loss": 4.0, "lr_mul": 1.0, "step_ms": 12.0, "elapsed_ms": 24.0},
        {"kind": "val", "step": 5, "weights": "raw", "val_loss": 3.7, "val_bpb": 2.3, "elapsed_ms": 60.0},
        {"kind": "event", "step": 6, "event": "qat_on"},
        {"kind": "other"},
    ]
    pack = {"model_bytes": 1234, "sha256": "ab", "calibration_time_s": 0.5}
    ev = {"loss": 3.25, "bpb": 2.125, "ttt": {}, "time_s": {"load": 1.0, "ttt": 4.0, "ttt_score": 1.5, "total": 6.0}}
    text = format_log(summary, metrics, pack, ev, 100)
    assert "step:2 train_loss:4.0000" in text and "step:5 val(raw) val_loss:3.700000" in text
    assert "step:6 event:qat_on" in text and "plain pass" not in text
    assert parse_log(text) == {
        "train_time": 1.25, "eval_time": 6.0, "eval_scoring_time": 4.0, "calibration_time": 0.5,
        "model_bytes": 1234, "code_bytes": 100, "total_bytes": 1334, "steps": 10,
        "ttt": "score-first (LatentMask TTT: every chunk is scored before it is trained on)",
        "val_loss": 3.25, "val_bpb": 2.125,
    }  # fmt: skip
    plain = format_log(summary, [], pack, {"loss": 3.0, "bpb": 2.0, "time_s": {"sliding": 2.0, "total": 3.0}}, 100)
    assert parse_log(plain)["ttt"] == "none" and parse_log(plain)["eval_scoring_time"] == 2.0
    assert "sliding scoring 2.000s" in plain


def test_split_modules_keep_their_old_names():
    """quant was split into gptq + quant + artifact: the names callers imported from quant remain."""
    assert quant.compress is artifact.compress and quant.read_artifact is artifact.read_artifact
    assert quant.collect_hessians is gptq.collect_hessians and quant.gptq_quantize is gptq.gptq_quantize
    from lmcore import submission

    assert submission.export_script is export_script and submission.parse_log is parse_log
