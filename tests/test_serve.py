"""`kvjax serve` end to end: a real server process on the bundled text model, real clients.

One server (`python -m kvjax.cli serve --model text`, a subprocess on a free port, with an
API key) serves the whole module; the official `openai` client and raw HTTP (httpx) talk
to it. Oracles: `kvjax generate` run in this process (its printed text, plain and --chat),
and `kvjax.forward` for log-probabilities. The last test stops the server with SIGTERM
while a stream is in flight and checks the stream completes and the process exits 0.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvjax.bundled import bundled_path, load_bundled

KEY = "test-key-123"
CONTEXT = 160            # --max-len
MAX_BYTES = 65536        # --max-request-bytes
SLOTS = 8                # --max-slots (the server compiles programs for batch buckets 1, 2, 4, 8)
N_NEW = 24               # max_tokens of the exactness checks
LONG = 110               # max_tokens of streams meant to be in flight (prompt + LONG <= 128:
                         # the engine's narrowest attention view, so no extra compilation)
# the first two are checked against `kvjax generate` (same length: its programs compile once)
PROMPTS = ["def foo(", "class A(", "import os\n", "Return the"]
CHAT = "What is a list?"
REQUEST_TIMEOUT = 3      # --request-timeout: headers, then the body, must arrive within this
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return Path(self.log).read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "kvjax.cli", "serve", "--model", "text", "--port", str(port),
           "--max-len", str(CONTEXT), "--max-slots", str(SLOTS), "--api-key", KEY,
           "--max-request-bytes", str(MAX_BYTES), "--log-level", "warning",
           "--request-timeout", str(REQUEST_TIMEOUT), "--warmup", "basic", "--compilation-cache", "none"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def oracle():
    """What `kvjax generate` prints for each prompt (run here while the server starts)."""
    from kvjax.cli import main

    folder = str(bundled_path("text"))
    out = {}
    for p in PROMPTS[:2]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            rc = main(["generate", "--model", folder, "--max-new-tokens", str(N_NEW),
                       "--timing", "first", "--prompt", p])
        assert rc == 0
        text = buf.getvalue()
        assert text.endswith("\n")
        out[p] = text[:-1]              # print() adds one newline
    return out


@pytest.fixture(scope="module")
def model():
    return load_bundled("text")


ECHO_CONTEXT, ECHO_CONTINUATION = "def f(x):", " x"


@pytest.fixture(scope="module")
def echo_reference(model):
    """Token ids of the scored text and log p(id_i | ids_<i) from `kvjax.forward`."""
    from kvjax import forward

    cfg, params, tok = model
    context = tok.encode(ECHO_CONTEXT)
    ids = context + tok.encode(ECHO_CONTINUATION, add_special_tokens=False)
    logits = np.asarray(forward(cfg, params, np.asarray([ids], np.int32))[0], np.float64)
    lsm = logits - logits.max(-1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
    return context, ids, np.array([lsm[i - 1, ids[i]] for i in range(1, len(ids))]), lsm


@pytest.fixture(scope="module")
def ready(server, oracle, echo_reference):
    """The server once /health answers (the oracles were computed meanwhile)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"kvjax serve exited with {server.proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"kvjax serve did not become healthy:\n{server.output()}")


@pytest.fixture(scope="module")
def client(ready):
    return openai.OpenAI(base_url=ready.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(ready):
    with httpx.Client(base_url=ready.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _sse_events(lines) -> list:
    """The `data:` payloads of a server-sent-event stream, [DONE] included as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _metrics(http) -> dict:
    """{(name, frozenset(labels)): value} from /metrics."""
    text = http.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# ---------------------------------------------------------------- basics and exactness
def test_health_and_models(ready, client):
    assert httpx.get(ready.url + "/health").json() == {"status": "ok"}   # no key needed
    ids = [m.id for m in client.models.list().data]
    assert ids == ["text"]


def test_completion_equals_kvjax_generate(client, oracle, model):
    _, _, tok = model
    for p in PROMPTS[:2]:
        r = client.completions.create(model="text", prompt=p, max_tokens=N_NEW, temperature=0)
        assert r.choices[0].text == oracle[p]
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(tok.encode(p))
        assert 1 <= r.usage.completion_tokens <= N_NEW
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # several prompts in one request (as harnesses batch them): one choice each, in order
    r = client.completions.create(model="text", prompt=PROMPTS[:2], max_tokens=N_NEW, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [oracle[p] for p in PROMPTS[:2]]


def test_stream_concatenates_to_the_answer(client, http, oracle):
    p = PROMPTS[0]
    chunks = list(client.completions.create(model="text", prompt=p, max_tokens=N_NEW,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == oracle[p]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # raw SSE: JSON chunks, usage on the last one, then data: [DONE]
    with http.stream("POST", "/v1/completions", json={
            "model": "text", "prompt": p, "max_tokens": N_NEW, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == oracle[p]


def test_chat_uses_the_chat_template(client, http, model):
    # the answer to the messages is the completion of the template's rendering of them (the
    # ids `kvjax generate --chat` decodes from); completions equal `kvjax generate` above
    _, _, tok = model
    messages = [{"role": "user", "content": CHAT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    plain = client.completions.create(model="text", prompt=ids, max_tokens=N_NEW, temperature=0)
    r = client.chat.completions.create(model="text", messages=messages, max_tokens=N_NEW,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == plain.choices[0].text
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="text", messages=messages,
                                                 max_tokens=N_NEW, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == ids


def test_stop_strings(client, http, oracle):
    answer = oracle[PROMPTS[0]]
    stop = answer[6:9]
    expected = answer[:answer.find(stop)]
    r = client.completions.create(model="text", prompt=PROMPTS[0], max_tokens=N_NEW,
                                  temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="text", prompt=PROMPTS[0], max_tokens=N_NEW,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


# ---------------------------------------------------------------- logprobs / echo (lm-eval)
def test_echo_logprobs_score_the_prompt(http, model, echo_reference):
    _, _, tok = model
    context, ids, ref, lsm = echo_reference
    greedy = int(lsm[-1].argmax())
    # what lm-eval's local-completions sends for log-likelihoods
    body = {"model": "text", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], ref, atol=2e-4)
    assert lp["tokens"][-1] == tok.decode([greedy])           # the one new token: greedy
    np.testing.assert_allclose(lp["token_logprobs"][-1], lsm[-1].max(), atol=2e-4)
    for tl, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= tl - 1e-6
    assert choice["text"].startswith(tok.decode(ids))          # echo: the prompt, then the answer
    # lm-eval's parse_logprobs: the continuation's log-likelihood
    ctxlen = len(context)
    assert math.isclose(sum(lp["token_logprobs"][ctxlen:-1]), ref[ctxlen - 1:].sum(), abs_tol=1e-3)
    # max_tokens 0 with echo: the prompt's scores only, nothing generated
    r = http.post("/v1/completions", json={**body, "max_tokens": 0, "prompt": ids})
    out = r.json()
    assert r.status_code == 200, r.text
    assert out["choices"][0]["text"] == tok.decode(ids)
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(ids)


def test_generated_logprobs(http, model):
    _, _, tok = model
    ids = tok.encode(ECHO_CONTEXT)     # echo + logprobs like above: the same compiled programs
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0,
                                            "logprobs": 3, "echo": True})
    out = r.json()
    lp, n = out["choices"][0]["logprobs"], out["usage"]["completion_tokens"]
    assert len(lp["token_logprobs"]) == len(ids) + n
    generated = slice(len(ids), None)
    for tl, top in zip(lp["token_logprobs"][generated], lp["top_logprobs"][generated]):
        assert len(top) == 3 and math.isclose(tl, max(top.values()), abs_tol=1e-5)   # greedy
    new = [t for t in lp["tokens"][generated] if t != "<eos>"]          # ASCII answers here
    assert out["choices"][0]["text"] == tok.decode(ids) + "".join(new)
    assert lp["tokens"][0] == "<bos>" and lp["text_offset"] == [0] + list(range(len(ids) - 1 + n))


# ---------------------------------------------------------------- concurrency
def test_sixteen_concurrent_requests(client, http, oracle):
    def text(p):
        r = client.completions.create(model="text", prompt=p, max_tokens=N_NEW, temperature=0)
        return r.choices[0].text

    # exactness with 16 requests in flight: each answer is the one it gets alone
    solo = {p: text(p) for p in PROMPTS[2:]}
    expect = {**{p: oracle[p] for p in PROMPTS[:2]}, **solo}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(text, prompts)) == [expect[p] for p in prompts]

    # speed: 16 at once against the same 16 one after the other, timed in a round without
    # compilations (a new batch shape compiles once; such a round is repeated)
    def one(p):
        r = http.post("/v1/completions", json={"prompt": p, "max_tokens": LONG - 16,
                                               "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    def compilations():
        return _metrics(http)[("kvjax_engine_compilations", frozenset())]

    rounds = []              # (together / serial, together, serial) of compile-free rounds
    for attempt in range(3):  # a shared CPU is noisy: the best of up to 3 rounds counts
        t = time.perf_counter()
        for p in prompts:
            one(p)
        serial = time.perf_counter() - t
        before = compilations()
        with ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            list(pool.map(one, prompts))
            together = time.perf_counter() - t
        if compilations() == before:
            rounds.append((together / serial, together, serial))
            if min(rounds)[0] < 0.75:
                break
    # Batched, 16 at once take 0.46-0.67 of the serial time on the 2-core CI VM (session 11:
    # the old 0.5 bound failed on noise alone); without batching the ratio is about 1.
    assert rounds and min(rounds)[0] < 0.75, \
        f"16 concurrent requests vs one after the other (ratio, s, s): {rounds}"


# ---------------------------------------------------------------- bad requests
BAD = [  # (id, path, raw body or JSON, status, param)
    ("malformed-json", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, None),
    ("max_tokens-string", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature-string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("prompt-number", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("stream-string", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("max_tokens-zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens-negative", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens-beyond-context", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400,
     "max_tokens"),
    ("prompt-beyond-context", "/v1/completions", {"prompt": "x" * (CONTEXT + 10)}, 400, "prompt"),
    ("temperature-negative", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400,
     "temperature"),
    ("unknown-model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 2, 100000]}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("best_of-below-n", "/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("logit_bias-not-a-token", "/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("presence_penalty-3", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, 400, "presence_penalty"),
    ("top_p-zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat-bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
     400, "messages.0.role"),
    ("chat-messages-string", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat-unknown-model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("oversized-body", "/v1/completions", {"prompt": "x" * (MAX_BYTES + 1000)}, 413, None),
    # once: past int32 in the engine's sampling arrays, failing every request in flight
    ("top_k-2**31", "/v1/completions", {"prompt": "x", "temperature": 1, "top_k": 2**31}, 400, "top_k"),
    ("top_k-2**63", "/v1/completions", {"prompt": "x", "temperature": 1, "top_k": 2**63}, 400, "top_k"),
    ("temperature-underflows", "/v1/completions", {"prompt": "x", "temperature": 1e-30}, 400, "temperature"),
    # once HTTP 500s: a lone surrogate (valid JSON, not valid Unicode), 10,000-deep nesting
    ("lone-surrogate", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("tokenize-lone-surrogate", "/tokenize", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("chat-lone-surrogate", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages.0.content"),
    ("deep-nesting", "/v1/completions", b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, None),
    ("nesting-past-limit", "/v1/completions", b'{"prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}",
     400, None),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["param"] == param
    # the server stays up and serves the next request normally
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_hostile_request_beside_streams_and_no_thread_per_request(ready, http, oracle):
    """Four streams in flight, then hostile requests: each gets its 400 and the streams finish
    with exactly their answers. The server holds no OS thread per request in flight."""
    def threads() -> int:
        status = Path(f"/proc/{ready.proc.pid}/status").read_text()
        return int(status.split("Threads:")[1].split()[0])

    def stream(p):
        with http.stream("POST", "/v1/completions", json={"prompt": p, "max_tokens": N_NEW, "temperature": 0,
                                                          "stream": True}) as r:
            return "".join(e["choices"][0]["text"] for e in _sse_events(r.iter_lines()) if e != "[DONE]")

    idle = threads()
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream, PROMPTS[i % 2]) for i in range(4)]
        time.sleep(0.3)
        busy = threads()
        for body in ({"prompt": "x", "temperature": 1, "top_k": 2**63}, {"prompt": [0] * 20000}):
            assert http.post("/v1/completions", json=body).status_code == 400
        assert [f.result() for f in streams] == [oracle[PROMPTS[i % 2]] for i in range(4)]
    assert busy - idle < 4, (idle, busy)


def test_slow_clients_are_cut_off(ready):
    """Headers that never end: the connection is closed after --request-timeout; a body that
    never ends: 408. Neither holds the server (the SIGTERM test below drains)."""
    port = int(ready.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.settimeout(REQUEST_TIMEOUT * 5)
        t = time.perf_counter()
        assert s.recv(1024) == b""                      # closed by the server
        assert time.perf_counter() - t < REQUEST_TIMEOUT * 3
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        s.settimeout(REQUEST_TIMEOUT * 5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")


def _fake_app(**kw):
    """create_app on an engine stand-in whose queue holds `waiting` requests (gate and
    admission tests: nothing reaches an engine)."""
    from kvjax.serve.app import create_app
    from kvjax.tokenizer import ByteTokenizer

    class Queued:
        def __init__(self, waiting):
            self.n = waiting

        def waiting(self):
            return self.n

        def submit(self, *a):
            raise AssertionError("the request reached the engine")

        def stats(self):
            return {"waiting": self.n}

    waiting = kw.pop("waiting", 0)
    return create_app(Queued(waiting), ByteTokenizer(), "m", context=64, vocab_size=260, **kw)


def test_server_without_api_key_answers_only_local_json_requests():
    """Without an API key: Host/Origin outside the allowed hosts -> 403 (DNS rebinding, a web
    page driving a local server), a POST body that is not JSON -> 415; loopback names pass."""
    from starlette.testclient import TestClient

    local = TestClient(_fake_app(), base_url="http://127.0.0.1:8000")
    assert local.get("/v1/models").status_code == 200
    assert local.get("/v1/models", headers={"Origin": "http://localhost:3000"}).status_code == 200
    for headers in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}, {"Origin": "null"}):
        r = local.get("/v1/models", headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    r = local.post("/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    anywhere = TestClient(_fake_app(allowed_hosts=("*",)), base_url="http://evil.example")
    assert anywhere.get("/v1/models").status_code == 200
    keyed = TestClient(_fake_app(api_key="k"), base_url="http://evil.example")   # the key guards it
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_full_queue_answers_429_with_retry_after():
    from starlette.testclient import TestClient

    client = TestClient(_fake_app(waiting=8, max_waiting=8), base_url="http://127.0.0.1")
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "server_busy"
    metrics = client.get("/metrics").text
    assert 'kvjax_requests_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'kvjax_http_requests_total{route="/v1/completions",status="429"} 1.0' in metrics


def test_oversized_chunked_body_and_unknown_route(http):
    r = http.post("/v1/completions", content=(b"x" * 8192 for _ in range(10)),
                  headers={"content-type": "application/json"})   # no Content-Length: chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "message" in r.json()["error"]
    assert http.get("/v1/completions").status_code == 405


def test_api_key(ready):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(ready.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(ready.url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=ready.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_tokenizer_routes(http):
    assert http.post("/tokenize", json={"prompt": "<bos>ab", "add_special_tokens": False}
                     ).json()["tokens"] == [257, 97, 98]
    assert http.post("/detokenize", json={"tokens": [104, 105, 258]}).json() == {"prompt": "hi"}
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>"


# ---------------------------------------------------------------- disconnect, metrics
def _wait_for(fn, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    return fn()


def test_disconnect_cancels_the_request(http):
    def engine(m, key):
        return m[(f"kvjax_engine_{key}", frozenset())]

    before = _metrics(http)
    max_tokens = LONG
    with http.stream("POST", "/v1/completions", json={
            "prompt": "class", "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))   # the stream has begun
    # the connection is closed: the engine aborts the request and frees its slot and pages
    after = _wait_for(lambda: (m := _metrics(http)) and engine(m, "aborted") > engine(before, "aborted")
                      and engine(m, "running") == 0 and m)
    assert after, "the request was not aborted after the client went away"
    assert engine(after, "pages_used") == engine(after, "pages_cached")   # only cached pages left
    generated = engine(after, "generated_tokens") - engine(before, "generated_tokens")
    assert generated < max_tokens
    assert after[("kvjax_requests_total", frozenset({("finish_reason", "abort")}))] >= 1


def test_disconnect_cancels_every_choice(http):
    """A streamed n=3 request whose client goes away: all three engine requests are aborted."""
    def engine(m, key):
        return m[(f"kvjax_engine_{key}", frozenset())]

    before = _metrics(http)
    with http.stream("POST", "/v1/completions", json={
            "prompt": "class", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "n": 3,
            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))   # the stream has begun
    after = _wait_for(lambda: (m := _metrics(http)) and engine(m, "aborted") >= engine(before, "aborted") + 3
                      and engine(m, "running") == 0 and m)
    assert after, "the choices were not all aborted after the client went away"
    assert engine(after, "pages_used") == engine(after, "pages_cached")


def test_metrics_and_prefix_cache(http):
    prompt = "The quick brown fox jumps over the lazy dog. " * 1 + "Then it sat."  # 58 tokens
    first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
    second = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 48   # 3 full pages
    m = _metrics(http)
    assert m[("kvjax_pages_total", frozenset())] == SLOTS * math.ceil(CONTEXT / 16)
    assert m[("kvjax_prefix_cache_hits", frozenset())] >= 3
    assert m[("kvjax_time_to_first_token_seconds_count", frozenset())] >= 10
    assert m[("kvjax_time_per_output_token_seconds_count", frozenset())] >= 10
    assert m[("kvjax_generation_tokens_total", frozenset())] >= 100
    assert m[("kvjax_requests_total", frozenset({("finish_reason", "length")}))] >= 10
    assert m[("kvjax_http_requests_total",
              frozenset({("route", "/v1/completions"), ("status", "400")}))] >= 10
    assert m[("kvjax_requests_running", frozenset())] == 0


# ---------------------------------------------------------------- fuzz
def _fuzz_bodies():
    """Hypothesis strategy: request bodies over the request schema's fields, each field mostly
    a well-typed value (so bodies get past the type checks and reach tokenization and the
    engine), else an edge value or one of the wrong kind (huge and negative ints, NaN and
    infinities, lone surrogates and NULs in text, nested containers, nulls). max_tokens is
    always given and mostly 1-3, so valid bodies generate few tokens."""
    from hypothesis import strategies as st

    text = st.text(st.one_of(st.characters(), st.sampled_from("\ud800\udfff\x00")), max_size=12)
    weird = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), text,
                      st.lists(st.integers(-5, 300), max_size=6),
                      st.recursive(st.integers(0, 9), lambda c: st.lists(c, max_size=2), max_leaves=6))

    def mostly(valid):
        return st.one_of(valid, valid, valid, weird)

    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                     "content": mostly(text)})
    fields = {
        "prompt": mostly(st.one_of(text, st.lists(st.integers(0, 259), min_size=1, max_size=8))),
        "messages": mostly(st.lists(message, max_size=3)), "max_tokens": mostly(st.integers(1, 3)),
        "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0.05, 1)),
        "top_k": mostly(st.integers(-2, 2**64)), "n": mostly(st.integers(1, 3)), "seed": mostly(st.integers(0, 2**64)),
        "best_of": mostly(st.integers(1, 4)),
        "stop": mostly(st.one_of(text, st.lists(text, max_size=3))), "logprobs": mostly(st.integers(0, 5)),
        "echo": mostly(st.booleans()), "stream": st.booleans(),
        "presence_penalty": mostly(st.floats(-2.5, 2.5)), "frequency_penalty": mostly(st.floats(-2.5, 2.5)),
        "repetition_penalty": mostly(st.floats(0, 3)), "min_p": mostly(st.floats(-0.5, 1.5)),
        "min_tokens": mostly(st.integers(-1, 4)), "ignore_eos": mostly(st.booleans()),
        "logit_bias": mostly(st.dictionaries(st.one_of(st.integers(-1, 300).map(str), st.text(max_size=3)),
                                             st.one_of(st.floats(-150, 150), weird), max_size=3)),
        "response_format": mostly(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "yaml"},
                                                   {"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}},
                                                   {"type": "json_schema", "json_schema": {"schema": {"enum": [1, 2]}}}])),
        "guided_choice": mostly(st.lists(text, max_size=3)), "guided_regex": mostly(st.sampled_from(["[ab]{1,3}", "(?=a)", "("])),
        "tools": mostly(st.lists(st.one_of(weird, st.just({"type": "function", "function": {"name": "f"}})), max_size=2)),
        "tool_choice": mostly(st.one_of(st.sampled_from(["auto", "required", "none", "x"]), weird,
                                        st.just({"type": "function", "function": {"name": "f"}}))),
        "model": mostly(st.just("text")),
    }
    main = st.sampled_from([("prompt",), ("messages",), ("prompt", "messages"), ()])
    rest = st.dictionaries(st.sampled_from(sorted(fields)), st.just(None), max_size=4)
    return st.tuples(main, rest).flatmap(
        lambda kr: st.fixed_dictionaries({k: fields[k] for k in sorted({*kr[0], *kr[1], "max_tokens"})}))


def test_fuzzed_requests_never_get_a_5xx_or_hang(ready, http):
    """Hypothesis over the request schema on the three body-taking routes: every answer is
    < 500 within the client's timeout (no hang); afterwards the engine is idle and no page is
    held by a request."""
    from hypothesis import HealthCheck, given, seed, settings

    seen = []

    @seed(20261206)
    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=_fuzz_bodies(), path=st_paths())
    def probe(body, path):
        raw = json.dumps(body, allow_nan=True).encode()
        r = http.post(path, content=raw, headers={"content-type": "application/json"}, timeout=60)
        if body.get("stream") and r.status_code == 200:
            r.read()
        assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
        seen.append(r.status_code)

    probe()
    assert seen.count(200) >= 5 and seen.count(400) >= 10, seen      # it reached the engine, and refusals
    deadline = time.time() + 30
    while time.time() < deadline:
        m = _metrics(http)
        if m[("kvjax_requests_running", frozenset())] == 0 and m[("kvjax_engine_pages_in_use", frozenset())] == 0:
            break
        time.sleep(0.2)
    assert m[("kvjax_engine_running", frozenset())] == 0 and m[("kvjax_engine_waiting", frozenset())] == 0
    assert m[("kvjax_engine_pages_in_use", frozenset())] == 0


def st_paths():
    from hypothesis import strategies as st

    return st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"])


# ---------------------------------------------------------------- shutdown (keep last)
def test_sigterm_drains_in_flight_requests_and_exits_0(ready, http):
    max_tokens = LONG
    with http.stream("POST", "/v1/completions", json={
            "prompt": "class", "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        events = _sse_events([next(l for l in lines if l.startswith("data: "))])
        ready.proc.send_signal(signal.SIGTERM)                     # mid-stream
        # the server stops accepting new connections at once ...
        refused = _wait_for(lambda: _refused(ready.url), timeout=10)
        events += _sse_events(lines)                               # ... but finishes this stream
    assert refused, "the server still accepted connections after SIGTERM"
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    assert last["usage"]["completion_tokens"] >= 1
    if last["choices"][0]["finish_reason"] == "length":
        assert last["usage"]["completion_tokens"] == max_tokens
    assert ready.proc.wait(60) == 0, ready.output()


def _refused(url) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
        return False
    except httpx.TransportError:
        return True


# ---------------------------------------------------------------- the command itself (no server)
EARLY_SIGNAL = """
import os, signal, sys
import uvicorn
from kvjax.cli import main
real_run = uvicorn.Server.run
def early(self, *a, **kw):          # SIGTERM before uvicorn has installed its handlers
    os.kill(os.getpid(), signal.SIGTERM)
    return real_run(self, *a, **kw)
uvicorn.Server.run = early
sys.exit(main(["serve", "--model", "text", "--port", "0", "--max-slots", "1", "--max-len", "32",
               "--warmup", "none", "--compilation-cache", "none"]))
"""


def test_a_signal_before_uvicorn_listens_still_stops_the_server():
    """The window between `kvjax serve` taking over SIGTERM and uvicorn installing its own
    handlers: a signal there must stop the server (a no-op handler swallowed it and the
    server served on)."""
    r = subprocess.run([sys.executable, "-c", EARLY_SIGNAL], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "serving 'text'" in r.stderr and "stopped" in r.stderr


def test_serve_without_the_web_stack_says_how_to_install(monkeypatch):
    from kvjax.cli import UserError, build_parser
    from kvjax.serve import cli as serve_cli

    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    flags = {a.option_strings[0]: a.help for a in serve._actions
             if a.option_strings and a.dest != "help"}
    assert {"--model", "--host", "--port", "--dtype", "--max-slots", "--max-len", "--page-size",
            "--api-key", "--mesh"} <= set(flags)
    assert all(h and len(h) > 15 for h in flags.values())          # --help explains every flag
    args = parser.parse_args(["serve", "--model", "text"])
    assert (args.host, args.port, args.max_slots, args.max_len) == ("127.0.0.1", 8000, 8, 512)
    monkeypatch.setitem(sys.modules, "uvicorn", None)       # import uvicorn -> ImportError
    with pytest.raises(UserError, match=r"pip install 'kvjax\[serve\]'"):
        serve_cli.build(args)


def test_mesh_flag_parsing():
    from kvjax.cli import UserError
    from kvjax.serve.cli import parse_mesh

    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=2") == {"model": 2} and parse_mesh(None) is None
    for bad in ("data=0", "rows=2", "data=2,data=2", "data", "data=x"):
        with pytest.raises(UserError, match="--mesh"):
            parse_mesh(bad)


def test_text_stream_is_exact_across_cut_characters_and_stop_strings():
    """Streamed pieces concatenate to the full decode (multi-byte characters cut between
    byte tokens are held back) and stop at the first stop string, however tokens arrive."""
    from kvjax.serve.textstream import TextStream
    from kvjax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "héllo wörld € 😀 end, STOP here ü"
    ids = list(text.encode()) + [tok.EOS]
    rng = np.random.default_rng(0)
    for stops in [(), ("STOP",), ("ö",), ("😀 e", "xx"), ("€",), ("ü",)]:
        cuts = [text.find(s) for s in stops if s in text]
        expected = text[:min(cuts)] if cuts else text
        for _ in range(20):
            ts, out, i = TextStream(tok, stops, skip_ids=[tok.EOS]), [], 0
            while i < len(ids):
                k = int(rng.integers(1, 5))
                out.append(ts.push(ids[i:i + k]))
                i += k
            out.append(ts.finish())
            assert "".join(out) == expected and "\ufffd" not in "".join(out)
            assert ts.full_text == expected


def test_logprob_objects_name_tokens_and_offsets():
    """The completions and chat `logprobs` objects built from engine TokenLogprobs (pure)."""
    from types import SimpleNamespace

    from kvjax.engine.api import TokenLogprob
    from kvjax.serve.responses import chat_logprobs as _chat_logprobs, completion_logprobs as _completion_logprobs
    from kvjax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    state = SimpleNamespace(tok=tok)
    ids = [tok.BOS] + list("aé".encode()) + [tok.EOS]          # é is two byte tokens
    entries = [None] + [TokenLogprob(t, -0.5, {t: -0.5, 98: -1.5}) for t in ids[1:]]
    lp = _completion_logprobs(state, entries, ids, offset0=3)
    assert lp["tokens"] == ["<bos>", "a", "bytes:\\xc3", "bytes:\\xa9", "<eos>"]
    assert lp["token_logprobs"] == [None, -0.5, -0.5, -0.5, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"a": -0.5, "b": -1.5}
    assert lp["text_offset"] == [3, 3, 4, 4, 5]          # "a" at 3, both bytes of "é" at 4
    chat = _chat_logprobs(state, entries[1:], ids[1:])["content"]
    assert [c["token"] for c in chat] == ["a", "bytes:\\xc3", "bytes:\\xa9", "<eos>"]
    assert chat[1]["bytes"] == [0xC3] and chat[0]["top_logprobs"][1] == {
        "token": "b", "logprob": -1.5, "bytes": [98]}


def test_chat_template_flag_serves_chat_for_a_model_without_one(tmp_path, monkeypatch):
    """A GGUF model with no chat template (like Gemma 3 270M base): chat requests are a 400
    that names --chat-template; with --chat-template FILE they render with that file (the
    prompt's token count is the template's); a bad file fails before the model loads."""
    from starlette.testclient import TestClient
    from test_gguf import _write_gguf

    from kvjax.cli import UserError, build_parser
    from kvjax.gguf import GGUFFile, GGUFTokenizer
    from kvjax.serve import cli as serve_cli
    from kvjax.serve.app import create_app
    from kvjax.tokenizer import use_chat_template

    model = _write_gguf(tmp_path / "tiny.gguf")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    parser = build_parser()
    argv = ["serve", "--model", str(model), "--max-slots", "1", "--max-len", "64", "--warmup", "basic",
            "--compilation-cache", "none"]
    app, engine, model_id = serve_cli.build(parser.parse_args([*argv, "--chat-template", str(template)]))
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        r = TestClient(app, base_url="http://127.0.0.1").post("/v1/chat/completions", json=body)
        plain = GGUFTokenizer(GGUFFile(model))
        assert plain.chat_template is None
        want = len(use_chat_template(GGUFTokenizer(GGUFFile(model)), template.read_text())
                   .apply_chat_template(body["messages"]))
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want, r.text
        bare = create_app(engine, plain, model_id, context=64, vocab_size=256)  # no --chat-template
        r = TestClient(bare, base_url="http://127.0.0.1").post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "--chat-template FILE" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
    finally:
        engine.close()
    (tmp_path / "bad.jinja").write_text("{% if %}")
    monkeypatch.setattr(serve_cli, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"--chat-template .*bad.jinja, line 1: "):
        serve_cli.build(parser.parse_args([*argv, "--chat-template", str(tmp_path / "bad.jinja")]))


def test_full_warmup_leaves_nothing_to_compile(tmp_path):
    """--warmup full (the default) compiles every program shape before serving: a burst of
    requests with random prompt lengths, logprobs on some, compiles nothing more."""
    from starlette.testclient import TestClient
    from test_gguf import _write_gguf

    from kvjax.cli import build_parser
    from kvjax.serve import cli as serve_cli

    model = _write_gguf(tmp_path / "tiny.gguf")
    app, engine, _ = serve_cli.build(build_parser().parse_args(
        ["serve", "--model", str(model), "--max-slots", "2", "--max-len", "64", "--compilation-cache", "none"]))
    try:
        client = TestClient(app, base_url="http://127.0.0.1")
        before = engine.stats()["compilations"]
        rng = np.random.default_rng(0)
        bodies = [{"prompt": [int(t) for t in rng.integers(3, 200, int(n))], "max_tokens": 4, "temperature": 0,
                   "logprobs": 1 if i % 2 else None} for i, n in enumerate(rng.integers(1, 58, 12))]
        with ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda b: client.post("/v1/completions", json=b),
                                                              bodies))
        assert engine.stats()["compilations"] == before
    finally:
        engine.close()


def test_speculate_flag(tmp_path):
    """--speculate prompt-lookup:K and draft:PATH:K (the model as its own draft) answer exactly
    what the plain server answers (greedy), count proposals in /metrics, and a bad spec is a
    UserError naming the forms before anything is served."""
    from starlette.testclient import TestClient
    from test_gguf import _write_gguf

    from kvjax.cli import UserError, build_parser
    from kvjax.serve import cli as serve_cli

    model = _write_gguf(tmp_path / "tiny.gguf")
    parser = build_parser()
    argv = ["serve", "--model", str(model), "--max-slots", "2", "--max-len", "64", "--warmup", "basic",
            "--compilation-cache", "none"]
    body = {"model": str(model), "prompt": "abcabcabcabc", "max_tokens": 12, "temperature": 0}
    answers = {}
    for spec in (None, "prompt-lookup:3", f"draft:{model}:2"):
        app, engine, _ = serve_cli.build(parser.parse_args(argv + (["--speculate", spec] if spec else [])))
        try:
            client = TestClient(app, base_url="http://127.0.0.1")
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            answers[spec] = r.json()["choices"][0]["text"]
            metrics = client.get("/metrics").text
            assert ("kvjax_engine_spec_proposed" in metrics) == (spec is not None)
        finally:
            engine.close()
    assert len(set(answers.values())) == 1, answers
    for bad in ("prompt-lookup", "lookahead:4", "draft::2", "prompt-lookup:0"):
        with pytest.raises(UserError, match="speculate|num_tokens"):
            serve_cli.build(parser.parse_args(argv + ["--speculate", bad]))
