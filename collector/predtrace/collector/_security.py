"""Request authorization: the scope a route needs, checked against the bearer token.

With a tokens file every request needs a token with the route's scope (401
without one, 403 with the wrong one); without one only loopback clients are
served. Answers never quote the token.
"""

from __future__ import annotations

from aiohttp import web

from predtrace.collector._auth import Scope, TokenEntry, TokenTable, bearer, is_loopback


class AuthRefusal(Exception):
    """A 401/403 answer (internal control flow; the reason never holds a token)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason
        self.outcome = "unauthorized" if status == 401 else "forbidden"

    def response(self) -> web.Response:
        """The HTTP answer."""
        headers = {"WWW-Authenticate": 'Bearer realm="predtrace"'} if self.status == 401 else None
        return web.Response(status=self.status, text=self.reason, headers=headers)


class Authorizer:
    """Checks requests against the token table, or the loopback rule without one."""

    def __init__(self, tokens: TokenTable | None) -> None:
        self.tokens = tokens

    def check(self, request: web.Request, scope: Scope) -> TokenEntry | None:
        """The token entry of an allowed request (None in loopback-only mode).

        Raises:
            AuthRefusal: 401 (no or unknown token) or 403 (scope, non-loopback peer).
        """
        if self.tokens is None:
            if not is_loopback(request.remote):
                raise AuthRefusal(403, "no tokens configured: only loopback clients are served")
            return None
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            raise AuthRefusal(401, "missing bearer token")
        entry = self.tokens.authenticate(token)
        if entry is None:
            raise AuthRefusal(401, "invalid token")
        if not entry.allows(scope):
            raise AuthRefusal(403, f"token lacks the {scope.value} scope")
        return entry
