"""imgpipe's Python API: what a program imports, beside the `imgpipe` command.

    import imgpipe

    with imgpipe.Scorer(topk=3) as scorer:          # in process, the engine of `imgpipe score`
        records = scorer.score(["samples/coffee.jpg"])

    with imgpipe.Client.from_settings(imgpipe.load_settings()) as client:  # jobs for `serve`
        ...

Everything here is supported; the modules under `pipeline` and `workers` are
the implementation and may change. Importing this package is cheap: `Scorer`,
`Client` and the settings load their modules (the engine, redis-py, pydantic)
when first named.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.errors import (
    ConfigError,
    ImgpipeError,
    InputError,
    ModelLoadError,
    PermanentError,
    TransientError,
)

if TYPE_CHECKING:
    from pipeline.config import Settings, load_settings
    from pipeline.items import Record
    from pipeline.scorer import Item, Scorer
    from pipeline.transport.client import Client

__all__ = [
    "Client",
    "ConfigError",
    "ImgpipeError",
    "InputError",
    "Item",
    "ModelLoadError",
    "PermanentError",
    "Record",
    "Scorer",
    "Settings",
    "TransientError",
    "__version__",
    "load_settings",
]

# Loaded when first named: `import imgpipe` (and `python -m imgpipe`) stays fast.
_LAZY = {
    "Client": "pipeline.transport.client",
    "Item": "pipeline.scorer",
    "Record": "pipeline.items",
    "Scorer": "pipeline.scorer",
    "Settings": "pipeline.config",
    "load_settings": "pipeline.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imgpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once is enough
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
