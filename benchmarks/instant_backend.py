"""An OpenAI-shaped backend that replies at once, to measure what a proxy adds.

Usage: python benchmarks/instant_backend.py  (prints "listening on URL", serves until killed)
Non-streaming chat returns a fixed reply; streaming chat sends 8 content
chunks, a usage chunk when asked, then [DONE].
"""

import asyncio
import sys

import orjson
from aiohttp import web

MODEL = "bench"
REPLY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello from the instant backend"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16},
    }
)


def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


STREAM = (
    [chunk({"role": "assistant", "content": ""})]
    + [chunk({"content": f"tok{i} "}) for i in range(8)]
    + [chunk({}, "stop")]
)
USAGE_CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
        }
    )
    + b"\n\n"
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=REPLY, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in STREAM:
        await response.write(event)
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(USAGE_CHUNK)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    listing = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
    return web.Response(body=orjson.dumps(listing), content_type="application/json")


async def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
