"""A package's public names, loaded on first use: `import dni` does not import torch, so a
script that imports the library can answer --help or a bad flag before torch loads."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]], defined_here: tuple[str, ...] = ()
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose public names live in its
    submodules as `exports` ({submodule: names}) says, besides those it defines itself
    (`defined_here`). A name's submodule is imported the first time the name (or the submodule
    itself) is used, and the name is then kept on the package."""
    home = {name: f"{package}.{module}" for module, names in exports.items() for name in names}
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> object:
        if name in exports:   # a submodule, reachable as an attribute as after an eager import
            return importlib.import_module(f"{package}.{name}")
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(home[name]), name)
        except AttributeError as exc:  # not "no such name": the module failed as it loaded
            raise ImportError(f"{package}.{name} could not be loaded: {exc}") from exc
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return sorted({*home, *defined_here}), __getattr__, __dir__
