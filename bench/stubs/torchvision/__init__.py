"""A stand-in for torchvision, for vLLM's Qwen3.5 model module: it imports image-processing code
(through transformers) that a text-only model never runs. Every `torchvision.*` submodule
imports, and every name in one is a placeholder class; using one for real fails loudly."""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"


class _PlaceholderType(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _module_getattr(f"{cls.__name__}.{name}")


class _Placeholder(metaclass=_PlaceholderType):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a stub in this environment (bench/stubs)")

    def __class_getitem__(cls, item):
        return cls


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (_Placeholder,), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        return _module_getattr(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__getattr__ = _module_getattr
