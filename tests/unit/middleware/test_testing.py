"""The public test helpers: call_asgi gives the app what a real server would."""

from __future__ import annotations

from typing import Any

from predtrace.middleware.testing import call_asgi


async def test_call_asgi_gives_the_app_the_decoded_path_and_the_raw_one() -> None:
    # Servers (uvicorn) percent-decode ``path`` and keep ``raw_path`` as sent.
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(path=scope["path"], raw_path=scope["raw_path"], query=scope["query_string"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    response = await call_asgi(app, "POST", "/v2/models/my%20model/infer?a=%20")
    assert response.status == 204
    assert seen == {
        "path": "/v2/models/my model/infer",
        "raw_path": b"/v2/models/my%20model/infer",
        "query": b"a=%20",
    }
