"""The one exception type users see, a sentence naming the bad input and the fix; which OS errors are the machine's."""

import errno

# A full disk, a quota, a file-size limit (``ulimit -f``: EFBIG), a read-only or immutable folder (EPERM) or a path
# too long for the file system: the machine's or the path's fault, not a bug, so a sentence instead of a trace.
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENAMETOOLONG})


def write_fix(code: int | None) -> str:
    """What to do about a write that failed with OS error ``code``: a file-size limit is no full disk, and freeing
    space does not lift it."""
    if code == errno.EFBIG:
        return "raise the file-size limit (ulimit -f) or write to a file system that takes bigger files"
    return "free disk space or fix the folder's permissions"


def first_line(error: BaseException) -> str:
    """An error as a one-sentence message quotes it: its first line, or its type's name when it says nothing."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class MamoError(Exception):
    """A user-facing error. The message is one sentence that names the bad input and says how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """


class EndedOnPurpose(Exception):
    """A callback ended the run on purpose (tune's pruner on a trial that falls behind): not an error, so the
    run's log.txt records the message as the reason, without a traceback."""


class StopExplained(KeyboardInterrupt):
    """A stop (Ctrl-C, a stop signal) whose command has already said what it keeps and how to continue it, so
    the CLI adds no generic line."""


class PluginNotFound(MamoError):
    """``data.name`` names a plugin file that is not there; a resumed run, which cannot change ``data.name``,
    says how to reach it instead."""

    def __init__(self, message: str, target: str):
        super().__init__(message)
        self.target = target


class TrainingDiverged(MamoError):
    """A loss became NaN or infinite during training; the message names the run, the epoch, the step and the
    learning rate. A subclass so that ``tune`` can tell a diverged trial from a bad setting."""


class NonFiniteGradients(MamoError, FloatingPointError):
    """A direction got NaN or infinite losses or gradients. Also a FloatingPointError, so that a trainer reports
    it as a diverged run (naming the step and the learning rate) like a NaN loss; ``problem`` is the message
    without its fix, for a message that gives its own."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
