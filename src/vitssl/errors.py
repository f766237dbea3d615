"""The one base class for errors a user can cause and fix.

Every such error names the file, key or value that is wrong and says how to fix it, in one line. The command
line catches :class:`UserError` once and prints ``vitssl <command>: error: <message>`` with exit status 2,
never a traceback (``-v`` adds the traceback for debugging). Anything else that escapes is a bug.
"""

from __future__ import annotations

# How torch's DataLoader re-raises a worker's exception: the same class, built from a message that holds the
# worker's whole traceback, whose last line is "module.Class: original message".
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(Exception):
    """Base of every error caused by the user's input: configs, files, data, checkpoints, options."""

    def __str__(self) -> str:  # KeyError subclasses would quote the message
        text = str(self.args[0]) if self.args else ""
        if _WORKER_TRACEBACK in text:  # raised in a data-loader worker: the original message, without the traceback
            last = text.rstrip().splitlines()[-1]
            _, sep, message = last.partition(": ")
            return message if sep else last
        return text


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (a dataset root, a list file, a shard)."""


class DataError(UserError, ValueError):
    """A dataset cannot be read as configured (missing root, a file where a folder belongs, no samples)."""


# The config key that turns corrupt samples into skipped ones; named in every error a user can fix with it.
SKIP_HINT = "set data.skip_corrupt=true to skip such samples"


class CorruptImageError(UserError, RuntimeError):
    """A sample that cannot be read: an undecodable or truncated image or video (or, for image-text sets, a
    missing image member or an empty caption). The message names the file or sample.

    It lives here, on the lowest floor, so that reading a video (``vitssl video probe``) needs neither torch nor
    the dataset modules; :mod:`vitssl.data.common` re-exports it.
    """
