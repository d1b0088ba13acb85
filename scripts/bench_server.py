#!/usr/bin/env python3
"""Benchmark of `kvmerger serve`: capacity of a fixed KV pool under compression, and
aggregate decode speed of batched sessions. Writes docs/serve/bench.json and bench.md.

1. Capacity: a pool sized for two full-cache conversations of --prompt-tokens + 64 tokens;
   8 clients each send a prompt of exactly --prompt-tokens tokens (text cut to length with
   the server's own tokenizer, `POST /tokenize`, and sent as token ids) and read 64 tokens.
   Reported per method (full, kvmerger@35% and h2o@35% compressed during prefill, and
   kvmerger@35% compressed once after the prompt): most sessions admitted at once (from
   /metrics), total time, and the pool's peak.
2. Decode: 1, 2, 4 and 8 concurrent sessions of short prompts (about 90 tokens), each
   streaming --decode-tokens tokens; aggregate decode tokens/s over the window where every
   session decodes: from the last session's first token (every prefill is done) to the
   first session's last token (no session has finished yet), counting the streamed tokens
   inside it. Prefills and the staggered ends, when fewer than N sessions decode, fall
   outside the window; HTTP streaming to the clients stays inside it, as a server pays it.
   The clients are one thread reading raw sockets, so that what they take from the
   server's cores per token stays small.

    python3 scripts/bench_server.py --binary target/release/kvmerger [--prompt-tokens 3000]
"""

import argparse
import json
import math
import os
import selectors
import socket
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from test_server import Server  # noqa: E402

GEN = 64


def text_of(seed, sentences):
    colours = ["red", "blue", "green", "amber", "violet", "grey", "white", "black"]
    things = ["river", "mountain", "harbour", "library", "garden", "station", "market", "bridge"]
    return " ".join(
        f"Note {seed}-{i}: the {colours[(i * 3 + seed) % 8]} {things[(i * 5 + seed) % 8]} "
        f"was visited on day {(i * 7 + seed) % 31 + 1}."
        for i in range(sentences)
    )


def post(srv, body, timeout=1800):
    status, _, reply = srv.post_raw("/v1/completions", json.dumps(body).encode(), timeout=timeout)
    if status != 200:
        raise SystemExit(f"request failed: {status} {reply}")
    return reply


def calibrate(binary, prompt_tokens):
    """KV bytes per token, and 8 prompts of exactly `prompt_tokens` token ids."""
    srv = Server(binary)
    try:
        r = post(srv, {"prompt": text_of(0, 40), "max_tokens": 1, "temperature": 0})
        u = r["usage"]
        per_sentence = u["prompt_tokens"] / 40
        bytes_per_token = u["kv_compression"]["full_kv_bytes"] / u["prompt_tokens"]
        prompts = []
        for i in range(8):
            text = text_of(i + 1, int(prompt_tokens / per_sentence * 1.1) + 2)
            status, _, t = srv.post_raw("/tokenize", json.dumps({"prompt": text}).encode())
            if status != 200 or t["count"] < prompt_tokens:
                raise SystemExit(f"tokenize failed: {status} {t}")
            prompts.append(t["tokens"][:prompt_tokens])
        return bytes_per_token, prompts
    finally:
        srv.stop()


def quietly(f, *args):
    """Runs `f`, ignoring the connection error of a server stopped under it."""
    try:
        f(*args)
    except OSError:
        pass


def admission(binary, method, prompts, bytes_per_token, extra=()):
    """Sessions admitted at once, without running them to the end: the 8 requests arrive
    together and admission decides at the first engine step (a later admission needs a
    session to finish). For a loaded machine, where the whole run takes too long."""
    prompt_tokens = len(prompts[0])
    pool_mb = math.ceil(2 * (prompt_tokens + GEN) * bytes_per_token / 2**20)
    srv = Server(binary, "--kv-pool-mb", str(pool_mb), *extra)
    threads = []
    try:
        for p in prompts:
            body = {"prompt": p, "max_tokens": GEN, "temperature": 0, "stop": [], "stream": True}
            if method is not None:
                body["kv_compression"] = method
            t = threading.Thread(target=quietly, args=(hold_until_first_event, srv, body),
                                 daemon=True)
            t.start()
            threads.append(t)
        deadline = time.time() + 120
        while time.time() < deadline:
            m = srv.metrics()
            if m["kvmerger_active_sessions"] + m["kvmerger_queued_sessions"] == len(prompts):
                break
            time.sleep(0.2)
        time.sleep(8)  # a few engine steps, so every admission that fits has happened
        m = srv.metrics()
    finally:
        srv.stop()
    if m["kvmerger_kv_pool_peak_bytes"] > pool_mb * 2**20:
        raise SystemExit(f"the pool limit was exceeded: {m}")
    return {
        "method": (method or {"method": "full"})["method"]
                  + (f"@{int(method['budget']['ratio'] * 100)}%" if method else "")
                  + (" once" if "once" in extra else ""),
        "pool_mb": pool_mb,
        "prompt_tokens": prompt_tokens,
        "sessions_admitted_at_once": int(m["kvmerger_active_sessions_peak"]),
        "pool_peak_mb": round(m["kvmerger_kv_pool_peak_bytes"] / 2**20, 1),
    }


def capacity(binary, method, prompts, bytes_per_token, extra=()):
    prompt_tokens = len(prompts[0])
    pool_mb = math.ceil(2 * (prompt_tokens + GEN) * bytes_per_token / 2**20)
    srv = Server(binary, "--kv-pool-mb", str(pool_mb), *extra)
    stop = threading.Event()

    def client(i):
        body = {"prompt": prompts[i], "max_tokens": GEN, "temperature": 0, "stop": []}
        if method is not None:
            body["kv_compression"] = method
        return post(srv, body)["usage"]

    peak_seen = []

    def sample():
        # The limit must hold at every moment, not only at the end.
        while not stop.is_set():
            m = srv.metrics()
            peak_seen.append(m["kvmerger_kv_pool_used_bytes"])
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.time()
    try:
        with ThreadPoolExecutor(8) as pool:
            usages = list(pool.map(client, range(8)))
        took = time.time() - start
        m = srv.metrics()
    finally:
        stop.set()
        sampler.join()
        srv.stop()
    if max(peak_seen + [m["kvmerger_kv_pool_peak_bytes"]]) > pool_mb * 2**20:
        raise SystemExit(f"the pool limit was exceeded: {m}")
    label = usages[0]["kv_compression"]["method"]
    return {
        "method": label + (" once" if "once" in extra else ""),
        "pool_mb": pool_mb,
        "prompt_tokens": sum(u["prompt_tokens"] for u in usages) / len(usages),
        "sessions_admitted_at_once": int(m["kvmerger_active_sessions_peak"]),
        "total_s": round(took, 1),
        "pool_peak_mb": round(m["kvmerger_kv_pool_peak_bytes"] / 2**20, 1),
        "achieved_ratio": round(sum(u["kv_compression"]["achieved_ratio"] for u in usages) / 8, 3),
        "resident_mb_per_session": round(
            sum(u["kv_compression"]["resident_kv_bytes"] for u in usages) / 8 / 2**20, 1),
    }


def hold_until_first_event(srv, body):
    """Streams a completion until its first event arrives, then hangs up (which frees the
    session): enough for admission to have counted it."""
    req = urllib.request.Request(srv.base + "/v1/completions",
                                 data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                return


def decode_streams(srv, bodies, timeout=600):
    """Arrival times of every generated token of several streamed completions at once, read
    by one thread over raw sockets. The decode measurement's client runs on the server's
    cores: a thread per stream parsing each event as it lands cost about 0.1 ms of CPU per
    token, taken from the server four times as often with four sessions as with one. Here a
    token costs a wake-up and a `recv`; the events are parsed after the streams end."""
    host, port = srv.base.removeprefix("http://").split(":")
    received = {}  # socket -> [(arrival time, bytes)]
    selector = selectors.DefaultSelector()
    for body in bodies:
        payload = json.dumps(dict(body, stream=True)).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (host.encode(), len(payload)) + payload)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = []
    deadline = time.time() + timeout
    while selector.get_map():
        if time.time() > deadline:
            raise SystemExit("a decode stream did not finish in time")
        for key, _ in selector.select(timeout=1):
            data = key.fileobj.recv(1 << 16)
            if data:
                received[key.fileobj].append((time.time(), data))
            else:
                selector.unregister(key.fileobj)
                key.fileobj.close()
    return [token_times(pieces) for pieces in received.values()]


def token_times(pieces):
    """The arrival time of each token event in one raw streamed response: the time of the
    `recv` that completed it. Each server-sent event travels in one HTTP chunk, so its text is
    contiguous; the final chunk, which only carries the finish reason, is not counted."""
    raw = b"".join(data for _, data in pieces)
    ends, total = [], 0
    for t, data in pieces:
        total += len(data)
        ends.append((total, t))
    status = raw.split(b"\r\n", 1)[0]
    if b" 200 " not in status:
        raise SystemExit(f"decode request failed: {raw[:300]!r}")
    times, at, piece = [], 0, 0
    while (start := raw.find(b"data: ", at)) >= 0:
        end = raw.index(b"\n\n", start)
        at = end + 2
        event = raw[start + 6:end]
        if event == b"[DONE]":
            continue
        while ends[piece][0] < at:
            piece += 1
        choices = json.loads(event)["choices"]
        if choices and choices[0].get("finish_reason") is None:
            times.append(ends[piece][1])
    return times


def decode_scaling(binary, counts, tokens, repeats=1):
    """Aggregate decode tokens/s per number of concurrent sessions, each generating `tokens`.
    With `repeats`, the counts are run in turn that many times and each keeps its best run
    (on a loaded machine, the run least slowed by others); every run's figure is kept too,
    with their median, since a shared machine's speed drifts between runs. Each repeat's own
    ratio to the base count (its runs are back to back, so they share the machine's state)
    is kept as the paired ratio."""
    srv = Server(binary, "--kv-pool-mb", "512")
    best, runs = {}, {}
    try:
        for _ in range(repeats):
            for n in counts:
                bodies = [{"prompt": text_of(100 + i, 6), "max_tokens": tokens, "temperature": 0,
                           "stop": []} for i in range(n)]
                streams = decode_streams(srv, bodies)
                # The window where every session decodes: from the last first token (all
                # prefills done) to the first last token (none finished yet). Sessions start
                # one engine step apart (one prefill per step), so they end apart too; the
                # steps after the first end decode fewer than n sessions and stay out.
                t0 = max(s[0] for s in streams)
                t1 = min(s[-1] for s in streams)
                if t1 <= t0:
                    raise SystemExit(f"{n} sessions never decoded together; raise --decode-tokens")
                counted = sum(sum(1 for t in s if t0 < t <= t1) for s in streams)
                row = {"sessions": n, "decode_tokens": counted, "seconds": round(t1 - t0, 3),
                       "aggregate_tokens_per_s": round(counted / (t1 - t0), 1)}
                print(row, flush=True)
                runs.setdefault(n, []).append(row["aggregate_tokens_per_s"])
                if row["aggregate_tokens_per_s"] > best.get(n, {}).get("aggregate_tokens_per_s", -1):
                    best[n] = row
    finally:
        srv.stop()
    rows = [best[n] for n in counts]
    base = rows[0]["aggregate_tokens_per_s"]
    median_base = statistics.median(runs[counts[0]])
    for r in rows:
        r["speedup_vs_one"] = round(r["aggregate_tokens_per_s"] / base, 2)
        r["runs_tokens_per_s"] = runs[r["sessions"]]
        r["median_tokens_per_s"] = round(statistics.median(runs[r["sessions"]]), 1)
        r["median_speedup_vs_one"] = round(r["median_tokens_per_s"] / median_base, 2)
        paired = [x / b for x, b in zip(runs[r["sessions"]], runs[counts[0]])]
        r["paired_speedups"] = [round(p, 3) for p in paired]
        r["median_paired_speedup"] = round(statistics.median(paired), 2)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default="target/release/kvmerger")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--out", default="docs/serve")
    parser.add_argument("--skip-capacity", action="store_true",
                        help="only the decode part; the capacity rows already in OUT/bench.json "
                             "are kept")
    parser.add_argument("--decode-sessions", default="1,2,4,8",
                        help="concurrent sessions of the decode measurement, the first the base")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="tokens each session of the decode measurement generates")
    parser.add_argument("--repeats", type=int, default=1,
                        help="decode: run the counts this many times in turn, keep each one's best")
    parser.add_argument("--admission-only", action="store_true",
                        help="capacity: only the sessions admitted at once, not the whole run")
    args = parser.parse_args()
    result = {"prompt_tokens": args.prompt_tokens, "generated_tokens": GEN, "clients": 8,
              "capacity": [], "decode_tokens_per_session": args.decode_tokens, "decode": []}
    previous = os.path.join(args.out, "bench.json")
    if args.skip_capacity and os.path.exists(previous):
        with open(previous) as f:
            kept = json.load(f)
        for key in ("prompt_tokens", "kv_bytes_per_token", "capacity"):
            if key in kept:
                result[key] = kept[key]
    if not args.skip_capacity:
        bytes_per_token, prompts = calibrate(args.binary, args.prompt_tokens)
        result["kv_bytes_per_token"] = bytes_per_token
        kvmerger = {"method": "kvmerger", "budget": {"ratio": 0.35}}
        h2o = {"method": "h2o", "budget": {"ratio": 0.35}}
        runs = [(None, ()), (kvmerger, ()), (h2o, ()), (kvmerger, ("--prefill-compression", "once"))]
        for method, extra in runs:
            run = admission if args.admission_only else capacity
            row = run(args.binary, method, prompts, bytes_per_token, extra)
            full = (result["capacity"] or [row])[0]["sessions_admitted_at_once"]
            row["sessions_vs_full"] = round(row["sessions_admitted_at_once"] / full, 2)
            print(row, flush=True)
            result["capacity"].append(row)
    counts = [int(c) for c in args.decode_sessions.split(",")]
    result["decode"] = decode_scaling(args.binary, counts, args.decode_tokens, args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Prompt {result['prompt_tokens']} tokens, {GEN} generated, 8 clients; pool sized "
             "for two full-cache conversations.", "",
             "| method | pool MiB | sessions admitted at once | vs full | total s | pool peak MiB | achieved ratio | resident MiB/session |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["capacity"]:
        lines.append(f"| {r['method']} | {r['pool_mb']} | {r['sessions_admitted_at_once']} | {r['sessions_vs_full']}x | "
                     f"{r.get('total_s', '-')} | {r['pool_peak_mb']} | {r.get('achieved_ratio', '-')} | "
                     f"{r.get('resident_mb_per_session', '-')} |")
    lines += ["", f"Decode: each session streams {args.decode_tokens} tokens; aggregate tokens/s "
              f"while every session decodes; best and median of {args.repeats} run(s) per count. "
              "Paired: each repeat's ratio to one session in the same repeat (the counts of a "
              "repeat run back to back), median and range over the repeats.",
              "", "| concurrent sessions | best tokens/s | vs one | median tokens/s | vs one "
              "| paired vs one, median [min, max] (n) |",
              "|---:|---:|---:|---:|---:|---|"]
    for r in result["decode"]:
        paired = r["paired_speedups"]
        lines.append(f"| {r['sessions']} | {r['aggregate_tokens_per_s']} | {r['speedup_vs_one']}x | "
                     f"{r['median_tokens_per_s']} | {r['median_speedup_vs_one']}x | "
                     f"{r['median_paired_speedup']}x [{min(paired):.2f}, {max(paired):.2f}] "
                     f"({len(paired)}) |")
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
