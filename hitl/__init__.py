"""hitl: a human-in-the-loop review service for LLM and automation workflows."""

from .app import create_app
from .config import Config

__all__ = ["Config", "create_app"]
__version__ = "0.1.0"
