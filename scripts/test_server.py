#!/usr/bin/env python3
"""End-to-end test of `kvmerger serve` with the official `openai` client.

Starts the server on the default model on 127.0.0.1 (a free port), checks completions,
chat, streaming, per-request compression, stop sequences, errors, disconnects and the
429 queue limit, then runs a bounded load test: 48 greedy requests, 8 at a time, distinct
prompts, each with its own method or budget; every response must arrive and equal the
same request served alone, and the KV pool must never exceed its limit (sampled from
/metrics). Stops every server it started. Exits non-zero on the first failure.

    python3 scripts/test_server.py --binary target/release/kvmerger
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

DEADLINE_S = 600


def ensure_openai():
    try:
        import openai  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "openai"], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `kvmerger serve` process on a free port of 127.0.0.1."""

    def __init__(self, binary, *extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", str(self.port), *extra],
            stdout=self.log,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = time.time()
        while time.time() - start < 60:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("server did not become healthy within 60 s")

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.status, r.read().decode()

    def post_raw(self, path, body, timeout=60):
        req = urllib.request.Request(
            self.base + path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def metrics(self):
        _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok   {what}")


def kv(usage):
    extra = usage.model_extra or {}
    return extra["kv_compression"]


def test_basics(srv, client, model):
    models = client.models.list()
    check([m.id for m in models.data] == [model], "GET /v1/models lists the model")

    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    text = r.choices[0].text
    check(len(text) > 0 and r.usage.completion_tokens == 8, f"completion: {text!r}")
    check(r.choices[0].finish_reason == "length", "finish_reason length at max_tokens")
    check(kv(r.usage)["method"] == "full" and kv(r.usage)["achieved_ratio"] == 1.0,
          "default compression is the server's (full)")

    pieces = list(client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    ))
    streamed = "".join(c.choices[0].text for c in pieces if c.choices)
    check(streamed == text, "streamed completion equals the non-streamed one")

    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."]
    )
    check("." not in r.choices[0].text and r.choices[0].finish_reason == "stop",
          f"stop sequence cuts the text: {r.choices[0].text!r}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    answer = r.choices[0].message.content
    check(r.choices[0].message.role == "assistant" and len(answer) > 0, f"chat: {answer!r}")
    check(r.usage.prompt_tokens > 20, "chat prompt rendered with the model's template (system turn added)")
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == answer, "streamed chat equals the non-streamed one")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens,
          "stream_options.include_usage sends usage last")

    long_prompt = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(15))
    r = client.completions.create(
        model=model, prompt=long_prompt, max_tokens=4, temperature=0,
        extra_body={"kv_compression": {"method": "h2o", "budget": {"ratio": 0.35}}},
    )
    k = kv(r.usage)
    check(k["method"] == "h2o@35%" and abs(k["achieved_ratio"] - 0.35) < 0.01,
          f"per-request h2o@35% holds its budget ({k['achieved_ratio']:.3f})")
    check(k["resident_kv_bytes"] < 0.4 * k["full_kv_bytes"], "resident KV bytes shrink with the budget")
    r = client.completions.create(
        model=model, prompt=long_prompt, max_tokens=4, temperature=0,
        extra_body={"kv_compression": {"method": "kvmerger", "budget": {"ratio": 0.35},
                                       "mass": "none"}},
    )
    check(kv(r.usage)["method"].startswith("kvmerger(") and kv(r.usage)["achieved_ratio"] <= 0.36,
          f"per-request kvmerger with a parameter: {kv(r.usage)['method']}")

    # A request's own cache dtype: q8_0 blocks hold 34 bytes per 32 elements, f16 64 (each
    # head's key center and the entries' bookkeeping come on top of both).
    bytes_as = {}
    for dtype in ["f16", "q8_0"]:
        r = client.completions.create(
            model=model, prompt=long_prompt, max_tokens=4, temperature=0,
            extra_body={"kv_compression": {"method": "h2o", "budget": 0.35, "kv_dtype": dtype}},
        )
        bytes_as[dtype] = kv(r.usage)["resident_kv_bytes"]
    ratio = bytes_as["q8_0"] / bytes_as["f16"]
    check(0.5 < ratio < 0.65, f"per-request kv_dtype q8_0 holds {ratio:.3f} of f16's bytes")

    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                  temperature=0.9, top_p=0.9, seed=7)
    r2 = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                   temperature=0.9, top_p=0.9, seed=7)
    check(r.choices[0].text == r2.choices[0].text, "same seed, same sample")


def test_errors(srv):
    def expect(body, param, raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        status, _, reply = srv.post_raw("/v1/completions", data)
        err = reply.get("error", {})
        check(status == 400 and err.get("param") == param and err.get("message"),
              f"400 naming `{param}`: {str(err.get('message', reply))[:90]}")

    expect(None, "body", raw=b'{"prompt": "hi", ')
    expect({"prompt": "hi", "kv_compression": {"method": "magic"}}, "kv_compression.method")
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "budget": {"ratio": 0}}},
           "kv_compression.budget")
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "budget": {"ratio": 1.5}}},
           "kv_compression.budget")
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "bogus": 1}}, "kv_compression.bogus")
    expect({"prompt": ""}, "prompt")
    expect({"prompt": "hi", "max_tokens": 0}, "max_tokens")
    expect({"prompt": "hi", "max_tokens": 10**9}, "max_tokens")
    expect({"prompt": "hi", "max_tokens": -1}, "max_tokens")
    expect({"prompt": "word " * 9000, "max_tokens": 4}, "prompt")
    expect({"prompt": "hi", "temperature": 3}, "temperature")
    expect({"prompt": "hi", "top_p": 0}, "top_p")
    expect({"prompt": "hi", "n": 2}, "n")
    expect({"prompt": "hi", "frobnicate": True}, "frobnicate")
    expect({"prompt": "hi", "kv_compression": {"method": "kvmerger", "budget": 0.35, "sigma": -1}},
           "kv_compression.sigma")
    # The fields that apply to the request rather than to the method: a decode bound the
    # method cannot keep, and a method that cannot compress during prefill (the server's
    # default) unless the request asks to compress once.
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "max_kv": 0}},
           "kv_compression.max_kv")
    expect({"prompt": "hi", "kv_compression": {"method": "full", "max_kv": 8}},
           "kv_compression.max_kv")
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "prefill_compression": "later"}},
           "kv_compression.prefill_compression")
    expect({"prompt": "hi", "kv_compression": {"method": "h2o", "kv_dtype": "q2_k"}},
           "kv_compression.kv_dtype")
    expect({"prompt": "word " * 300, "kv_compression": {"method": "cam", "budget": 0.5}},
           "kv_compression.prefill_compression")
    # One rule with the command line: the full cache takes no budget; a parameter the mode
    # does not read is refused; per-layer budgets must fit the model's layers.
    expect({"prompt": "hi", "kv_compression": {"method": "full", "budget": 0.5}},
           "kv_compression.budget")
    expect({"prompt": "hi", "kv_compression": {"method": "kvmerger", "threshold": 0.8}},
           "kv_compression.threshold")
    expect({"prompt": "hi", "kv_compression": {"method": "kvmerger", "budget": 0.2,
                                               "layer_budgets": [0.2]}},
           "kv_compression.layer_budgets")
    status, _, reply = srv.post_raw("/v1/completions", json.dumps(
        {"prompt": "hi", "kv_compression": {"method": "h2o", "budget": 0}}).encode())
    check("configuration" not in reply["error"]["message"],
          f"a budget error names the budget alone: {reply['error']['message']}")
    status, _, reply = srv.post_raw("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "wizard", "content": "hi"}]}).encode())
    check(status == 400 and reply["error"]["param"] == "messages[0].role",
          "a chat message with an unknown role is a 400")
    status, _, reply = srv.post_raw("/v1/chat/completions", json.dumps({"messages": []}).encode())
    check(status == 400 and reply["error"]["param"] == "messages", "chat without messages is a 400")
    check(srv.get("/health")[0] == 200, "the server still serves after bad input")


def test_disconnect(srv):
    before = srv.metrics()
    body = json.dumps({"prompt": "Numbers: 1, 2, 3, 4, 5,", "max_tokens": 150, "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data:") < 3:
        got += sock.recv(4096)
    sock.close()
    start = time.time()
    while time.time() - start < 10:
        m = srv.metrics()
        if m['kvmerger_requests_total{outcome="cancelled"}'] > before['kvmerger_requests_total{outcome="cancelled"}']:
            break
        time.sleep(0.1)
    check(m["kvmerger_active_sessions"] == 0 and m["kvmerger_kv_pool_used_bytes"] == 0,
          f"a disconnected client is cancelled and frees its memory ({time.time() - start:.2f} s)")


def test_queue_limit(binary):
    srv = Server(binary, "--max-queue", "1", "--max-running", "1")
    try:
        body = json.dumps({"prompt": "Count: one, two, three,", "max_tokens": 24, "temperature": 0})
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: srv.post_raw("/v1/completions", body.encode()), range(4)))
        refused = [r for r in replies if r[0] == 429]
        check(len(refused) >= 1 and all("Retry-After" in h or "retry-after" in h for _, h, _ in refused),
              f"past --max-queue: 429 with Retry-After ({len(refused)} of 4)")
        check(all(r[0] in (200, 429) for r in replies), "the others are served")
    finally:
        srv.stop()


def test_final_metrics(path, last):
    """`serve --out FILE` wrote, on shutdown, the counters /metrics showed last."""
    with open(path) as f:
        written = {}
        for line in f.read().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                written[name] = float(value)
    for name in ['kvmerger_requests_total{outcome="completed"}', "kvmerger_prompt_tokens_total",
                 "kvmerger_generated_tokens_total"]:
        check(written.get(name) == last.get(name) and last.get(name, 0) > 0,
              f"--out wrote the final {name} ({written.get(name)})")
    os.remove(path)
    os.rmdir(os.path.dirname(path))


def load_configs():
    budgets = [0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8]
    methods = [{"method": "streaming_llm"}, {"method": "h2o"}, {"method": "snapkv", "window": 4},
               {"method": "cam", "prefill_compression": "once"}, {"method": "kvmerger"},
               {"method": "kvmerger", "mass": "none"}]
    return [dict(m, budget={"ratio": b}) for m in methods for b in budgets]


def test_load(srv, client, model):
    configs = load_configs()
    assert len(configs) == 48
    subjects = ["rivers", "planets", "birds", "metals", "rivers of Asia", "trees", "colours", "stars"]
    prompts = [f"Request {i}: list some {subjects[i % 8]} and say why they matter (#{i * 37 % 101})."
               for i in range(48)]

    def ask(i):
        r = client.completions.create(model=model, prompt=prompts[i], max_tokens=6, temperature=0,
                                      extra_body={"kv_compression": configs[i]}, timeout=120)
        return r.choices[0].text, r.usage.completion_tokens, kv(r.usage)["method"]

    limit = srv.metrics()["kvmerger_kv_pool_limit_bytes"]
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            m = srv.metrics()
            samples.append((m["kvmerger_kv_pool_used_bytes"], m["kvmerger_active_sessions"],
                            m["kvmerger_queued_sessions"]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.time()
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(48)))
    finally:
        stop.set()
        sampler.join()
    took = time.time() - start
    check(len(together) == 48 and all(t[1] > 0 for t in together),
          f"48 responses arrived, 8 at a time ({took:.1f} s)")
    check(len({t[2] for t in together}) == 48, "each request ran under its own method or budget")
    check(max(s[0] for s in samples) <= limit and srv.metrics()["kvmerger_kv_pool_peak_bytes"] <= limit,
          f"the pool never exceeded its limit ({len(samples)} samples, peak "
          f"{max(s[0] for s in samples) / 2**20:.2f} of {limit / 2**20:.0f} MiB)")
    check(max(s[1] for s in samples) > 1, f"requests were batched (up to {int(max(s[1] for s in samples))} at once)")
    check(max(s[2] for s in samples) > 0, "the pool made some requests wait")
    alone = [ask(i) for i in range(48)]
    diff = [i for i in range(48) if alone[i][0] != together[i][0]]
    check(not diff, f"every response equals the same request served alone (differ: {diff})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default="target/release/kvmerger")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"test_server.py: over {DEADLINE_S} s"))
    signal.alarm(DEADLINE_S)
    ensure_openai()
    import openai

    start = time.time()
    final_metrics = os.path.join(tempfile.mkdtemp(prefix="kvmerger-serve-"), "metrics.txt")
    srv = Server(args.binary, "--kv-pool-mb", "12", "--out", final_metrics)
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        test_basics(srv, client, model)
        test_errors(srv)
        test_disconnect(srv)
        last = srv.metrics()
    finally:
        # SIGTERM, as systemd, Docker and Kubernetes stop a service: --out is still written.
        srv.stop(signal.SIGTERM)
    check(srv.proc.returncode == 0, "the server stopped cleanly on SIGTERM")
    test_final_metrics(final_metrics, last)
    # A pool with room for about four of the load test's requests.
    srv = Server(args.binary, "--kv-pool-mb", "3")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", timeout=60, max_retries=0)
        test_load(srv, client, model)
    finally:
        srv.stop()
    test_queue_limit(args.binary)
    print(f"all server checks passed in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
