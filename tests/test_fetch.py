"""The guarded URL fetcher (gpubridge.fetch), against hostile servers on 127.0.0.1.

Every refusal is proved to happen before connecting: the loopback server's accept count stays 0 and a spy
on the network backend sees no connect. Names resolve through a stub resolver; only 127.0.0.1 is dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import pytest

from gpubridge.config import FetchSettings
from gpubridge.errors import InputUnavailable, PayloadTooLarge, WorkflowInputError
from gpubridge.fetch import AddressPolicy, UrlFetcher, _GuardedBackend, _Refused
from gpubridge.models import InputFile, JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.testing import ComfyDouble

ROOT = Path(__file__).resolve().parent.parent
PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()
IMG2IMG = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}

Responder = Callable[[bytes, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server on 127.0.0.1 that counts connections and answers with ``respond``."""

    def __init__(self, respond: Responder):
        self.respond = respond
        self.accepted = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            await self.respond(head, writer, self)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def ok(body: bytes = PNG, content_type: str = "image/png") -> Responder:
    async def respond(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode() + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    return respond


def redirect_to(location: Callable[[Server], str], status: int = 302) -> Responder:
    async def respond(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        w.write(f"HTTP/1.1 {status} Found\r\nLocation: {location(s)}\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode())
    return respond


def stub_resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            import socket

            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connect the fetcher's network backend makes."""
    seen: list[tuple[str, int]] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def spy(self: Any, host: str, port: int, *args: Any, **kw: Any) -> Any:
        seen.append((host, port))
        return await real(self, host, port, *args, **kw)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", spy)
    return seen


@pytest.fixture
async def png_server() -> AsyncIterator[Server]:
    async with Server(ok()) as s:
        yield s


# ------------------------------------------------------------------------------ refused before connecting


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://localhost:{port}/x.png",
        "http://2130706433:{port}/x.png",  # decimal 127.0.0.1
        "http://0x7f.1:{port}/x.png",  # hex + short form
        "http://[::ffff:127.0.0.1]:{port}/x.png",  # IPv4-mapped IPv6
        "http://[::1]:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://10.0.0.5/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://100.64.0.1/x.png",
        "http://0.0.0.0:{port}/x.png",
        "http://224.0.0.1/x.png",
        "http://internal.test:{port}/x.png",  # a name that resolves to a private address
        "http://mixed.test:{port}/x.png",  # one public and one loopback answer
    ],
)
async def test_refused_before_connecting(png_server: Server, connects: list, url: str):
    calls: list[str] = []
    resolver = stub_resolver({"localhost": ["127.0.0.1"], "internal.test": ["10.9.8.7"],
                              "mixed.test": ["93.184.216.34", "127.0.0.1"],
                              "metadata.google.internal": ["169.254.169.254"]}, calls)
    fetcher = UrlFetcher(resolver=resolver)
    with pytest.raises(WorkflowInputError, match="refused") as info:
        await fetcher.fetch(url.format(port=png_server.port), name="face.png")
    assert not info.value.retryable
    assert "'face.png'" in str(info.value)
    assert png_server.accepted == 0 and connects == []
    assert "metadata.google.internal" not in calls  # refused by name, never resolved


async def test_client_refuses_loopback_url_input(png_server: Server):
    """The path that fetched it before: a LocalRunner job with a URL input pointing at loopback."""
    async with ComfyDouble() as comfy:
        runner = LocalRunner(comfy.url, reconnect_timeout=1.0)
        try:
            request = JobRequest(workflow=Workflow.model_validate(IMG2IMG),
                                 inputs={"face.png": InputFile(url=f"{png_server.url}/x.png")})
            with pytest.raises(WorkflowInputError, match="loopback"):
                await runner.run(request)
            decimal = JobRequest(workflow=Workflow.model_validate(IMG2IMG),
                                 inputs={"face.png": InputFile(url=f"http://2130706433:{png_server.port}/x")})
            with pytest.raises(WorkflowInputError, match="loopback"):
                await runner.run(decimal)
        finally:
            await runner.aclose()
        assert comfy.stats.uploads == 0
    assert png_server.accepted == 0


async def test_client_fetches_an_allowed_url_input(png_server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")
    async with ComfyDouble() as comfy:
        runner = LocalRunner(comfy.url, reconnect_timeout=1.0)
        try:
            request = JobRequest(workflow=Workflow.model_validate(IMG2IMG),
                                 inputs={"face.png": InputFile(url=f"{png_server.url}/x.png")})
            result = await runner.run(request)
        finally:
            await runner.aclose()
        assert comfy.stats.uploads == 1 and result.artifacts
    assert png_server.accepted == 1


# ------------------------------------------------------------------------------------------ redirects


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/x.png",
        "http://2130706434:{port}/x.png",
        "http://[::1]:{port}/x.png",
        "http://[::ffff:127.0.0.2]:{port}/x.png",
        "http://localhost:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
    ],
)
async def test_redirect_to_loopback_is_refused(connects: list, target: str):
    """127.0.0.1 is allowed for the first hop only; where it redirects is vetted again and refused."""
    async with Server(redirect_to(lambda s: target.format(port=s.port))) as server:
        fetcher = UrlFetcher(allow=["127.0.0.1"], resolver=stub_resolver({"localhost": ["127.0.0.2"]}))
        with pytest.raises(WorkflowInputError) as info:
            await fetcher.fetch(f"{server.url}/start", name="face.png")
    assert not info.value.retryable
    assert server.accepted == 1 and len(server.requests) == 1
    assert connects == [("127.0.0.1", server.port)]


async def test_redirect_limit(connects: list):
    async with Server(redirect_to(lambda s: f"{s.url}/again", status=307)) as server:
        fetcher = UrlFetcher(allow=["127.0.0.1"], max_redirects=3)
        with pytest.raises(WorkflowInputError, match="more than 3 redirects"):
            await fetcher.fetch(f"{server.url}/start")
    assert len(server.requests) == 4


async def test_allowed_redirect_is_followed():
    async with Server(ok()) as target:
        async with Server(redirect_to(lambda s: f"{target.url}/x.png", status=301)) as first:
            fetched = await UrlFetcher(allow=["127.0.0.1"]).fetch(f"{first.url}/a")
    assert fetched.data == PNG and fetched.content_type == "image/png"


# ------------------------------------------------------------------ connect to the vetted address itself


async def test_connects_to_the_vetted_address_keeping_the_host_name(png_server: Server, connects: list):
    """The name is resolved once; the connection goes to that address, the Host header keeps the name (no
    second lookup a rebinding DNS could answer differently)."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    fetcher = UrlFetcher(allow=["127.0.0.1"], resolver=rebinding)
    fetched = await fetcher.fetch(f"http://images.test:{png_server.port}/x.png")
    assert fetched.data == PNG
    assert calls == ["images.test"]
    assert connects == [("127.0.0.1", png_server.port)]
    assert f"host: images.test:{png_server.port}".encode() in png_server.requests[0].lower()


async def test_connect_time_check_refuses_an_unvetted_address(connects: list):
    backend = _GuardedBackend(AddressPolicy(), allowed_ips=set())
    for host in ("127.0.0.1", "10.0.0.1", "example.com"):
        with pytest.raises(_Refused):
            await backend.connect_tcp(host, 80)
    assert connects == []


def test_address_policy_is_a_pure_reusable_check():
    policy = AddressPolicy(allow=["10.2.0.0/16"])
    assert policy.check("10.2.3.4") is None
    assert policy.check("10.3.0.1") == "a private address"
    assert policy.check("::ffff:169.254.169.254") is not None
    assert policy.check("2002:7f00:1::") is not None  # 6to4 of 127.0.0.1
    assert policy.check("64:ff9b::a00:1") is not None  # NAT64 of 10.0.0.1
    assert policy.check("8.8.8.8") is None and policy.check("2606:4700:4700::1111") is None


# ------------------------------------------------------------------------- size, time and type limits


async def test_size_cap_is_enforced_while_streaming():
    """An endless chunked body: the fetch ends at the cap instead of reading (and holding) it all."""
    sent = 0

    async def endless(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        nonlocal sent
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        while True:
            w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            await w.drain()

    async with Server(endless) as server:
        fetcher = UrlFetcher(allow=["127.0.0.1"], max_bytes=200_000, timeout=30)
        with pytest.raises(PayloadTooLarge) as info:
            await fetcher.fetch(f"{server.url}/big.png", name="big.png")
    assert info.value.limit == 200_000 and not info.value.retryable


async def test_content_length_over_the_cap_is_refused_before_the_body():
    async def huge(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 400000000\r\n\r\n")
        await w.drain()
        await asyncio.Event().wait()  # never sends the body

    async with Server(huge) as server:
        with pytest.raises(PayloadTooLarge) as info:
            await UrlFetcher(allow=["127.0.0.1"], max_bytes=1000, timeout=30).fetch(f"{server.url}/x")
    assert info.value.size == 400_000_000


async def test_a_trickling_body_ends_at_the_total_time_limit():
    async def trickle(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n")
        while True:  # one byte at a time, each well inside any per-read timeout
            w.write(b"x")
            await w.drain()
            await asyncio.sleep(0.02)

    async with Server(trickle) as server:
        fetcher = UrlFetcher(allow=["127.0.0.1"], timeout=0.3)
        with pytest.raises(InputUnavailable, match="took longer than 0.3 s") as info:
            await fetcher.fetch(f"{server.url}/slow.png", name="slow.png")
    assert info.value.retryable


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json", "text/plain"])
async def test_content_type_is_refused(content_type: str):
    async with Server(ok(b"<html>secret</html>", content_type)) as server:
        with pytest.raises(WorkflowInputError, match="not one of") as info:
            await UrlFetcher(allow=["127.0.0.1"]).fetch(f"{server.url}/x", name="face.png")
    assert "secret" not in str(info.value)


async def test_content_types_are_configurable():
    async with Server(ok(b"{}", "application/json")) as server:
        fetched = await UrlFetcher(allow=["127.0.0.1"], content_types=["application/json"]).fetch(server.url)
    assert fetched.data == b"{}"


# ------------------------------------------------------------------------------ errors of the fetched URL


@pytest.mark.parametrize(("status", "error", "retryable"), [
    (503, InputUnavailable, True), (500, InputUnavailable, True), (429, InputUnavailable, True),
    (404, WorkflowInputError, False), (403, WorkflowInputError, False),
])
async def test_upstream_status(status: int, error: type, retryable: bool):
    async def answer(head: bytes, w: asyncio.StreamWriter, s: Server) -> None:
        w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    async with Server(answer) as server:
        with pytest.raises(error) as info:
            await UrlFetcher(allow=["127.0.0.1"]).fetch(f"{server.url}/x?X-Amz-Signature=s3cr3t", name="a.png")
    assert info.value.retryable is retryable
    assert "s3cr3t" not in str(info.value)  # a presigned URL's signature stays out of messages


async def test_connection_refused_is_retryable():
    server = Server(ok())
    async with server:
        port = server.port
    with pytest.raises(InputUnavailable):
        await UrlFetcher(allow=["127.0.0.1"]).fetch(f"http://127.0.0.1:{port}/x")


@pytest.mark.parametrize("url", ["ht\ntp://x", "http://x\x00y/", "ftp://example.com/x", "file:///etc/passwd",
                                 "/etc/passwd", "", "http://[::1/", "http:///nohost", "http://999999999999/",
                                 "http://0177.0.0.1/x"])
async def test_invalid_urls_are_caller_errors(url: str, connects: list):
    with pytest.raises(WorkflowInputError):
        await UrlFetcher().fetch(url, name="face.png")
    assert connects == []


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, in_tmp: Path):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1, 10.0.0.0/8,bucket.internal")
    monkeypatch.setenv("GPUBRIDGE_FETCH_MAX_BYTES", "1234")
    monkeypatch.setenv("GPUBRIDGE_FETCH_TIMEOUT", "2.5")
    s = FetchSettings.load()
    assert s.allow == ["127.0.0.1", "10.0.0.0/8", "bucket.internal"] and s.max_bytes == 1234
    fetcher = UrlFetcher.from_settings(s)
    assert fetcher.policy.check("10.1.1.1") is None and fetcher.policy.allows_name("bucket.internal")
    assert fetcher.timeout == 2.5


def test_settings_from_toml_table(monkeypatch: pytest.MonkeyPatch, in_tmp: Path):
    (in_tmp / "gpubridge.toml").write_text('provider = "local"\n[fetch]\nmax_redirects = 2\nallow = ["10.0.0.0/8"]\n')
    s = FetchSettings.load()
    assert s.max_redirects == 2 and s.allow == ["10.0.0.0/8"]
    from gpubridge.config import Settings

    assert Settings.load().fetch["max_redirects"] == 2  # the table does not break the main settings


async def test_https_connects_to_the_vetted_address_with_the_name_in_sni_and_certificate(tmp_path: Path, connects: list):
    """TLS to the vetted IP still says and checks the URL's name: SNI is ``images.test`` and the certificate,
    issued for that name only, verifies."""
    pytest.importorskip("cryptography")
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)  # type: ignore[assignment]
    hosts: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hosts.append(await reader.readuntil(b"\r\n\r\n"))
        await ok()(b"", writer, None)  # type: ignore[arg-type]
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        client_ctx = ssl.create_default_context(cadata=pem.decode())
        fetcher = UrlFetcher(allow=["127.0.0.1"], ssl_context=client_ctx,
                             resolver=stub_resolver({"images.test": ["127.0.0.1"]}))
        fetched = await fetcher.fetch(f"https://images.test:{port}/x.png")
    finally:
        server.close()
    assert fetched.data == PNG
    assert sni == ["images.test"] and connects == [("127.0.0.1", port)]
    assert f"host: images.test:{port}".encode() in hosts[0].lower()
