"""Writing and removing the opt-in .pth file that imports pas_peft whenever peft is imported."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional, Union

PTH_NAME = "pas_peft_autoload.pth"
PTH_LINE = "import pas_peft_autoload; pas_peft_autoload.install()\n"


def site_packages() -> Path:
    """Return the site-packages folder of the running environment."""
    return Path(sysconfig.get_paths()["purelib"])


def enable_autoload(directory: Optional[Union[str, os.PathLike]] = None) -> Path:
    """
    Write the .pth file into `directory` (default: this environment's site-packages) and return its path.

    Every interpreter of that environment then imports pas_peft right after peft, so plain PEFT code loads PAS
    adapters. It has no effect with `python -S` or `-I`, which skip .pth files.
    """
    path = Path(directory or site_packages()) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def disable_autoload(directory: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """Remove the .pth file; return its path, or None if it was not there."""
    path = Path(directory or site_packages()) / PTH_NAME
    if not path.exists():
        return None
    path.unlink()
    return path


def autoload_path(directory: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
    """Return the .pth file's path if automatic import is enabled, else None."""
    path = Path(directory or site_packages()) / PTH_NAME
    return path if path.exists() else None
