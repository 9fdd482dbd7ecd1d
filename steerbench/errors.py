"""The error types steerbench raises, one per kind of mistake.

Every message names the file, parameter or model involved and says what to do. Each type
also derives from the built-in exception code would have caught before it existed
(``ValueError``; a parameter error is a ``TypeError`` too), so ``except ValueError`` keeps
working.

- :class:`ParameterError`: a value handed to a function or the CLI is of the wrong type,
  out of range or not finite (a strength of ``inf``, ``layer=40`` on a 30-layer model, a
  prompt longer than the context window). Raised before any work is done.
- :class:`DatasetError`: a dataset file is missing, unreadable, malformed or empty.
- :class:`ArtifactError`: a saved file is not a valid steerbench artifact (no header, no
  provenance, missing or non-finite values, a truncated cache).
- :class:`ModelMismatch`: an artifact or steerer was fitted on another model than the
  one it is used with.
- :class:`ConcurrentUse`: a call cannot run because another call holds what it needs.
"""

from __future__ import annotations


class SteerbenchError(Exception):
    """Base of every error steerbench raises on purpose."""


class ParameterError(SteerbenchError, ValueError, TypeError):
    """A parameter is of the wrong type, out of range or not finite."""


class DatasetError(SteerbenchError, ValueError):
    """A dataset file is missing, unreadable, malformed or empty."""


class ArtifactError(SteerbenchError, ValueError):
    """A saved file is not a valid steerbench artifact (or cache)."""


class ModelMismatch(SteerbenchError, ValueError):
    """An artifact was fitted on another model (or mode) than the one it is used with."""


class ConcurrentUse(SteerbenchError, RuntimeError):
    """A call met another call's state that it cannot share."""


__all__ = ["ArtifactError", "ConcurrentUse", "DatasetError", "ModelMismatch", "ParameterError", "SteerbenchError"]
