"""The CLI's query client: an answer it cannot read is a clear error, never a traceback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector._client import QueryClient, UnreadableAnswerError

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


@pytest.fixture
def scripted() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


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
