"""The library API: a model streamed in this process (`StreamedModel`), chat with it, and step it token by token.
`AutoModel` (the factory, which also opens Ray pipelines) lives in layerstream.api; it is still importable from
here."""

from .chat import ChatSession
from .model import StreamedModel

__all__ = ["AutoModel", "ChatSession", "StreamedModel"]


def __getattr__(name):
    if name == "AutoModel":
        from ..api import AutoModel

        return AutoModel
    raise AttributeError(f"module 'layerstream.engine' has no attribute {name!r}")
