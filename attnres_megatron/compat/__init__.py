"""Version-checked adaptations of Megatron-Core, Megatron-LM and torch (see :mod:`.registry`)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("install_adaptations", "ADAPTATIONS", "adaptations_for"):
        from attnres_megatron.compat import registry

        return getattr(registry, name)
    raise AttributeError(name)
