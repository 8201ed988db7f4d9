"""Errors of shard group management, grouped by whether a restart can help.

    ShardError                     base; ``retryable`` tells whether a restart may help
    ├── WorkerUnreachableError     a worker refused or dropped the probe (retryable)
    ├── GroupStartError            a process exited or was not healthy in time (retryable)
    ├── VersionMismatchError       a worker runs another RPC protocol version
    ├── PlacementError             the workers' memory cannot hold the model
    └── GroupNotRunningError       ``shard down`` found no running group

These are command-line errors: ``sollol shard`` prints them and exits, so they
stay apart from the HTTP errors in ``sollol.errors``.
"""


class ShardError(RuntimeError):
    retryable = False


class WorkerUnreachableError(ShardError):
    retryable = True


class GroupStartError(ShardError):
    retryable = True


class VersionMismatchError(ShardError):
    pass


class PlacementError(ShardError):
    pass


class GroupNotRunningError(ShardError):
    pass
