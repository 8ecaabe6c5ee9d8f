"""`edgeq serve` under load: 32 real HTTP clients on loopback for --minutes, mixing streamed and whole replies,
JSON-schema replies, tool calls and clients that leave mid-stream.

The server is the real `edgeq serve` in a process of its own (two models: --bundle, the SmolLM2 Q4_K_M export by
default, and a tiny random model whose template speaks Hermes tools, since SmolLM2's has no tools). Each client
loops until the time is up: it picks a request kind, sends it with `http.client`, and on a 429 waits what
Retry-After says. Reported: p50/p99 time to first token (streams) and latency per kind, status counts, the
server's RSS sampled every second. The bars:
  - no 5xx;
  - RSS flat after warm-up: the last quarter's median within --rss-slack of the second quarter's;
  - a client that leaves mid-stream frees the model within one decode step (measured alone, afterwards: the time
    from the socket closing until /health shows the model idle, against the median gap between streamed tokens);
  - every 429 carries Retry-After, and no request hangs (each is bounded by --request-timeout).

    python bench/serve_load.py [--bundle BUNDLE] [--minutes 10] [--clients 32] [--threads 1]
"""
from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from lib import harness
import psutil

sys.path.insert(0, str(harness.BENCH.parent / "tests"))
from tool_templates import build_tool_model  # noqa: E402  (a tiny tool-speaking model, as the server tests use)

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 40}},
          "required": ["answer", "why"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}}}
PROMPTS = ["Name one planet.", "What is 2 + 3?", "Say hello in French.", "Give one word that rhymes with cat.",
           "Tell me one fact about the moon.", "What colour is the sky?", "Name a fruit.", "Count from 1 to 5."]
KINDS = ("stream", "whole", "schema", "tools", "leave")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.status: dict[int, int] = {}
        self.ttft: list[float] = []
        self.latency: dict[str, list[float]] = {k: [] for k in KINDS}
        self.no_retry_after = 0
        self.hung = 0

    def add(self, **kw):
        with self.lock:
            if "status" in kw:
                self.status[kw["status"]] = self.status.get(kw["status"], 0) + 1
            if kw.get("ttft") is not None:
                self.ttft.append(kw["ttft"])
            if kw.get("latency") is not None:
                self.latency[kw["kind"]].append(kw["latency"])


def _request(port: int, model: str, kind: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": random.choice(PROMPTS)}], "max_tokens": max_tokens,
            "temperature": 0}
    if kind in ("stream", "leave"):
        body["stream"] = True
    if kind == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    if kind == "tools":
        body["tools"], body["tool_choice"] = [WEATHER], "required"
        body["messages"] = [{"role": "user", "content": "Weather in Paris?"}]
    return body


def client(port: int, models: dict, stop_at: float, stats: Stats, args, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        kind = rng.choice(KINDS)
        model = models["tools"] if kind == "tools" else models["chat"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        start = time.monotonic()
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(_request(port, model, kind, args.new_tokens)),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status == 429:
                wait = response.getheader("Retry-After")
                response.read()
                stats.add(status=429)
                if wait is None:
                    stats.no_retry_after += 1
                time.sleep(float(wait or 1) * rng.uniform(0.5, 1.5))
                continue
            if kind in ("stream", "leave"):
                first = None
                for n, line in enumerate(response):
                    if first is None and line.startswith(b"data:"):
                        first = time.monotonic() - start
                    if kind == "leave" and n >= 6:
                        break  # gone mid-stream: the connection closes below without reading the rest
                stats.add(status=response.status, ttft=first, kind=kind, latency=time.monotonic() - start)
            else:
                response.read()
                stats.add(status=response.status, kind=kind, latency=time.monotonic() - start)
        except TimeoutError:
            stats.hung += 1
        except (ConnectionError, http.client.HTTPException) as exc:
            stats.add(status=599)
            print(f"client error: {exc!r}", flush=True)
        finally:
            conn.close()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def idle(port: int, name: str) -> bool:
    return health(port)["models"][name].get("running", 0) == 0


def leave_timing(port: int, model: str, runs: int = 5) -> tuple[float, float]:
    """(median s from a streaming client leaving until the model is idle, median s between streamed tokens), measured
    with nothing else running."""
    freed, gaps = [], []
    for _ in range(runs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({**_request(port, model, "stream", 400), "messages": [
            {"role": "user", "content": "Write a long story about a fox and a river."}]}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        stamps = []
        for line in response:
            if line.startswith(b"data:"):
                stamps.append(time.monotonic())
            if len(stamps) >= 12:
                break
        conn.sock.shutdown(2)
        conn.close()
        left = time.monotonic()
        while not idle(port, model):
            time.sleep(0.002)
        freed.append(time.monotonic() - left)
        gaps.append(statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])))
        time.sleep(0.2)
    return statistics.median(freed), statistics.median(gaps)


def sample_rss(pid: int, stop: threading.Event, samples: list) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while not stop.wait(1.0):
        samples.append((time.monotonic() - start, process.memory_info().rss))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [float("nan")])[0]


def start_server(bundles: list[Path], args) -> tuple[subprocess.Popen, int]:
    log = open(args.work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", "from edgeq.cli import main; main()", "serve", *map(str, bundles), "--port", str(args.port),
                               "--queue-size", str(args.queue_size), "--threads", str(args.threads), "--timeout", "120"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            health(args.port)
            return server, args.port
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"edgeq serve exited with {server.returncode}; see {args.work / 'server.log'}")
            time.sleep(0.5)
    server.kill()
    raise SystemExit("edgeq serve did not answer /health within 300 s")


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2-plain", bundle=True, text=False, work="edgeq-bench-serve", new_tokens=24, threads=1)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--request-timeout", type=float, default=180.0, help="a request not answered in this long counts as hung")
    ap.add_argument("--rss-slack", type=float, default=0.05, help="RSS growth allowed between warm-up and the end (share)")
    args = harness.parse(ap)
    tool_model = args.work / "tool-model"
    if not (tool_model / "config.json").is_file():
        build_tool_model(tool_model)
    tool_bundle = args.work / "tools-q8_0"
    if not (tool_bundle / "edgeq.json").is_file():
        import edgeq

        edgeq.export(tool_model, format="gguf", precision="Q8_0", output=tool_bundle, eval_tokens=0)
    server, port = start_server([args.bundle, tool_bundle], args)
    models = {"chat": args.bundle.name, "tools": tool_bundle.name}
    stats, samples, stop = Stats(), [], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(server.pid, stop, samples), daemon=True)
    try:
        sampler.start()
        stop_at = time.monotonic() + args.minutes * 60
        clients = [threading.Thread(target=client, args=(port, models, stop_at, stats, args, i)) for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(args.minutes * 60 + args.request_timeout + 30)
        stop.set()
        freed, gap = leave_timing(port, models["chat"])
    finally:
        server.terminate()
        server.wait(30)
    report(stats, samples, freed, gap, args)


def report(stats: Stats, samples: list, freed: float, gap: float, args) -> None:
    print(f"{args.clients} clients for {args.minutes:g} min on {args.bundle.name} (+ a tiny tool model), "
          f"queue {args.queue_size}, {args.threads} thread(s); replies up to {args.new_tokens} tokens")
    print("status counts:", dict(sorted(stats.status.items())))
    rows = {"TTFT (streams)": (percentile(stats.ttft, 50), percentile(stats.ttft, 99), len(stats.ttft))}
    rows.update({f"latency {k}": (percentile(v, 50), percentile(v, 99), len(v)) for k, v in stats.latency.items() if v})
    harness.table({"p50 s": ">9.3f", "p99 s": ">9.3f", "n": ">7.0f"}, rows, 20)
    rss = [r / 2**20 for _, r in samples]
    quarter = max(len(rss) // 4, 1)
    warm, end = statistics.median(rss[quarter:2 * quarter] or rss), statistics.median(rss[-quarter:])
    print("RSS MiB over time (every ~10% of the run):", " ".join(f"{rss[i]:.0f}" for i in range(0, len(rss), max(len(rss) // 10, 1))))
    verdicts = harness.Verdicts()
    verdicts.info(f"peak RSS {max(rss):.0f} MiB; after warm-up {warm:.0f} MiB, at the end {end:.0f} MiB")
    verdicts.check(not any(s >= 500 for s in stats.status), f"no 5xx ({sum(n for s, n in stats.status.items() if s >= 500)} seen)")
    verdicts.at_most("RSS growth after warm-up (share)", (end - warm) / warm, args.rss_slack)
    verdicts.at_most("slot freed after a client leaves / one decode step", freed / gap, 1.0, ".2f")
    verdicts.info(f"freed in {freed * 1e3:.1f} ms; a decode step is {gap * 1e3:.1f} ms")
    verdicts.check(stats.status.get(429, 0) > 0 and stats.no_retry_after == 0,
                   f"429s carry Retry-After ({stats.status.get(429, 0)} answered 429, {stats.no_retry_after} without it)")
    verdicts.check(stats.hung == 0, f"no request hung past {args.request_timeout:g} s ({stats.hung})")
    verdicts.exit()


if __name__ == "__main__":
    main()
