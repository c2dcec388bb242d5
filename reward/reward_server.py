"""`posttrain rm serve`: a reward model behind HTTP, for trainers in other processes or hosts.

POST /score {"prompts": [...], "completions": [...]} -> {"rewards": [...]}; GET /health.
Prompts and completions are strings or chat-message lists, as for any reward function.
Requests are scored one at a time (one model, one device); bad requests get 400 and a reason.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_server(reward_fn, host: str = "127.0.0.1", port: int = 8010) -> ThreadingHTTPServer:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                self._send(404, {"error": f"no route {self.path}; POST /score"})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                completions = request["completions"]
                prompts = request.get("prompts")
                if not isinstance(completions, list) or (prompts is not None and len(prompts) != len(completions)):
                    raise ValueError("completions must be a list, and prompts (if given) of the same length")
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": f"bad request: {e}"})
                return
            try:
                with lock:
                    rewards = reward_fn(prompts=prompts, completions=completions)
            except Exception as e:  # the client gets the reason; the server keeps serving
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, {"rewards": rewards})

        def log_message(self, format, *args):  # quiet: one line per request is noise at RL rates
            pass

    return ThreadingHTTPServer((host, port), Handler)
