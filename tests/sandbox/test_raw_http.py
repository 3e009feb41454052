"""Bad raw HTTP against both emulators: crafted bytes on a socket, never a hang or a traceback.

Each test opens a socket to one port, sends bytes no well-behaved client library would, reads
the answer with a timeout (a hang fails the test instead of stalling it), checks the status and
that the body is in that vendor's error shape, and then checks that the port still answers an
ordinary request. `capfd` sees the server threads' stderr, where a traceback would land.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from closesync.sandbox import Sandbox, SandboxConfig

# Seconds the sandbox under test waits for a body that does not arrive; short to keep tests fast.
BODY_TIMEOUT = 0.5
# Seconds a test waits for any answer: far above BODY_TIMEOUT, far below a hang.
ANSWER_TIMEOUT = 5.0
APIS = ("calendly", "close")


@dataclass
class Answer:
    """One HTTP answer read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    """A sandbox whose body read timeout is short."""
    config = SandboxConfig(seed=1, users=2, freeze_clock=True, body_read_timeout=BODY_TIMEOUT)
    with Sandbox.start(config) as sandbox:
        yield sandbox


def _port(sb: Sandbox, api: str) -> int:
    base = sb.world.calendly_base if api == "calendly" else sb.world.close_base
    port = urlsplit(base).port
    assert port is not None
    return port


def _read_answer(sock: socket.socket, head: bool = False) -> Answer:
    """Read one answer: status line, headers, then Content-Length bytes (none for HEAD)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without answering: {data!r}"
        data += chunk
    head_part, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("iso-8859-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def _exchange(sb: Sandbox, api: str, *requests: bytes) -> list[Answer]:
    """Send each request on one connection and read its answer (a HEAD's has no body)."""
    with socket.create_connection(("127.0.0.1", _port(sb, api)), timeout=ANSWER_TIMEOUT) as sock:
        answers = []
        for request in requests:
            sock.sendall(request)
            answers.append(_read_answer(sock, head=request.startswith(b"HEAD ")))
        return answers


def _request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _me(sb: Sandbox, api: str) -> bytes:
    """A valid GET of the token owner, as raw bytes."""
    user = sb.users[0]
    if api == "calendly":
        return _request("GET", "/users/me", f"Authorization: Bearer {user.calendly_token}")
    return _request("GET", "/api/v1/me/", f"Authorization: Bearer {user.close_access_token}")


def _post(sb: Sandbox, api: str, *headers: str, body: bytes = b"") -> bytes:
    """A POST to an endpoint that reads a body: Close's upsert, Calendly's token endpoint."""
    if api == "calendly":
        return _request("POST", "/oauth/token", *headers, body=body)
    token = sb.users[0].close_access_token
    return _request(
        "POST",
        "/api/v1/scheduling_link/integration/",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        *headers,
        body=body,
    )


def _assert_vendor_error(api: str, answer: Answer, status: int) -> None:
    """The status, and a JSON body in the vendor's error shape."""
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    if api == "calendly":
        shape = {"title": str, "message": str}
    elif status == 400:
        shape = {"errors": list, "field-errors": dict}
    else:
        shape = {"error": str}
    assert {key: type(body.get(key)) for key in shape} == shape, body
    assert body.get("message", body.get("errors", body.get("error"))), body


def _assert_still_serving(sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The port answers an ordinary request, and no server thread printed a traceback."""
    assert _exchange(sb, api, _me(sb, api))[0].status == 200
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "5, 6"])
def test_raw_content_length_not_a_count_answers_400(
    sb: Sandbox, api: str, length: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A Content-Length that is not one non-negative integer is a vendor-shaped 400."""
    answer = _exchange(sb, api, _post(sb, api, f"Content-Length: {length}", body=b"{}"))[0]
    _assert_vendor_error(api, answer, 400)
    assert answer.headers["connection"] == "close"
    _assert_still_serving(sb, api, capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_content_length_huge_answers_413(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A body claimed far beyond the cap is refused with 413 before anything is read."""
    answer = _exchange(sb, api, _post(sb, api, "Content-Length: 1000000000000000", body=b"{}"))[0]
    _assert_vendor_error(api, answer, 413)
    _assert_still_serving(sb, api, capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_body_shorter_than_content_length_answers_408_after_timeout(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A body that stops short is answered 408 once the read timeout passes, not held forever."""
    started = time.monotonic()
    answer = _exchange(sb, api, _post(sb, api, "Content-Length: 100", body=b'{"na'))[0]
    waited = time.monotonic() - started
    _assert_vendor_error(api, answer, 408)
    assert BODY_TIMEOUT * 0.9 <= waited < ANSWER_TIMEOUT
    _assert_still_serving(sb, api, capfd)


def test_raw_chunked_body_is_read_and_the_connection_stays_usable(
    sb: Sandbox, capfd: pytest.CaptureFixture[str]
) -> None:
    """A chunked upsert body is assembled and accepted; the next request on the socket works."""
    payload = json.dumps(
        {
            "source_id": "chunked_1",
            "name": "Chunked Call",
            "url": "https://calendly.com/ada/chunked",
        }
    ).encode()
    first, second = payload[:10], payload[10:]
    chunks = b"%x;ext=1\r\n%s\r\n%X\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (
        len(first),
        first,
        len(second),
        second,
    )
    upsert = _post(sb, "close", "Transfer-Encoding: chunked", body=chunks)
    created, me = _exchange(sb, "close", upsert, _me(sb, "close"))
    assert created.status == 200, created
    assert (created.json()["source_id"], created.json()["name"]) == ("chunked_1", "Chunked Call")
    assert me.status == 200
    _assert_still_serving(sb, "close", capfd)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"-2\r\n{}\r\n0\r\n\r\n"],
    ids=["size-not-hex", "no-crlf-after-data", "negative-size"],
)
def test_raw_chunked_body_malformed_answers_400(
    sb: Sandbox, api: str, chunks: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    """Broken chunk framing is a vendor-shaped 400 and the connection is closed."""
    answer = _exchange(sb, api, _post(sb, api, "Transfer-Encoding: chunked", body=chunks))[0]
    _assert_vendor_error(api, answer, 400)
    assert answer.headers["connection"] == "close"
    _assert_still_serving(sb, api, capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_chunked_body_that_stops_answers_408_after_timeout(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A chunked body whose last chunk never comes is answered 408 after the read timeout."""
    answer = _exchange(sb, api, _post(sb, api, "Transfer-Encoding: chunked", body=b"5\r\n{}"))[0]
    _assert_vendor_error(api, answer, 408)
    _assert_still_serving(sb, api, capfd)


def test_raw_deeply_nested_json_answers_400_in_close_shape(
    sb: Sandbox, capfd: pytest.CaptureFixture[str]
) -> None:
    """JSON nested past the parser's depth is a Close 400, not a sandbox 500 with a traceback."""
    body = b"[" * 100_000 + b"]" * 100_000
    answer = _exchange(sb, "close", _post(sb, "close", f"Content-Length: {len(body)}", body=body))
    _assert_vendor_error("close", answer[0], 400)
    _assert_still_serving(sb, "close", capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_options_answers_405_with_allow(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """OPTIONS on an API path is a vendor-shaped 405 naming the allowed methods."""
    path = "/users/me" if api == "calendly" else "/api/v1/scheduling_link/"
    answer = _exchange(sb, api, _request("OPTIONS", path))[0]
    _assert_vendor_error(api, answer, 405)
    assert answer.headers["allow"] == ("GET" if api == "calendly" else "GET, POST")
    _assert_still_serving(sb, api, capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_head_answers_405_without_a_body(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """HEAD is a 405 whose headers announce the vendor's JSON error; no body follows."""
    path = "/users/me" if api == "calendly" else "/api/v1/me/"
    head, me = _exchange(sb, api, _request("HEAD", path), _me(sb, api))
    assert head.status == 405
    assert head.headers["content-type"].startswith("application/json")
    assert int(head.headers["content-length"]) > 0
    assert head.headers["allow"] == "GET"
    # Had the 405 carried its body, it would have been read as the start of this answer.
    assert me.status == 200
    _assert_still_serving(sb, api, capfd)


@pytest.mark.parametrize("api", APIS)
def test_raw_unknown_method_answers_501_in_vendor_shape(
    sb: Sandbox, api: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A method no endpoint knows gets the vendor's JSON error, not http.server's HTML page."""
    answer = _exchange(sb, api, _request("BREW", "/users/me"))[0]
    _assert_vendor_error(api, answer, 501)
    _assert_still_serving(sb, api, capfd)
