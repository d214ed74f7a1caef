"""`HeadAsGet`: HEAD is GET without the body (RFC 9110 §9.3.2), on every path.

FastAPI's routes answer only the methods they declare, so `curl -I /healthz` was a 405
although the access table judges HEAD as GET. Outermost: the request goes on as a GET (a
copy of the scope, so the server's own log still says HEAD), and whatever answers it, a
refusal at the gate included, is sent with its status and headers (Content-Length the
GET's) but no body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the GET's body, dropped
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
