"""The thinnest Starlette + Hypercorn proxy: forwards every POST to one upstream, nothing else.

Usage: python benchmarks/passthrough.py UPSTREAM_URL --client aiohttp|httpx
It is the baseline SOLLOL's overhead is measured against, and the harness
for choosing SOLLOL's upstream HTTP client.
"""

import argparse

import aiohttp
import httpx
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sollol.server import base_url_of, bind_socket


def aiohttp_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None

    async def forward(request: Request) -> Response:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        reply = await session.post(
            upstream + request.url.path,
            data=await request.body(),
            headers={"Content-Type": "application/json"},
        )
        if reply.content_type == "text/event-stream":

            async def relay():
                async with reply:
                    async for piece in reply.content.iter_any():
                        yield piece

            return StreamingResponse(relay(), media_type="text/event-stream")
        async with reply:
            return Response(await reply.read(), reply.status, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", forward, methods=["POST"])])


def httpx_app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256), timeout=60)

    async def forward(request: Request) -> Response:
        outgoing = client.build_request(
            "POST",
            upstream + request.url.path,
            content=await request.body(),
            headers={"Content-Type": "application/json"},
        )
        reply = await client.send(outgoing, stream=True)
        if reply.headers.get("content-type", "").startswith("text/event-stream"):

            async def relay():
                try:
                    async for piece in reply.aiter_raw():
                        yield piece
                finally:
                    await reply.aclose()

            return StreamingResponse(relay(), media_type="text/event-stream")
        body = await reply.aread()
        await reply.aclose()
        return Response(body, reply.status_code, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", forward, methods=["POST"])])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    args = parser.parse_args()
    app = (aiohttp_app if args.client == "aiohttp" else httpx_app)(args.upstream.rstrip("/"))
    sock = bind_socket("127.0.0.1", 0)
    print(f"listening on {base_url_of(sock)}", flush=True)
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    await serve(app, config)  # type: ignore[arg-type]


if __name__ == "__main__":
    uvloop.run(main())
