"""
Opt-in automatic `import pas_peft` after `import peft`.

`pas-peft autoload enable` writes a one-line .pth file into site-packages that calls `install()` at
interpreter start. `install()` only puts a small finder on `sys.meta_path`; nothing heavy is imported until
the program itself imports peft, and then pas_peft is imported right after peft finishes initialising, so
PAS adapters load through plain PEFT code. `pas-peft autoload disable` removes the file.

This module lives outside the pas_peft package on purpose: importing anything inside pas_peft would import
torch and peft at every interpreter start.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

TARGET = "peft"
PLUGIN = "pas_peft"


class _ImportAfterPeft(importlib.abc.MetaPathFinder):
    """Finds peft with the normal finders and imports pas_peft once peft's module code has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenPlugin(spec.loader)
        return spec


class _LoaderThenPlugin(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            importlib.import_module(PLUGIN)
        except Exception as error:  # never break `import peft` because of the plugin
            warnings.warn(f"pas_peft autoload: importing {PLUGIN} after peft failed: {error!r}", stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def install() -> None:
    """Put the finder first on `sys.meta_path` (once), unless peft is already imported."""
    if TARGET in sys.modules:
        if PLUGIN not in sys.modules:
            importlib.import_module(PLUGIN)
        return
    if not any(isinstance(finder, _ImportAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportAfterPeft())
