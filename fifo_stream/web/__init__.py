"""The live page: a browser view of a run while it is made, with a prompt box (``--serve``)."""

from .server import LiveServer, ServeError, is_loopback, parse_bind
