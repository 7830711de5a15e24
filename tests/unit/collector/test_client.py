"""The CLI's query client: an answer it cannot read is a clear error, never a traceback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector._client import (
    CollectorUnreachableError,
    QueryClient,
    UnreadableAnswerError,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ANSWERS: dict[str, tuple[bytes, int | None]] = {
    # path -> (body, Content-Length when it is not the body's length)
    "/big": (b'{"predictions": [' + b'"x", ' * 1000 + b'"x"]}', None),
    "/garbled": (b'{"predictions": [{"prediction_id": "p1", "lin', None),
    "/cut": (b'{"predictions": []', 4096),  # the server hangs up 4 KiB short
    "/hangup": (b"", 4096),  # ... before the first byte of the body
    "/chunked": (b"1000\r\n" + b"x" * 100, 0),  # a chunk cut short (0: chunked)
}


class _Scripted(BaseHTTPRequestHandler):
    """Answers 200 with the scripted body of the path (or of /garbled)."""

    def do_GET(self) -> None:
        body, length = ANSWERS.get(self.path, ANSWERS["/garbled"])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if length == 0:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length or len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the client's side."""


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 port 0 answering with ``handler``; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def scripted() -> Iterator[str]:
    with _serving(_Scripted) as url:
        yield url


def test_an_answer_larger_than_the_client_reads_is_an_error_not_a_cut_body(scripted: str) -> None:
    client = QueryClient(scripted, max_answer_bytes=1000)
    with pytest.raises(UnreadableAnswerError, match="larger than 1000 bytes"):
        client.get("/big")
    fits = QueryClient(scripted, max_answer_bytes=len(ANSWERS["/big"][0]))
    assert len(fits.get("/big").body["predictions"]) == 1001


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/garbled", "not JSON"),
        ("/cut", "not JSON"),
        ("/hangup", "not JSON"),
        ("/chunked", "could not be read: IncompleteRead"),
    ],
)
def test_an_answer_cut_short_or_garbled_is_an_error_naming_why(
    scripted: str, path: str, reason: str
) -> None:
    with pytest.raises(UnreadableAnswerError, match=reason):
        QueryClient(scripted).get(path)


def test_trace_prints_an_unreadable_answer_as_an_error_and_exits_1(scripted: str) -> None:
    result = CliRunner().invoke(main, ["trace", TRACE], env={"PREDTRACE_COLLECTOR_URL": scripted})
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "predtrace: the collector answered 200 with a body that is not JSON" in result.stderr
    assert "Traceback" not in result.stderr


class _Busy(BaseHTTPRequestHandler):
    """POST: answers the scripted statuses in turn (then 201), counting the bodies it got."""

    script: ClassVar[list[tuple[int, str | None]]] = []
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        _Busy.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        status, retry_after = _Busy.script.pop(0) if _Busy.script else (201, None)
        body = b'{"error": "busy"}' if status >= 400 else b'{"registered": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the client's side."""


@pytest.fixture
def busy() -> Iterator[str]:
    _Busy.script, _Busy.bodies = [], []
    with _serving(_Busy) as url:
        yield url


def test_a_busy_or_restarting_collector_is_retried_with_the_same_body(busy: str) -> None:
    _Busy.script = [(503, "0"), (429, None), (502, None), (504, "0")]
    said: list[tuple[str, float]] = []
    client = QueryClient(busy, retry_for=60, on_retry=lambda r, w: said.append((r, w)))
    answer = client.post("/v1/lineage", {"model": {"name": "m", "version": "1"}})
    assert answer.status == 201
    assert len(_Busy.bodies) == 5 and len(set(_Busy.bodies)) == 1
    assert [reason.split(":")[0] for reason, _ in said] == [
        f"collector answered {code}" for code in (503, 429, 502, 504)
    ]
    assert all(0 <= wait <= 8 for _, wait in said)


@pytest.mark.parametrize(
    ("script", "retry_for", "requests"),
    [
        ([(503, "0")], 0, 1),  # --retry-for 0: fail at once
        ([(503, "3600")], 5, 1),  # asked to wait past the budget: give up now, not in an hour
        ([(500, None)], 60, 1),  # a server error is not a come-back-later
    ],
)
def test_a_collector_that_will_not_answer_in_time_fails_at_once_with_its_reason(
    busy: str, script: list[tuple[int, str | None]], retry_for: float, requests: int
) -> None:
    _Busy.script = list(script)
    client = QueryClient(busy, retry_for=retry_for)
    with pytest.raises(CollectorUnreachableError, match=f"collector answered {script[0][0]}: busy"):
        client.post("/v1/lineage", {})
    assert len(_Busy.bodies) == requests


def test_a_refusal_is_answered_not_retried(busy: str) -> None:
    _Busy.script = [(409, None)]
    answer = QueryClient(busy, retry_for=60).post("/v1/lineage", {})
    assert answer.status == 409 and len(_Busy.bodies) == 1


def test_register_says_it_retries_and_succeeds_when_the_collector_comes_back(busy: str) -> None:
    _Busy.script = [(503, "0"), (503, "0")]
    args = ["lineage", "register", "--model", "churn/3", "--run-id", "r-1"]
    result = CliRunner().invoke(main, [*args, "--collector", busy, "--retry-for", "30"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "registered"
    assert result.stderr.count("predtrace: collector answered 503: busy; retrying in") == 2
    _Busy.script = [(503, "0")]
    failed = CliRunner().invoke(main, [*args, "--collector", busy, "--retry-for", "0"])
    assert failed.exit_code == 1
    assert "predtrace: collector answered 503: busy" in failed.stderr
    bad = CliRunner().invoke(main, [*args, "--collector", busy, "--retry-for", "nan"])
    assert bad.exit_code == 2 and "retry time" in bad.stderr


class _Other(BaseHTTPRequestHandler):
    """Another JSON service: 200 and an answer of its own shape to every GET."""

    def do_GET(self) -> None:
        body = b'{"status": "ok", "predictions": [{"id": 1}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the client's side."""


@pytest.mark.parametrize(
    "command",
    [
        ["completeness"],
        ["impact", "--dataset", "sha256:d"],
        ["model", "lineage", "churn/3"],
        ["trace", TRACE],
        ["trace", TRACE, "-o", "json"],
    ],
)
def test_an_answer_from_another_json_service_is_an_error_not_a_traceback(
    command: list[str],
) -> None:
    with _serving(_Other) as url:
        result = CliRunner().invoke(main, [*command, "--collector", url])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "predtrace: the answer is not" in result.stderr


def test_a_token_read_with_its_newline_works_and_a_bad_one_is_refused_unquoted(
    busy: str,
) -> None:
    args = ["lineage", "register", "--model", "churn/3", "--collector", busy]
    ok = CliRunner().invoke(main, args, env={"PREDTRACE_TOKEN": "pt_secret\n"})
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, args, env={"PREDTRACE_TOKEN": "pt_se cret\x01"})
    assert bad.exit_code == 2
    assert "token holds spaces, control or non-ASCII characters" in bad.stderr
    assert "pt_se" not in bad.output and "Traceback" not in bad.output


def test_register_refuses_options_beside_a_file_instead_of_ignoring_them(tmp_path: Path) -> None:
    body = tmp_path / "reg.json"
    body.write_text('{"model": {"name": "m", "version": "1"}}')
    args = ["lineage", "register", "--file", str(body), "--model", "x/1", "--alias", "prod"]
    result = CliRunner().invoke(main, [*args, "--collector", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "put --alias, --model in the file instead" in result.stderr


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8700?x=1", "http://127.0.0.1:8700/#top", "127.0.0.1:8700"]
)
def test_a_collector_url_with_a_query_or_no_scheme_is_a_usage_error(url: str) -> None:
    # With a query, every path the CLI appended landed in it: a foreign 404
    # read as "no prediction found".
    result = CliRunner().invoke(main, ["trace", TRACE, "--collector", url])
    assert result.exit_code == 2
    assert "collector URL must be http(s)://host[:port]" in result.stderr


class _Redirecting(BaseHTTPRequestHandler):
    """Answers every request 302 to /elsewhere, which answers 200 JSON (and keeps what came)."""

    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path == "/elsewhere":
            body = b'{"registered": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(302)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the client's side."""


def test_a_redirect_is_not_followed_nor_the_token_sent_on() -> None:
    # urllib turned the POST into a GET to the new place, which answered 200:
    # `lineage register` printed "registered" for nothing stored, and the
    # token went along.
    _Redirecting.seen.clear()
    with _serving(_Redirecting) as url:
        result = CliRunner().invoke(
            main,
            [
                "lineage", "register", "--collector", url, "--token", "pt_SECRET",
                "--model", "churn/1", "--run-id", "r1",
            ],
        )  # fmt: skip
        with pytest.raises(CollectorUnreachableError, match="a redirect to /elsewhere"):
            QueryClient(url).get("/v1/traces/" + TRACE)
    assert result.exit_code == 1, result.output
    assert "redirect to /elsewhere (not followed)" in result.output
    assert "is " + url + " the collector's base URL?" in result.output
    assert [path for _, path, _ in _Redirecting.seen] == ["/v1/lineage", "/v1/traces/" + TRACE]


def test_https_to_a_plain_http_collector_says_so(scripted: str) -> None:
    # Was the bare "[SSL: WRONG_VERSION_NUMBER]".
    with pytest.raises(CollectorUnreachableError) as raised:
        QueryClient(scripted.replace("http://", "https://"), timeout=5).get("/big")
    assert "is the collector serving plain HTTP? then use http://" in str(raised.value)
