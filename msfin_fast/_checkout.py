"""``msfin_fast.kernels`` from a source checkout that was never installed.

The Triton kernels live in the repository's top-level ``kernels/`` and install as
``msfin_fast.kernels`` (setup.py's ``package_dir``). Installed, normally or editable, the import
system finds them there. Run straight from a checkout (``PYTHONPATH=.``, or after an install that
failed), nothing maps that name and the package would not import; this finder maps it, for that one
name, and only after every other finder has declined it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class KernelsFromCheckout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "msfin_fast.kernels" or not (KERNELS / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])


if not any(type(finder).__name__ == "KernelsFromCheckout" for finder in sys.meta_path):
    sys.meta_path.append(KernelsFromCheckout())
