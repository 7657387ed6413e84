"""Keeping other web sites out of the web chat and /api/*.

A page on any site the operator visits can make their browser send requests to
http://127.0.0.1:8080 (a "simple" cross-site POST needs no permission), and a
site whose name is made to resolve to 127.0.0.1 (DNS rebinding) can even read
the answers. So the web chat page and /api/* answer only:

- under one of this server's own names (the `Host` header): loopback names and
  addresses, HTTP_HOST, this machine's host name, the address the connection
  came in on, and WEB_ALLOWED_HOSTS (the public name a proxy forwards); 400
  otherwise, logged once per name so an operator behind a proxy sees what to add;
- from their own origin: a browser's `Origin` must be the same host and port,
  or a name in WEB_ALLOWED_HOSTS; 403 otherwise;
- with `Content-Type: application/json` on POSTs and PUTs to /api/*, which a cross-site
  form or `text/plain` fetch cannot send without the browser asking first; 415.

Health, readiness, metrics and Slack's signed events are not checked: probes,
scrapers and Slack use whatever address they were given.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from bot.config import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths served whatever the bind address and the Host: probes, scrapers and Slack's signed events.
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/slack/")
# Host names reported as unknown, at most this many (an attacker can send any).
MAX_REPORTED = 100


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class AllowedHosts:
    """The names this server answers to (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.listed = settings.web_allowed_hosts  # the operator's own list: also trusted as origins
        own = {socket.gethostname().lower()}
        if settings.http_host not in ("", "0.0.0.0", "::"):
            own.add(settings.http_host.lower().strip("[]"))
        self._own = frozenset(own)
        self._reported: set[str] = set()

    def allows(self, host: str, local_address: str | None) -> bool:
        """`host`: the Host header's name, lowercase, without port or brackets."""
        return (
            is_loopback(host)
            or host in self._own
            or host == local_address  # an address literal naming the interface it came in on
            or self.lists(host)
        )

    def lists(self, host: str) -> bool:
        """True if WEB_ALLOWED_HOSTS names `host` (exactly, by a `.domain` suffix, or `*`)."""
        listed = self.listed
        return "*" in listed or host in listed or any(
            name.startswith(".") and (host == name[1:] or host.endswith(name)) for name in listed
        )

    def report(self, host: str) -> None:
        if host not in self._reported and len(self._reported) < MAX_REPORTED:
            self._reported.add(host)
            log.warning(
                "Refused a web request for host %r, not one of this server's names: behind a proxy, "
                "add the public name to WEB_ALLOWED_HOSTS", host,
            )


def make_request_guard(settings: Settings) -> Callable[..., Awaitable[web.StreamResponse]]:
    hosts = AllowedHosts(settings)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(OPEN_PATHS):
            return await handler(request)
        api = path.startswith("/api/")
        raw_host = request.headers.get("Host")
        host = _host_name(raw_host) if raw_host is not None else None
        if host is not None and not hosts.allows(host, _local_address(request)):
            hosts.report(host)
            return _refuse(api, 400, "unknown_host", "This server does not answer to that host name; "
                           "its operator can add it to WEB_ALLOWED_HOSTS.")  # fmt: skip
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin, raw_host, hosts):
            return _refuse(api, 403, "cross_origin", "Requests from other web sites are not allowed.")
        if api and request.method in ("POST", "PUT") and request.content_type != "application/json":
            return _refuse(api, 415, "unsupported_media_type", "Send the body as JSON with the header "
                           "Content-Type: application/json.")  # fmt: skip
        return await handler(request)

    return guard


def _refuse(api: bool, status: int, code: str, message: str) -> web.Response:
    if api:
        return web.json_response({"error": message, "code": code}, status=status)
    return web.Response(status=status, text=message + "\n")


def _host_name(value: str) -> str:
    """The name in a Host header or an origin's netloc, lowercase, without port or brackets."""
    try:
        name = urlsplit("//" + value.strip()).hostname
    except ValueError:  # a port that is not a number, a bracket missing...
        return value.strip().lower()
    return name or ""


def _local_address(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and sockname:
        return str(sockname[0]).lower()
    return None


def _same_origin(origin: str, raw_host: str | None, hosts: AllowedHosts) -> bool:
    """A browser's request from our own page (same host and port), or from a listed name."""
    if origin == "null":  # sandboxed frames, file:// pages: never our page
        return False
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    if raw_host is not None and netloc == raw_host.strip().lower():
        return True
    return bool(hosts.listed) and hosts.lists(_host_name(netloc))
