"""A loopback stand-in for a served model's OpenAI route (KServe's Hugging Face runtime answers
POST /openai/v1/chat/completions): it records each request and answers with `answer`."""

from __future__ import annotations

import json

from .httpjson import JsonHandler, Loopback


class ChatServer(Loopback):
    def __init__(self, answer: str = "I summarize dialogues in one sentence."):
        self.answer = answer
        self.requests: list[tuple[str, dict]] = []
        self.start()

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                if self.path != "/openai/v1/chat/completions":
                    return self._send(404, {"detail": "Not Found"})
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": fake.answer},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                )

        return Handler
