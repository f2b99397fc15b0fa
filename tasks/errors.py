"""The errors a user can fix, with one base class: the CLI prints their message as one
`error:` line (exit 2); any other exception is a bug and shows its traceback.

Each stage keeps its own subclass next to its code (ConfigError, DatasetError,
MissingShardsError, RelabelError, TrainerError, SampleError, AuditFileError); the storage
errors live here so that `tasks.storage` and `tasks.s3` share them. Torch-free and
Airflow-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

USER_ERROR_EXIT = 2  # the exit code of the CLI and of a trainer after a UserError


class UserError(Exception):
    """Something the user can fix; the message is one line naming the file, key or value
    and what to do."""


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the URI (never credentials)."""


class MissingFileError(StorageError, FileNotFoundError):
    """A file or object the user named, or a run folder should hold, does not exist."""


def run_step(step: Callable[[], object], what: str, log: logging.Logger,
             interrupted: str) -> int:
    """Run one step of a `python -m tasks.<step>` entrypoint (a trainer, an embed chunk, the
    probes) and return its exit code: 0; USER_ERROR_EXIT after a UserError the user must fix
    first; 1 after a bug (its traceback logged first) or a StorageError (an outage may pass,
    so re-running helps); 130 on Ctrl-C (`interrupted` says what was kept). The last log line
    says what failed."""
    try:
        step()
    except Exception as err:
        if not isinstance(err, UserError):
            log.exception("%s failed with an unexpected error", what)
        log.error("%s failed: %s: %s", what, type(err).__name__, err)
        fixed_first = isinstance(err, UserError) and not isinstance(err, StorageError)
        return USER_ERROR_EXIT if fixed_first else 1
    except KeyboardInterrupt:
        log.warning("%s interrupted; %s", what, interrupted)
        return 130
    return 0
