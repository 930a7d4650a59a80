"""Every exception raised by twinklr_pipe.

The hierarchy::

    PipeError                            base: catch everything from us
    ├── DefinitionError (ValueError)     the pipeline is wrong; raised before running
    ├── StageFailed                      raised by ``PipelineResult.raise_for_failure()``
    ├── CacheError
    │   ├── FingerprintError (TypeError) a value cannot be fingerprinted
    │   ├── CodecError                   a value cannot be encoded, or stored bytes decoded
    │   ├── StoreError                   the store (diskcache, the file system) failed
    │   └── CacheFormatError             the cache directory was written by a newer format
    ├── SpecError (ValueError)           ``module:attr`` does not name a pipeline
    └── RunNotFound (LookupError)        no such run in the journal

Stage failures normally travel as failed ``StageResult`` objects inside the
``PipelineResult`` returned by the executor, not as exceptions.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CacheFormatError",
    "CodecError",
    "DefinitionError",
    "FingerprintError",
    "PipeError",
    "RunNotFound",
    "SpecError",
    "StageFailed",
    "StoreError",
]


class PipeError(Exception):
    """Base class of every error raised by twinklr_pipe."""


class DefinitionError(PipeError, ValueError):
    """Raised when a pipeline definition is invalid, before anything runs.

    ``problems`` lists every problem found, in the order ``validate_pipeline()``
    reports them.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StageFailed(PipeError):
    """Raised by ``PipelineResult.raise_for_failure()`` when a stage failed."""

    def __init__(self, stage: str, error: str | None) -> None:
        self.stage = stage
        self.error = error
        super().__init__(f"Stage '{stage}' failed: {error}")


class CacheError(PipeError):
    """Base class of cache problems."""


class FingerprintError(CacheError, TypeError):
    """Raised when a value cannot be fingerprinted (so no cache key can be made).

    ``where`` is a path into the value (``input['groups'][3]``), ``value_type``
    the offending type, and ``stage`` the stage id once the executor knows it.
    """

    def __init__(self, value_type: type, where: str = "value", stage: str | None = None) -> None:
        self.value_type = value_type
        self.where = where
        self.stage = stage
        super().__init__(self._message())

    def _message(self) -> str:
        name = f"{self.value_type.__module__}.{self.value_type.__qualname__}"
        head = f"Stage '{self.stage}': cannot" if self.stage else "Cannot"
        return (
            f"{head} fingerprint {self.where} of type {name}. Pass a value of a supported type "
            "(a pydantic model, dataclass, JSON-like value, bytes, FileInput...), give the stage "
            "a cache_params() method that returns fingerprintable values, or set cache=False "
            "on its StageDefinition."
        )

    def for_stage(self, stage: str) -> FingerprintError:
        """Return a copy of this error that names ``stage``."""
        return FingerprintError(self.value_type, self.where, stage)


class CodecError(CacheError):
    """Raised when an output cannot be encoded by the codec, or stored bytes cannot be decoded."""


class StoreError(CacheError):
    """Raised when the cache store fails (disk full, permissions, a damaged database)."""


class CacheFormatError(CacheError):
    """Raised when a cache directory was written by a newer, unknown store format."""

    def __init__(self, directory: str, found: int, supported: int) -> None:
        self.directory = directory
        self.found = found
        self.supported = supported
        super().__init__(
            f"Cache directory {directory} uses store format {found}, but this version of "
            f"twinklr_pipe reads format {supported} or older. Upgrade twinklr_pipe, or use "
            "another --cache-dir."
        )


class SpecError(PipeError, ValueError):
    """Raised when a ``module:attr`` or ``file.py:attr`` spec does not name a pipeline."""


class RunNotFound(PipeError, LookupError):
    """Raised when a run id is not in the run journal."""
