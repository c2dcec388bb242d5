"""The OpenAI-compatible HTTP engine against local servers: healthy, failing, slow, stingy."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.engines import SamplingConfig
from posttrain.engines.openai_engine import EngineRequestError, OpenAIEngine


class Scripted:
    """A responder: the reply text names the prompt and the seed, so duplicates and mix-ups show."""

    def __init__(self, fail_every: int = 0, delay_s: float = 0.0, max_choices: int | None = None, status: int = 500):
        self.fail_every, self.delay_s, self.max_choices, self.status = fail_every, delay_s, max_choices, status
        self.calls = 0
        self.lock = threading.Lock()
        self.bodies = []

    def __call__(self, path: str, body: dict):
        with self.lock:
            self.calls += 1
            call = self.calls
            self.bodies.append(body)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_every and call % self.fail_every == 0:
            return self.status, {"error": "try again"}
        chat = path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n = min(body.get("n", 1), self.max_choices or body.get("n", 1))
        choices = []
        for i in range(n):
            text = f"answer to {prompt} seed {body['seed']} choice {i}"
            choice = {"index": i, "finish_reason": "stop", "token_ids": list(text.encode())[:20]}  # as vLLM returns them
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        return 200, {"id": f"r{call}", "choices": choices}


@pytest.fixture
def serve():
    servers = []

    def start(responder):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = responder(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


PROMPTS = [[{"role": "user", "content": f"problem {i}"}] for i in range(24)]


def _check_complete(out, n):
    assert len(out) == len(PROMPTS)
    for i, samples in enumerate(out):
        assert len(samples) == n
        texts = [s.text for s in samples]
        assert all(t.startswith(f"answer to problem {i} ") for t in texts)
        assert len(set(texts)) == n  # no duplicates


def test_healthy_server_concurrent_and_ordered(serve):
    responder = Scripted()
    engine = OpenAIEngine(serve(responder), "teacher", concurrency=6)
    out = engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=5), seeds=list(range(24)))
    _check_complete(out, 2)
    assert responder.calls == 24 and responder.bodies[0]["model"] == "teacher"


@pytest.mark.parametrize("status", [500, 429, 503])
def test_failing_server_is_retried_to_completion(serve, status):
    responder = Scripted(fail_every=3, status=status)
    engine = OpenAIEngine(serve(responder), "teacher", concurrency=4, backoff_s=0.01)
    out = engine.generate(PROMPTS, SamplingConfig(n=2))
    _check_complete(out, 2)
    assert engine.stats["retries"] >= 24 // 3 - 1


def test_slow_server_with_rate_limit(serve):
    responder = Scripted(delay_s=0.2)
    engine = OpenAIEngine(serve(responder), "teacher", concurrency=8, requests_per_s=40)
    t0 = time.monotonic()
    out = engine.generate(PROMPTS, SamplingConfig(n=1))
    elapsed = time.monotonic() - t0
    _check_complete(out, 1)
    assert elapsed >= 23 / 40  # the rate limit held
    assert elapsed < 24 * 0.2  # and requests overlapped


def test_server_returning_fewer_choices_is_asked_again(serve):
    responder = Scripted(max_choices=1)
    engine = OpenAIEngine(serve(responder), "teacher", concurrency=4)
    out = engine.generate(PROMPTS[:5], SamplingConfig(n=3))
    assert [len(s) for s in out] == [3] * 5
    assert all(len({x.text for x in s}) == 3 for s in out)  # each round used a fresh seed
    assert responder.calls == 15


def test_string_prompts_use_completions_and_bad_requests_fail_fast(serve):
    url = serve(Scripted())
    out = OpenAIEngine(url, "m").generate(["two plus two"], SamplingConfig())
    assert out[0][0].text.startswith("answer to two plus two")
    bad = OpenAIEngine(serve(lambda path, body: (400, {"error": "bad"})), "m", backoff_s=0.01)
    with pytest.raises(EngineRequestError, match="HTTP 400"):
        bad.generate(["x"], SamplingConfig())
    dead = OpenAIEngine("http://127.0.0.1:9", "m", max_retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(EngineRequestError, match="gave up after 3 attempts"):
        dead.generate(["x"], SamplingConfig())


def test_generate_stage_rejects_only_the_prompts_a_server_refuses(serve, tmp_path):
    """One prompt the server answers with HTTP 400 goes to the errors file; the rest are generated."""
    from data_recipes.prompt_sets import PromptRecord
    from posttrain.stages.distill_generate import generate, iter_generated

    healthy = Scripted()

    def responder(path, body):
        if "poison" in body["messages"][-1]["content"]:
            return 400, {"error": "context length exceeded"}
        return healthy(path, body)

    engine = OpenAIEngine(serve(responder), "teacher", backoff_s=0.01)
    prompts = [PromptRecord(f"p{i}", "poison" if i == 3 else f"question {i}") for i in range(6)]
    summary = generate(prompts, engine, SamplingConfig(n=2), tmp_path, chunk_size=4, progress=False)
    assert summary["samples"] == 10 and summary["engine_errors"] == 1
    assert {r["prompt_id"] for r in iter_generated(tmp_path)} == {"p0", "p1", "p2", "p4", "p5"}
    errors = (tmp_path / "shards" / "errors-00000.jsonl").read_text()
    assert '"p3"' in errors and "HTTP 400" in errors


def test_completion_token_ids_come_from_the_server_or_the_tokenizer_or_a_clear_error(serve):
    from posttrain.embedded import build_tokenizer

    out = OpenAIEngine(serve(Scripted()), "m").generate(["two"], SamplingConfig())
    assert out[0][0].token_ids == list(out[0][0].text.encode())[:20]

    def no_ids(path, body):
        return 200, {"choices": [{"index": 0, "finish_reason": "stop", "text": "four"}]}

    tok = build_tokenizer()
    out = OpenAIEngine(serve(no_ids), "m", tokenizer=tok).generate(["two"], SamplingConfig())
    assert out[0][0].token_ids == tok("four", add_special_tokens=False)["input_ids"]
    with pytest.raises(EngineRequestError, match="no token ids"):
        OpenAIEngine(serve(no_ids), "m").generate(["two"], SamplingConfig())
