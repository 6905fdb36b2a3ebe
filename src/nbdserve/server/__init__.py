"""The asyncio layer: listening, connections, handshake, transmission, and the
server's life (see each module's first lines)."""
