"""Locust users for SOLLOL's OpenAI endpoints.

Run against a running router, for example the demo:

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless --users 8 --spawn-rate 4 --run-time 30s

SOLLOL_CHAT_MODEL and SOLLOL_EMBEDDING_MODEL name the models (defaults: the
demo's ``tiny`` and ``tiny-embed``). Streaming requests are timed to the last
byte, and a stream that does not end in ``data: [DONE]`` counts as a failure.
"""

import os

from locust import HttpUser, between, task

CHAT_MODEL = os.environ.get("SOLLOL_CHAT_MODEL", "tiny")
EMBEDDING_MODEL = os.environ.get("SOLLOL_EMBEDDING_MODEL", "tiny-embed")
MESSAGES = [{"role": "user", "content": "Write one short sentence about load balancing."}]


class ChatUser(HttpUser):
    wait_time = between(0.0, 0.2)

    @task(3)
    def chat(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 16}
        self.client.post("/v1/chat/completions", json=body, name="chat")

    @task(3)
    def chat_stream(self) -> None:
        body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True}
        with self.client.post(
            "/v1/chat/completions", json=body, name="chat stream", stream=True, catch_response=True
        ) as response:
            content = b"".join(response.iter_content(chunk_size=None))
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            elif not content.endswith(b"data: [DONE]\n\n"):
                response.failure("stream did not end with data: [DONE]")

    @task(2)
    def completion(self) -> None:
        body = {"model": CHAT_MODEL, "prompt": "The router", "max_tokens": 16}
        self.client.post("/v1/completions", json=body, name="completion")

    @task(1)
    def embedding(self) -> None:
        body = {"model": EMBEDDING_MODEL, "input": ["first text", "second text"]}
        self.client.post("/v1/embeddings", json=body, name="embedding")
