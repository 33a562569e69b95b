"""Generator backends register here by job kind, GAN architectures by name; nothing branches.

A backend is a :class:`aigc.workers.contract.Generator`: a class taking ``(model, settings)`` whose
``run(job: JobInfo, items: list[ClaimedItem]) -> Iterator[list[ResultRow]]`` yields the rows of
one batch at a time, and whose ``memory_bytes`` says what its weights occupy. Instances are
cached per process (models stay warm) in an LRU bounded by memory (``AIGC_MODEL_CACHE_MB``), so
a worker can switch models without holding every one it ever used.

A GAN architecture is an ``nn.Module`` class registered under the name that model folders put
in their ``config.json`` (``"architecture": "dcgan"``); the image backend builds whichever the
folder names. A new architecture is one module with ``@register_architecture("name")``, listed
in ``BUILTIN_ARCHITECTURES``.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from aigc.schemas.enums import Kind
from aigc.schemas.settings import Settings

from .contract import Generator
from .errors import UnknownArchitectureError, UnknownKindError

# Modules whose import registers the built-in backends (imported on first lookup: they need torch).
BUILTIN_BACKENDS = ("aigc.workers.text", "aigc.workers.images")
BUILTIN_ARCHITECTURES = ("aigc.workers.dcgan",)


_backends: dict[Kind, type[Generator]] = {}
_architectures: dict[str, type] = {}
_warm: OrderedDict[tuple[type[Generator], str], Generator] = OrderedDict()
_lock = threading.Lock()
C = TypeVar("C", bound=type)  # a backend class, returned as it was


def register(*kinds: Kind) -> Callable[[C], C]:
    """Class decorator: ``cls`` generates ``kinds``. Registering a kind twice is an error."""
    def decorator(cls: C) -> C:
        for kind in kinds:
            if kind in _backends:
                raise ValueError(f"kind {kind} already has backend {_backends[kind].__name__}")
            _backends[kind] = cls
        return cls
    return decorator


def register_architecture(name: str) -> Callable[[type], type]:
    """Class decorator: model folders whose config says ``"architecture": name`` build ``cls``."""
    def decorator(cls: type) -> type:
        if name in _architectures:
            raise ValueError(f"architecture {name!r} is already {_architectures[name].__name__}")
        _architectures[name] = cls
        return cls
    return decorator


def architectures() -> dict[str, type]:
    """Every registered GAN architecture by name, the built-in ones included."""
    for module in BUILTIN_ARCHITECTURES:
        importlib.import_module(module)
    return dict(_architectures)


def architecture_for(name: str) -> type:
    """The GAN class registered as ``name``; :class:`UnknownArchitectureError` listing the known."""
    architectures()
    try:
        return _architectures[name]
    except (KeyError, TypeError):
        raise UnknownArchitectureError(
            f"no GAN architecture {name!r} is registered; known: {', '.join(sorted(_architectures))}"
        ) from None


def backend_for(kind: Kind | str) -> type[Generator]:
    """The backend class registered for ``kind``; :class:`UnknownKindError` if none."""
    for module in BUILTIN_BACKENDS:
        importlib.import_module(module)
    try:
        return _backends[Kind(kind)]
    except (KeyError, ValueError):
        raise UnknownKindError(f"no generator backend is registered for kind {kind!r}") from None


def kinds_of(backend: type[Generator]) -> list[Kind]:
    """The kinds ``backend`` is registered for (jobs of these may share its batches)."""
    return [kind for kind, cls in _backends.items() if cls is backend]


def get_generator(kind: Kind | str, model: str, settings: Settings) -> Generator:
    """The warm generator for ``kind`` and ``model``, loading it on first use."""
    key = (backend_for(kind), model)
    with _lock:
        if key in _warm:
            _warm.move_to_end(key)
            return _warm[key]
        generator = key[0](model, settings)
        _warm[key] = generator
        budget = cache_budget_bytes(settings)
        evicted = False
        while len(_warm) > 1 and sum(_memory(g) for g in _warm.values()) > budget:
            _warm.popitem(last=False)  # the least recently used; never the one just loaded
            evicted = True
        if evicted:
            _release_freed_memory()
        return generator


def warm_models() -> list[tuple[str, str, int]]:
    """(backend, model, bytes) of the warm generators, least recently used first."""
    with _lock:
        return [(cls.__name__, model, _memory(g)) for (cls, model), g in _warm.items()]


def cache_budget_bytes(settings: Settings) -> int:
    """``AIGC_MODEL_CACHE_MB``, or by default half the GPU's memory (a quarter of RAM on CPU)."""
    if settings.model_cache_mb:
        return settings.model_cache_mb << 20
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers: what a warm model occupies."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _memory(generator: Generator) -> int:
    return int(getattr(generator, "memory_bytes", 0))


def _release_freed_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
