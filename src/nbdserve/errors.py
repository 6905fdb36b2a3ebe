"""The one place where host errors become NBD error values."""

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


def nbd_error(exc: BaseException) -> int:
    """Map an exception from the I/O layer to the NBD error sent to the client.

    Anything we do not recognise is EIO: the client must learn that the request failed,
    and EIO is the honest "the storage could not do it" answer.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return _OS_TO_NBD.get(exc.errno, c.NBD_EIO)
    if isinstance(exc, MemoryError):
        return c.NBD_ENOMEM
    return c.NBD_EIO
