"""The importer at the head of the exported train_gpt.py: lmcore served from the script itself.

`lmcore.export.export_script` writes train_gpt.py as a docstring, two literals and this
module's source (minified):

    CONFIG_JSON = '{"name": ...}'   # the config, readable
    SOURCES = '...'                 # lmcore's modules, see below
    <this module>

SOURCES is a JSON object {"lmcore/__init__.py": source, "lmcore/train.py": source, ...},
Brotli-compressed and base85-encoded. Run as the script, the last lines call
`run_script(globals())`: `install` decodes SOURCES and puts an `EmbeddedPackage` first on
`sys.meta_path`, then `lmcore.entry.main` runs the baked-in config.

`EmbeddedPackage` is an importlib `SourceLoader` whose `get_data` returns an embedded
source: the import system compiles and runs the modules as it does files (nothing here
calls exec), tracebacks show their lines (`get_source`), no bytecode is written (no
`path_stats`), and module files are named `<script>/lmcore/X.py`. An `lmcore.X` that is
not embedded raises ModuleNotFoundError, so an installed lmcore is never used.

Its code follows the literals in the script, so this module uses no `from __future__`
import, and only the standard library (and brotli to decode). Written for size: its
source, minified, counts as code bytes, so it has no annotations.
"""

import base64
import importlib.abc
import importlib.util
import json
import os
import sys


class EmbeddedPackage(importlib.abc.MetaPathFinder, importlib.abc.SourceLoader):
    """Imports `package` and its submodules from `sources` ({"package/x.py": source, ...}),
    naming their files `root/package/x.py`."""

    def __init__(self, sources, root, package="lmcore"):
        self.sources, self.root, self.package = sources, root, package

    def _path(self, fullname):
        base = fullname.replace(".", "/")
        for rel in (base + ".py", base + "/__init__.py"):
            if rel in self.sources:
                return os.path.join(self.root, rel)
        return None

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] != self.package:
            return None
        file = self._path(fullname)
        if file is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not embedded in {self.root})", name=fullname)
        return importlib.util.spec_from_file_location(fullname, file, loader=self)

    def get_filename(self, fullname):
        return self._path(fullname)

    def get_data(self, path):
        try:
            return self.sources[path[len(self.root) + 1 :]].encode()
        except KeyError:
            raise OSError(path) from None


def install(script_globals):
    """Put the importer of the script's SOURCES first on sys.meta_path (once); returns it."""
    root = os.path.abspath(script_globals["__file__"])
    for finder in sys.meta_path:
        if isinstance(finder, EmbeddedPackage) and finder.root == root:
            return finder
    loaded = getattr(sys.modules.get("lmcore"), "__file__", root) or "?"
    if not loaded.startswith(root):
        raise ImportError(f"lmcore was imported from {loaded} before {root} could serve its own")
    import brotli

    finder = EmbeddedPackage(json.loads(brotli.decompress(base64.b85decode(script_globals["SOURCES"]))), root)
    sys.meta_path.insert(0, finder)
    return finder


def run_script(script_globals, argv=None):
    """The script's entry point: install the importer, then run the baked-in config."""
    root = install(script_globals).root
    from lmcore.entry import main

    return main(argv, config_json=script_globals["CONFIG_JSON"], script=root)


if __name__ == "__main__":
    sys.exit(run_script(globals()))
