"""The sans-I/O protocol core: bytes in, values out; no sockets here."""
