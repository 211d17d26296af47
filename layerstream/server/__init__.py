"""`layerstream serve`: an OpenAI-compatible HTTP server on the continuous-batching engine, with a chat page."""

from .app import build_app, serve

__all__ = ["build_app", "serve"]
