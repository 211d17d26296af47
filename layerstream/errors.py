"""Errors a user can act on. Each message says what is wrong and what to do."""


class LayerstreamError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class SourceError(LayerstreamError):
    """The model source is missing, not a model, or cannot be read."""


class UnsupportedModelError(LayerstreamError):
    """The architecture is not (yet) supported by layerstream."""


class StoreError(LayerstreamError):
    """A store is damaged, incomplete or foreign."""


class BudgetError(LayerstreamError):
    """A memory budget is malformed or too small for the plan."""


class InputError(LayerstreamError):
    """A prompt or a generation argument is invalid."""


class DiskSpaceError(LayerstreamError):
    """Not enough free disk for the store."""
