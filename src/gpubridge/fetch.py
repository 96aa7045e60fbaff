"""The one guarded fetcher for URLs a caller hands us (job inputs; later webhooks).

A caller-supplied URL must never make the server reach something the caller cannot: its own loopback, the
private network it sits in, or the cloud metadata service. :class:`UrlFetcher` therefore

- accepts only ``http``/``https`` URLs that parse (a control character is a caller error, not a crash);
- resolves the host itself (decimal, octal and hex IPv4 forms such as ``2130706433`` are read the way
  resolvers read them), checks *every* address with :class:`AddressPolicy`, and then connects to the vetted
  address itself (``Host`` header and TLS SNI keep the name), so DNS cannot answer differently at connect
  time; the connection is checked once more when it is opened;
- follows redirects by hand, vetting each hop the same way, up to a limit;
- enforces a size cap while streaming (a ``Content-Length`` over the cap is refused before the body is
  read; nothing past the cap is ever buffered), a total time limit for the whole fetch (a body that
  trickles ends at the limit), and an allowed list of content types.

Errors: a URL that is refused or wrong (bad scheme, forbidden address, 4xx, wrong type, too many
redirects) is the caller's mistake: :class:`~gpubridge.errors.WorkflowInputError` (or
:class:`~gpubridge.errors.PayloadTooLarge`), naming the input, never retryable. The fetched server failing
(5xx, timeout, connection refused) is :class:`~gpubridge.errors.InputUnavailable`, which is retryable.

Allowed exceptions (a private bucket, loopback in tests) come from :class:`~gpubridge.config.FetchSettings`
(``GPUBRIDGE_FETCH_ALLOW=10.0.0.0/8,bucket.internal``) or the constructor.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from .config import FetchSettings
from .errors import InputUnavailable, PayloadTooLarge, WorkflowInputError, redact_url

__all__ = ["AddressPolicy", "Fetched", "Resolver", "UrlFetcher", "parse_url", "system_resolver"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: the names a host resolves to (IP literals, as strings)."""

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A host that resolvers would read as an IPv4 address: 1 to 4 parts, each decimal, octal (0...) or hex (0x...)
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class AddressPolicy:
    """Which addresses a caller-supplied URL may reach: pure, reusable (inputs, webhooks).

    Refused unless explicitly allowed: loopback, link-local, private, multicast, unspecified, reserved,
    CGNAT (100.64.0.0/10), any other non-global address, IPv6 forms that embed one of those (IPv4-mapped,
    IPv4-compatible, 6to4, NAT64), and cloud metadata addresses and names. ``allow`` lists host names and
    CIDR ranges (``"127.0.0.1"``, ``"10.1.0.0/16"``, ``"bucket.internal"``) that are reachable anyway.
    """

    def __init__(self, allow: Iterable[str] = ()):
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        names: set[str] = set()
        for item in allow:
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                names.add(item.lower().rstrip("."))
        self.networks = tuple(networks)
        self.names = frozenset(names)

    def allows_name(self, host: str) -> bool:
        """Whether ``host`` (a name) is explicitly allowed, whatever it resolves to."""
        return host.lower().rstrip(".") in self.names

    def check_name(self, host: str) -> str | None:
        """Why the name ``host`` is refused before resolving it, or ``None``."""
        name = host.lower().rstrip(".")
        if name in self.names:
            return None
        if name in METADATA_NAMES:
            return "a cloud metadata service"
        return None

    def check(self, ip: str | IPAddress) -> str | None:
        """Why ``ip`` may not be reached, or ``None`` when it may."""
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        except ValueError:
            return "not an IP address"
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            addr = ipaddress.IPv6Address(addr.compressed.split("%", 1)[0])
        if any(addr in net for net in self.networks):
            return None
        if addr in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if isinstance(addr, ipaddress.IPv6Address):
            embedded = _embedded_v4(addr)
            if embedded is not None:
                reason = self.check(embedded)
                return f"{reason} (IPv4 {embedded} inside an IPv6 address)" if reason else None
        if addr.is_unspecified:
            return "an unspecified address"
        if addr.is_loopback:
            return "a loopback address"
        if addr.is_link_local:
            return "a link-local address"
        if addr.is_multicast:
            return "a multicast address"
        if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
            return "a shared (CGNAT) address"
        if addr.is_private:
            return "a private address"
        if addr.is_reserved:
            return "a reserved address"
        if not addr.is_global:
            return "not a public address"
        return None


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    n = int(addr)
    if addr in _NAT64 or (n >> 32 == 0 and n > 1):  # NAT64, IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(n & 0xFFFFFFFF)
    return None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a literal loopback address (no DNS): where a server may run without a token."""
    host = host.lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as a resolver reads an all-numeric host (``2130706433``, ``0x7f.1``, ``0177.0.0.1``)."""
    if not _NUMERIC_HOST.match(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
    except OSError:
        raise ValueError(f"{host!r} is not a valid IPv4 address") from None


async def system_resolver(host: str, port: int) -> list[str]:
    """The system resolver (``getaddrinfo``), off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None
    url: str
    """The URL the body came from, after redirects (credentials and query left out)."""


class _Refused(Exception):
    """A connection to a non-vetted address was attempted (the connect-time check)."""


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """The network backend of the fetcher's connections: connects only to vetted IP literals."""

    def __init__(self, policy: AddressPolicy, allowed_ips: set[str]):
        self._inner = httpcore.AnyIOBackend()
        self._policy = policy
        self._allowed_ips = allowed_ips  # addresses vetted by a name explicitly allowed

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise _Refused(f"connection to a name ({host}) instead of a vetted address") from None
        if str(ip) not in self._allowed_ips:
            reason = self._policy.check(ip)
            if reason:
                raise _Refused(f"{ip} is {reason}")
        return await self._inner.connect_tcp(host, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:  # pragma: no cover
        raise _Refused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:  # pragma: no cover
        await self._inner.sleep(seconds)


def _transport(ssl_context: ssl.SSLContext, backend: _GuardedBackend) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False, retries=0)
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool):
        # httpx has no public hook for the network backend; the URL already names the vetted address, and
        # this makes the connect itself refuse anything else.
        transport._pool = httpcore.AsyncConnectionPool(  # type: ignore[attr-defined]
            ssl_context=ssl_context, max_connections=4, max_keepalive_connections=0, network_backend=backend
        )
    return transport


def show_url(url: str | httpx.URL) -> str:
    """A URL for messages: no credentials, no query (presigned URLs carry signatures there)."""
    try:
        u = httpx.URL(str(url))
        return redact_url(str(u.copy_with(query=None, fragment=None)))
    except Exception:
        return "<invalid URL>"


def parse_url(url: str, what: str = "input") -> httpx.URL:
    """``url`` parsed; a caller error (:class:`WorkflowInputError`) unless it is an absolute http(s) URL with
    a host. Only the syntax: the address is checked when it is fetched."""
    if not isinstance(url, str) or not url:
        raise WorkflowInputError(f"{what}: no URL given")
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise WorkflowInputError(f"{what}: invalid URL ({exc})") from None
    if u.scheme not in ("http", "https"):
        raise WorkflowInputError(
            f"{what}: only http and https URLs can be fetched, not {u.scheme or 'a relative URL'!r}"
        )
    if not u.host:
        raise WorkflowInputError(f"{what}: the URL has no host")
    return u


class UrlFetcher:
    """GETs caller-supplied URLs under :class:`AddressPolicy`, with a size cap, a deadline and a type check.

    ``resolver`` maps ``(host, port)`` to addresses (default: the system resolver); tests inject a stub.
    """

    def __init__(
        self,
        *,
        allow: Iterable[str] = (),
        max_bytes: int = 100 * 1024 * 1024,
        timeout: float = 60.0,
        max_redirects: int = 5,
        content_types: Sequence[str] | None = ("image/", "video/", "audio/", "application/octet-stream",
                                               "binary/octet-stream"),
        resolver: Resolver | None = None,
        policy: AddressPolicy | None = None,
        chunk_size: int = 64 * 1024,
        spool_bytes: int = 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.policy = policy or AddressPolicy(allow)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.content_types = tuple(c.lower() for c in content_types) if content_types else None
        self.resolver: Resolver = resolver or system_resolver
        self.chunk_size = chunk_size
        self.spool_bytes = spool_bytes
        self._ssl: ssl.SSLContext | None = ssl_context

    @classmethod
    def from_settings(cls, settings: FetchSettings | None = None, **overrides: Any) -> UrlFetcher:
        """From ``GPUBRIDGE_FETCH_*``; ``also_allow`` adds hosts (an artifact store's endpoint) to its list."""
        s = settings or FetchSettings.load()
        allow = [*s.allow, *overrides.pop("also_allow", ())]
        return cls(allow=allow, max_bytes=s.max_bytes, timeout=s.timeout, max_redirects=s.max_redirects,
                   content_types=s.content_types, **overrides)

    # -- the steps, each usable on its own

    def parse(self, url: str, what: str = "input") -> httpx.URL:
        return parse_url(url, what)

    async def vet(self, u: httpx.URL, what: str = "input") -> tuple[str, bool]:
        """The address to connect to for ``u``, after checking the name and every address it resolves to.
        Returns ``(ip, by_name)``: ``by_name`` when the name itself is explicitly allowed."""
        host = u.raw_host.decode("ascii").strip("[]")
        port = u.port or (443 if u.scheme == "https" else 80)
        refused = f"{what}: {show_url(u)} is refused"
        literal: IPAddress | None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            try:
                literal = numeric_ipv4(host)
            except ValueError as exc:
                raise WorkflowInputError(f"{what}: invalid URL ({exc})") from None
        if literal is not None:
            reason = self.policy.check(literal)
            if reason:
                raise WorkflowInputError(f"{refused}: {literal} is {reason}")
            return str(literal), False
        reason = self.policy.check_name(host)
        if reason:
            raise WorkflowInputError(f"{refused}: {host} is {reason}")
        by_name = self.policy.allows_name(host)
        try:
            addresses = list(await self.resolver(host, port))
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise InputUnavailable(f"{what}: cannot resolve {host} right now ({exc.strerror})") from None
            raise WorkflowInputError(f"{what}: cannot resolve {host} ({exc.strerror or exc})") from None
        except OSError as exc:
            raise InputUnavailable(f"{what}: cannot resolve {host} ({exc})") from None
        if not addresses:
            raise WorkflowInputError(f"{what}: {host} resolves to no address")
        if not by_name:
            for ip in addresses:  # every answer, so a mixed answer cannot smuggle one in
                reason = self.policy.check(ip)
                if reason:
                    raise WorkflowInputError(f"{refused}: {host} resolves to {ip}, {reason}")
        return str(ipaddress.ip_address(addresses[0].split("%", 1)[0])), by_name

    def _type_ok(self, content_type: str | None) -> bool:
        if self.content_types is None or not content_type:
            return True  # no Content-Type: RFC 9110 lets us treat it as application/octet-stream
        ct = content_type.split(";", 1)[0].strip().lower()
        return any(ct.startswith(prefix) for prefix in self.content_types)

    # -- the whole fetch

    async def fetch(self, url: str, *, name: str | None = None) -> Fetched:
        """GET ``url`` (following vetted redirects) and return its body, or raise a typed error."""
        what = f"input {name!r}" if name else "input"
        u = self.parse(url, what)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(u, what)
        except TimeoutError:
            raise InputUnavailable(
                f"{what}: downloading {show_url(u)} took longer than {self.timeout:g} s"
            ) from None

    async def _fetch(self, u: httpx.URL, what: str) -> Fetched:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        for _hop in range(self.max_redirects + 1):
            ip, by_name = await self.vet(u, what)
            backend = _GuardedBackend(self.policy, {ip} if by_name else set())
            target = u.copy_with(host=ip)
            headers = {"Host": u.netloc.decode("ascii"), "Accept-Encoding": "identity"}
            extensions = {"sni_hostname": u.raw_host.decode("ascii")} if u.scheme == "https" else {}
            async with httpx.AsyncClient(transport=_transport(self._ssl, backend), follow_redirects=False,
                                         timeout=httpx.Timeout(self.timeout), trust_env=False) as http:
                request = http.build_request("GET", target, headers=headers, extensions=extensions)
                try:
                    response = await http.send(request, stream=True)
                except _Refused as exc:
                    raise WorkflowInputError(f"{what}: {show_url(u)} is refused: {exc}") from None
                except httpx.TimeoutException:
                    raise InputUnavailable(f"{what}: {show_url(u)} did not answer in time") from None
                except httpx.HTTPError as exc:
                    raise InputUnavailable(f"{what}: cannot download {show_url(u)}: {type(exc).__name__}") from None
                try:
                    if response.status_code in _REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise WorkflowInputError(f"{what}: {show_url(u)} redirects without a Location")
                        try:
                            nxt = u.join(location)
                        except (httpx.InvalidURL, ValueError) as exc:
                            raise WorkflowInputError(f"{what}: {show_url(u)} redirects to an invalid URL ({exc})") from None
                        u = self.parse(str(nxt), what)
                        continue
                    return await self._body(response, u, what)
                finally:
                    await response.aclose()
        raise WorkflowInputError(f"{what}: more than {self.max_redirects} redirects")

    async def post(
        self, url: str, content: bytes, headers: dict[str, str], *, what: str = "webhook", timeout: float | None = None
    ) -> int:
        """POST ``content`` to a caller-supplied ``url`` under the same guard (vetted address, no redirect
        followed: a redirect is an answer like any other) and return the status code. The answer's body is
        never read. Refused URLs raise :class:`WorkflowInputError`; a receiver that cannot be reached or does
        not answer in ``timeout`` raises :class:`InputUnavailable`."""
        u = self.parse(url, what)
        limit = self.timeout if timeout is None else timeout
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        try:
            async with asyncio.timeout(limit):
                ip, by_name = await self.vet(u, what)
                backend = _GuardedBackend(self.policy, {ip} if by_name else set())
                target = u.copy_with(host=ip)
                extensions = {"sni_hostname": u.raw_host.decode("ascii")} if u.scheme == "https" else {}
                sent = {**headers, "Host": u.netloc.decode("ascii")}
                async with httpx.AsyncClient(transport=_transport(self._ssl, backend), follow_redirects=False,
                                             timeout=httpx.Timeout(limit), trust_env=False) as http:
                    request = http.build_request("POST", target, content=content, headers=sent,
                                                 extensions=extensions)
                    try:
                        response = await http.send(request, stream=True)
                    except _Refused as exc:
                        raise WorkflowInputError(f"{what}: {show_url(u)} is refused: {exc}") from None
                    except httpx.TimeoutException:
                        raise InputUnavailable(f"{what}: {show_url(u)} did not answer in time") from None
                    except httpx.HTTPError as exc:
                        raise InputUnavailable(f"{what}: cannot reach {show_url(u)}: {type(exc).__name__}") from None
                    await response.aclose()
                    return response.status_code
        except TimeoutError:
            raise InputUnavailable(f"{what}: {show_url(u)} did not answer within {limit:g} s") from None

    async def _body(self, response: httpx.Response, u: httpx.URL, what: str) -> Fetched:
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise InputUnavailable(f"{what}: {show_url(u)} answered {status}", status_code=status)
        if status >= 400:
            raise WorkflowInputError(f"{what}: {show_url(u)} answered {status}")
        if status != 200:
            raise WorkflowInputError(f"{what}: {show_url(u)} answered {status}, not 200")
        content_type = response.headers.get("content-type")
        if not self._type_ok(content_type):
            allowed = ", ".join(self.content_types or ())
            raise WorkflowInputError(f"{what}: {show_url(u)} is {content_type}, not one of: {allowed}")
        too_big = f"{what}: {show_url(u)} is larger than the {self.max_bytes} bytes a URL input may be"
        length = response.headers.get("content-length")
        if length and length.strip().isdigit() and int(length) > self.max_bytes:
            raise PayloadTooLarge(f"{too_big} ({int(length)} bytes)", size=int(length), limit=self.max_bytes)
        # Spooled: a body refused at the cap never sat in memory, and an accepted one is held once (no
        # list of chunks joined into a second copy).
        with tempfile.SpooledTemporaryFile(max_size=self.spool_bytes) as spool:
            size = 0
            try:
                async for chunk in response.aiter_bytes(self.chunk_size):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(too_big, limit=self.max_bytes)
                    spool.write(chunk)
            except httpx.TimeoutException:
                raise InputUnavailable(f"{what}: {show_url(u)} stalled while sending its body") from None
            except httpx.HTTPError as exc:
                raise InputUnavailable(
                    f"{what}: the download of {show_url(u)} broke: {type(exc).__name__}"
                ) from None
            spool.seek(0)
            data = spool.read()
        return Fetched(data, content_type, show_url(u))
