"""Negotiations replayed (sans I/O): a client whose handshake repeats an earlier one,
byte for byte, gets the earlier answers without the options being haggled again.

Clients that connect often send the same bytes every time: a health probe, `nbdinfo`,
a backup tool that connects per step, libnbd's own loops. What option haggling answers
is a function of three things: the client's bytes so far, the negotiator's settings
(the same for every connection of a server while TLS is off and it is not shutting
down), and what it looked up in the catalog. So each transcript is kept under the
client's bytes so far (its *history*) and where in them the bytes it answered began
(a client that sent two options at once wants both answers, one that sent them one
at a time has had the first), with:

- the replies to its bytes from that point on, and the session when they ended in a
  GO;
- the negotiator's state after it (``OptionNegotiator.snapshot``), which a connection
  takes up when its client goes on differently from every earlier one;
- the export names it looked up, and what each looked like then (``export_view``).

A transcript is replayed only while every export it looked up looks the same: the
same object (not removed, reloaded or migrated), size, flags, description, contexts
and connection-limit state; otherwise it is dropped, and the negotiator runs again.
When exports come or go (the catalog's generation), the whole table is forgotten, so
it never keeps an export the server let go of. A negotiation that listed the exports
(LIST depends on all of them) is not kept.

Bounded: at most MAX_TRANSCRIPTS, each of at most MAX_HISTORY client bytes and
MAX_REPLIES reply bytes; when full, all are forgotten and the table fills again
with what clients send now.
"""

from __future__ import annotations

from typing import NamedTuple

from nbdserve.protocol.options import ExportCatalog, Session, at_connection_limit

MAX_TRANSCRIPTS = 256
MAX_HISTORY = 1024  # client bytes; a libnbd GO with structured replies is about 60
MAX_REPLIES = 4096


def export_view(catalog: ExportCatalog, name: str) -> tuple | str:
    """Everything option haggling reads of the export called name: the export itself,
    or why the name is not served."""
    export = catalog.find(name)
    if export is None:
        return catalog.absence(name)
    # The export by identity (its id, unique while the view holds the export), not by
    # equality: a reloaded export equal to the old one is still another export.
    return (id(export), export, export.size, export.read_only, export.discard_only,
            export.multi_conn, export.tls_required, export.description,
            at_connection_limit(export),
            tuple(export.meta_contexts()))


class Transcript(NamedTuple):
    replies: bytes  # the answer to the history's bytes from its start on
    session: Session | None  # set when those ended the handshake in a session
    state: tuple  # OptionNegotiator.snapshot() after them
    names: tuple[str, ...]  # the export names looked up on the way
    views: tuple  # export_view of each, then


class Transcripts:
    """Each server's table of negotiations seen before (one per Connections)."""

    def __init__(self, catalog: ExportCatalog) -> None:
        self.catalog = catalog
        self.table: dict[tuple[int, bytes], Transcript] = {}
        self.generation = catalog.generation  # of the catalog the table was made with
        self.enabled = True
        self.replayed = 0  # histories answered from the table...
        self.handshakes = 0  # ...and of those, the ones that ended a handshake (a metric)

    def views(self, names: tuple[str, ...]) -> tuple:
        catalog = self.catalog
        return tuple([export_view(catalog, name) for name in names])

    def find(self, start: int, history: bytes) -> Transcript | None:
        """The transcript of this history whose answers are to its bytes from start
        on, if there is one and it still holds."""
        if self.catalog.generation != self.generation:
            self.forget()  # exports came or went: let go of the sessions of old ones
            return None
        key = (start, history)
        transcript = self.table.get(key)
        if transcript is None:
            return None
        if transcript.names and self.views(transcript.names) != transcript.views:
            del self.table[key]  # an export changed: haggle again (and record anew)
            return None
        self.replayed += 1
        if transcript.session is not None:
            self.handshakes += 1
        return transcript

    def record(self, start: int, history: bytes, replies: bytes, session: Session | None,
               state: tuple, names: tuple[str, ...]) -> None:
        """What the negotiator answered to history's bytes from start on, and where it
        is now. The caller records only when every byte received was handled."""
        if not self.enabled or len(history) > MAX_HISTORY or len(replies) > MAX_REPLIES:
            return
        if len(self.table) >= MAX_TRANSCRIPTS or self.catalog.generation != self.generation:
            self.forget()
        self.table[start, history] = Transcript(replies, session, state, names,
                                                self.views(names))

    def forget(self) -> None:
        self.table.clear()
        self.generation = self.catalog.generation

    def disable(self) -> None:
        """For good (the server is shutting down: options earn ERR_SHUTDOWN now)."""
        self.enabled = False
        self.forget()
