"""The one exception type for mistakes a user can make (bad flags, files, data)."""

import os
import re


class UserError(ValueError):
    """A problem the user can fix. The message names the problem and the fix, on one line.

    The CLI prints it as one line on stderr and exits with code 2; anything else is a bug.
    """


def write_error(error: Exception, path: str | os.PathLike) -> OSError:
    """The OSError behind a failed write that safetensors or torch.save report as their own error (e.g. a full
    disk), so that the CLI names it like any other I/O failure."""
    found = re.search(r"os error (\d+)", str(error))
    if found:
        return OSError(int(found[1]), os.strerror(int(found[1])), str(path))
    detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return OSError(f"cannot write {path}: {detail}")
