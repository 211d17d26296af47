"""The streaming runtime: reading units, the background loader, and the hooks that bind weights to the skeleton.

reader.py (files into buffers, checked), loader.py (read-ahead in sweep order), streamer.py (resident units,
binding, hooks), experts.py (routed experts only), embedding.py (embedding rows only), profiler.py.
"""

from .profiler import Profiler
from .streamer import Streamer

__all__ = ["Profiler", "Streamer"]
