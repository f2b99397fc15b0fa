"""The errors a user can fix, with one base class.

The storage errors live here so that `tasks.storage` and `tasks.s3` share them.
Torch-free and Airflow-free.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message is one line naming the file, key or value
    and what to do."""


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""
