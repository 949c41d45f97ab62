"""UniReg: a prompt-controllable foundation model for deformable 3-D CT registration.

The public names below are imported on first use (PEP 562), not with the package: ``import unireg``
would otherwise load torch, segment-anything and MONAI (5 s on a 2-core CPU) before any command line
verb could parse its arguments, and data preparation, model cards and ``--help`` need none of them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {"UniReg": ".api", "UniRegConfig": ".config", "Prompt": ".prompt", "PromptError": ".prompt",
            "parse_prompt": ".prompt", "RegistrationResult": ".result", "load_registration": ".saved",
            "SavedRegistration": ".saved"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
