"""One parametrized class per (original class, masked parameter names), shared by every masked module.

`torch.nn.utils.parametrize` gives every parametrized module a class of its own. Under `torch.compile` that makes
each encoder layer's attention a new type: Dynamo guards on the type of `self`, recompiles per layer and gives up
at its recompile limit. Modules of one original class with the same masked parameter names therefore share one
class here. Its properties look the tensor up on `self` (torch's look up the first module they were made for, in
their `parametrize.cached()` path), so sharing is safe.

`nn.MultiheadAttention.forward` reads `in_proj_weight` three times in training (twice for its fast-path checks)
and more in eval: in eager mode the shared class evaluates each masked tensor once per forward call of such a
module. Under torch.compile nothing is cached (the compiler removes the unused reads itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

_NAMES_ATTR = "_superblock_parametrized"
_READS = "_superblock_reads"  # instance attribute: {name: value} while a read-caching forward runs
_SHARED: dict[tuple[type, tuple[str, ...]], type] = {}


def _property(name: str) -> property:
    def get(self: nn.Module) -> Tensor:
        plist = self.parametrizations[name]
        if not torch.compiler.is_compiling():
            reads = self.__dict__.get(_READS)
            if reads is not None:  # inside a read-caching forward (MultiheadAttention): evaluate once per call
                value = reads.get(name)
                if value is None:
                    value = reads[name] = plist()
                return value
            if parametrize._cache_enabled:  # inside `parametrize.cached()`: evaluate once per module and name
                key = (id(self), name)
                value = parametrize._cache.get(key)
                if value is None:
                    value = parametrize._cache[key] = plist()
                return value
        return plist()

    def set_(self: nn.Module, value: Tensor) -> None:
        self.parametrizations[name].right_inverse(value)

    return property(get, set_)


def _caching_forward(base_forward: Callable[..., Any]) -> Callable[..., Any]:
    """`base_forward` with every masked tensor of the module (and of its masked children, e.g. `out_proj`)
    evaluated at most once per call, in eager mode."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or _READS in self.__dict__:
            return base_forward(self, *args, **kwargs)
        owners = [self, *(m for m in self.children() if _NAMES_ATTR in vars(type(m)))]
        for m in owners:
            m.__dict__[_READS] = {}
        try:
            return base_forward(self, *args, **kwargs)
        finally:
            for m in owners:
                m.__dict__.pop(_READS, None)

    return forward


def _intact(cls: type, names: tuple[str, ...]) -> bool:
    """Nobody added or removed a property of the shared class (e.g. a later `register_parametrization`)."""
    props = tuple(sorted(k for k, v in vars(cls).items() if isinstance(v, property)))
    return props == names and vars(cls).get(_NAMES_ATTR) == names


def share_class(module: nn.Module, base: type) -> None:
    """Give a module that `parametrize` just parametrized (it was of class `base`) the shared class."""
    names = tuple(sorted(module.parametrizations))
    cls = _SHARED.get((base, names))
    if cls is None or not _intact(cls, names):
        torch_cls = type(module)
        # torch's own __getstate__ (refuses pickling) and __deepcopy__ (plain deepcopy), which are generic
        dct = {k: v for k, v in vars(torch_cls).items() if k in ("__getstate__", "__deepcopy__")}
        dct.update({name: _property(name) for name in names})
        dct[_NAMES_ATTR] = names
        dct["__module__"] = torch_cls.__module__
        if issubclass(base, nn.MultiheadAttention):
            dct["forward"] = _caching_forward(base.forward)
        cls = type(torch_cls.__name__, (base,), dct)
        _SHARED[(base, names)] = cls
    module.__class__ = cls


def own_class(module: nn.Module) -> None:
    """Give a module a private copy of its parametrized class, so that `parametrize.remove_parametrizations`
    (which deletes properties from the class) cannot break other modules sharing it (or deepcopies of it)."""
    cls = type(module)
    dct = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__", _NAMES_ATTR)}
    module.__class__ = type(cls.__name__, cls.__bases__, dct)
