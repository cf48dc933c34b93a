"""The one exception type that means "the user gave us something we cannot use".

The CLI prints `error: <message>` on one line and exits 2 for these; every other exception is a bug
and keeps its traceback. Messages say what is wrong *and* what to do about it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input (config, files, environment). The message is one line naming the fix."""


class DiskFull(UserError):
    """A write ran out of space; the partial output was removed and older files were left intact."""


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")
_LOW_SPACE = 1 << 20  # bytes still available right after a failed write that we call "full"


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """True if `exc`, raised while writing under `where`, means the disk (or quota) is full.

    Python raises OSError(ENOSPC); safetensors says "No space left on device (os error 28)"; torch's
    zip writer only says "[enforce fail at inline_container.cc] unexpected pos", so for other errors
    we look at the free space right after the failure (call this before deleting the partial files).
    """
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    if any(text in str(exc).lower() for text in _FULL_TEXT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    for p in (Path(where), *Path(where).parents):
        if p.exists():
            return shutil.disk_usage(p).free < _LOW_SPACE
    return False
