"""hitl: a human-in-the-loop review service for LLM and automation workflows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import Config

__all__ = ["Config", "create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The server's parts, imported when first asked for: a program that only uses
    :mod:`hitl.client` never loads Quart, hypercorn or the store (PEP 562)."""
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Config":
        from .config import Config

        return Config
    raise AttributeError(f"module 'hitl' has no attribute {name!r}")
