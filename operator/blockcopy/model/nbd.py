"""Network destinations of the BlockCopy API (NBD exports, TCP or a Unix socket), as
``spec.dest`` names them, and the error of a spec the agent cannot use. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import posixpath
import urllib.parse


class SpecError(ValueError):
    """The spec cannot be acted on; the message is shown to the user as is."""


@dataclasses.dataclass(frozen=True)
class NetworkDest:
    """A network destination: an NBD export (TCP or a Unix socket)."""

    export: str
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    protocol: str = "nbd"

    @property
    def endpoint(self) -> str:
        """What --allowed-network-dest names: HOST:PORT, or the socket's path."""
        return self.socket if self.socket else f"{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        """The URI qemu-img and QEMU take for it."""
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        return f"nbd://{self._bracketed_host}:{self.port}/{self.export}"

    @property
    def _bracketed_host(self) -> str:
        return f"[{self.host}]" if self.host and ":" in self.host else str(self.host)


NBD_DEFAULT_PORT = 10809


def parse_network_dest(text: str) -> NetworkDest | None:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``; None if ``text``
    is not a URI at all (a path). Raises SpecError for a URI the agent cannot use."""
    if "://" not in text:
        return None
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # an unbalanced [ of an IPv6 host
        raise SpecError(f"spec.dest {text!r} is not a valid URI: {exc}") from None
    export = urllib.parse.unquote(parts.path.removeprefix("/"))
    if not export or "/" in export:
        raise SpecError(f"spec.dest {text!r}: the NBD export name is missing (…/EXPORT)")
    if parts.fragment:
        raise SpecError(f"spec.dest {text!r}: no #fragment in an NBD URI")
    if parts.scheme == "nbd":
        if parts.query:
            raise SpecError(f"spec.dest {text!r}: nbd:// takes no query")
        try:
            port = parts.port or NBD_DEFAULT_PORT
        except ValueError:
            raise SpecError(f"spec.dest {text!r}: the port is not a number in 1-65535") from None
        if not parts.hostname:
            raise SpecError(f"spec.dest {text!r}: nbd://HOST:PORT/EXPORT needs a host")
        return NetworkDest(export=export, host=parts.hostname, port=port)
    if parts.scheme == "nbd+unix":
        query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
        sockets = query.pop("socket", [])
        if parts.netloc or query or len(sockets) != 1 or not posixpath.isabs(sockets[0]):
            raise SpecError(f"spec.dest {text!r}: write nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH")
        return NetworkDest(export=export, socket=posixpath.normpath(sockets[0]))
    raise SpecError(f"spec.dest {text!r}: network destinations are NBD URIs "
                    "(nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
