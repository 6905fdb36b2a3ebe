"""The one place where host errors become NBD error values (nbdkit's nbd_errno).

Every failed request reaches the client through ``nbd_error(exc, flags)``: the
request's flags matter, because two NBD errors are only meaningful with the flag that
asked for them (spec, "Error values"):

- NBD_EOVERFLOW "SHOULD" only answer a READ with DF (a structured read that cannot be
  sent as one chunk); anywhere else the client gets EINVAL.
- NBD_ENOTSUP "SHOULD" only answer a request with FAST_ZERO (zeroing would not be
  fast); anywhere else EINVAL.
"""

from __future__ import annotations

import errno

from nbdserve.protocol import constants as c

_OS_TO_NBD = {
    errno.EPERM: c.NBD_EPERM,
    errno.EACCES: c.NBD_EPERM,
    errno.EROFS: c.NBD_EPERM,
    errno.EIO: c.NBD_EIO,
    errno.ENOMEM: c.NBD_ENOMEM,
    errno.EINVAL: c.NBD_EINVAL,
    errno.ENOSPC: c.NBD_ENOSPC,
    errno.EDQUOT: c.NBD_ENOSPC,
    errno.EFBIG: c.NBD_ENOSPC,
    errno.EOVERFLOW: c.NBD_EOVERFLOW,
    errno.ENOTSUP: c.NBD_ENOTSUP,
    errno.ESHUTDOWN: c.NBD_ESHUTDOWN,
}

ERROR_NAMES = {
    c.NBD_EPERM: "EPERM", c.NBD_EIO: "EIO", c.NBD_ENOMEM: "ENOMEM", c.NBD_EINVAL: "EINVAL",
    c.NBD_ENOSPC: "ENOSPC", c.NBD_EOVERFLOW: "EOVERFLOW", c.NBD_ENOTSUP: "ENOTSUP",
    c.NBD_ESHUTDOWN: "ESHUTDOWN",
}


class RequestError(OSError):
    """A request refused by a rule above the image (a metadata context that went
    away, FAST_ZERO that cannot be fast): an errno and a message for the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


def nbd_error(exc: BaseException, flags: int = 0) -> int:
    """Map an exception from the I/O layer to the NBD error sent to the client.

    Anything we do not recognise is EIO: the client must learn that the request failed,
    and EIO is the honest "the storage could not do it" answer.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        error = _OS_TO_NBD.get(exc.errno, c.NBD_EIO)
        if error == c.NBD_EOVERFLOW and not flags & c.NBD_CMD_FLAG_DF:
            return c.NBD_EINVAL
        if error == c.NBD_ENOTSUP and not flags & c.NBD_CMD_FLAG_FAST_ZERO:
            return c.NBD_EINVAL
        return error
    if isinstance(exc, MemoryError):
        return c.NBD_ENOMEM
    return c.NBD_EIO


def error_message(exc: BaseException) -> str:
    """A short text for the client's error chunk and the log."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or "I/O error"
    return str(exc) or type(exc).__name__
