"""The library API: open a model (`AutoModel`, `StreamedModel`), chat with it, and step it token by token."""

from .chat import ChatSession
from .model import AutoModel, StreamedModel

__all__ = ["AutoModel", "ChatSession", "StreamedModel"]
