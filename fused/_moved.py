"""Old module paths that now live elsewhere: each stays importable as the very
module it moved to (so ``monkeypatch.setattr`` and ``isinstance`` still work)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str, deprecated: bool = True) -> None:
    """Make ``import old`` return module ``new``; warn once (DeprecationWarning) if ``deprecated``."""
    module = importlib.import_module(new)
    if deprecated:
        warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=3)
    sys.modules[old] = module
