"""User-facing errors.

Anything a user can cause (bad config, missing file, bad data, bad checkpoint) raises a `DstrainError`.
The CLI and the launcher entry print its message as one block and exit non-zero, without a traceback
unless `--debug` is given. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DstrainError(Exception):
    """An error the user can fix; its message says what, where and how."""

    exit_code = 2


class ConfigError(DstrainError):
    """The run config or the ZeRO JSON is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"invalid {source}: {len(self.problems)} {noun}\n{lines}")


class DataError(DstrainError):
    """Training data is missing or bad beyond the configured tolerance."""


class CheckpointError(DstrainError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class TrainingError(DstrainError):
    """Training cannot go on (e.g. the loss keeps turning NaN/inf); the message says what to change."""


class StorageError(DstrainError):
    """A write of the run failed for lack of space or quota, or for permission (`dstrain.storage`)."""


class DistributedError(DstrainError):
    """Ranks could not rendezvous, disagreed, or one of them failed."""
