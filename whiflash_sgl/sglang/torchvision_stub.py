"""A stand-in for ``torchvision`` on CPU-only SGLang installs, which import it on paths that never use it.

``sglang.srt.configs`` imports ``torchvision.transforms`` (for vision models) whenever a model config is read, and
PyPI's torchvision builds need CUDA, so a CPU-only test environment has no working one (installing it would also
replace the CPU torch). ``install()`` puts a meta-path finder in front that fabricates ``torchvision`` and any
submodule; every attribute of them is a placeholder class that raises if anything calls it. No path the plugin
tests or the CPU server (text models only) walk uses torchvision for real.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

ROOT = "torchvision"


class _Placeholder(type):
    """The class of placeholders: any attribute of one (``InterpolationMode.BICUBIC``) is another placeholder."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(qualname: str) -> type:
    def fail(*_args, **_kwargs):
        raise RuntimeError(f"{qualname} is a test stub: torchvision is not installed")

    return _Placeholder(qualname.rsplit(".", 1)[-1], (), {"__init__": fail, "__call__": fail, "__module__": ROOT,
                                                         "__qualname__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == ROOT or fullname.startswith(ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        module.__version__ = "0.0.0+stub"


def install() -> None:
    """Serve ``torchvision`` from the stub unless a working torchvision imports (idempotent)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing, or a CUDA-only build failing to load: either way, stub it
        for name in [n for n in sys.modules if n == ROOT or n.startswith(ROOT + ".")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _Finder())
