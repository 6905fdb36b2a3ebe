"""The sans-I/O protocol core: bytes in, values out; no sockets here.

- ``constants``: every number the spec names.
- ``handshake``: framing of the handshake (client flags, option headers) and its phase.
- ``options``: option haggling, one handler per option.
- ``transmission``: framing and every rule of the transmission phase, and reply encoding.
"""


class ProtocolViolation(Exception):
    """The client broke a MUST of the spec; the only answer is to hang up."""
