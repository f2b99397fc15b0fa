"""The errors a user can fix, with one base class: the CLI prints their message as one
`error:` line (exit 2); any other exception is a bug and shows its traceback.

Each stage keeps its own subclass next to its code (ConfigError, DatasetError,
MissingShardsError, RelabelError, TrainerError, SampleError, AuditFileError); the storage
errors live here so that `tasks.storage` and `tasks.s3` share them. Torch-free and
Airflow-free.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # the exit code of the CLI and of a trainer after a UserError


class UserError(Exception):
    """Something the user can fix; the message is one line naming the file, key or value
    and what to do."""


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""


class MissingFileError(StorageError, FileNotFoundError):
    """A file or object the user named, or a run folder should hold, does not exist."""
