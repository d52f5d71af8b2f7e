"""Load test of `ossq serve` on loopback: many concurrent streaming clients, a fixed number of requests.

    python benchmarks/serve_load.py [-m CHECKPOINT] [--requests 256] [--concurrency 64] [--max-tokens 64]
        [--sequential-requests 16] [--endpoint completions|chat] [--markdown OUT.md] [--json OUT.json]
        [-- SERVE FLAGS...]

Starts `ossq serve` on 127.0.0.1 (a free port) with the checkpoint (default: a tiny synthetic one made
in a temporary directory) and the flags after `--`, waits for it, then:
1. batched: `--requests` streaming requests (distinct prompts, greedy), `--concurrency` at a time;
2. one at a time: `--sequential-requests` of the same requests, one after another;
and stops the server. Every response must end with a finish_reason, a usage chunk and `[DONE]`; the
script reports errors and incomplete responses (and exits 1 if there are any), requests/s, aggregate
generated tok/s (usage completion tokens over the phase's wall time), time to first token (the first
chunk that carries text) p50/p99, latency p50/p99, and the speed-up of batched over one-at-a-time tok/s.
Each request has a timeout and the whole run a deadline (`--deadline`), so it always stops by itself.

`completions` (raw prompts) is the default endpoint: a random synthetic model does not write harmony, and
on chat its text would reach the client only once the parser gives up on a header (32 tokens), which
would measure the parser's hold-back rather than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from ossq.report import system_info


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Phase:
    name: str
    requests: int
    concurrency: int
    wall: float
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        done = [r for r in self.results if r.ok]
        tokens = sum(r.tokens for r in done)
        ttfts = sorted(r.ttft for r in done if r.ttft is not None)
        latencies = sorted(r.latency for r in done)
        return {
            "phase": self.name,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "errors": len(self.results) - len(done),
            "wall_s": self.wall,
            "requests_per_s": len(done) / self.wall,
            "tokens": tokens,
            "tok_per_s": tokens / self.wall,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99),
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "first_errors": [r.error for r in self.results if not r.ok][:3],
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


class Server:
    """`ossq serve` in a subprocess; `url` once it says where it listens."""

    def __init__(self, checkpoint: Path, flags: list[str]) -> None:
        argv = [sys.executable, "-m", "ossq.cli", "serve", "-m", str(checkpoint), "--host", "127.0.0.1"]
        argv += ["--port", "0", "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, ready = None, threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                found = re.search(r"listening on (http://\S+)", line)
                if found:
                    self.url = found.group(1)
                    ready.set()
                elif self.url is None:
                    print(line, end="", file=sys.stderr)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.url is None:
            self.stop()
            raise SystemExit("the server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def body(endpoint: str, i: int, max_tokens: int) -> dict:
    text = f"Request {i}: a few words about the number {i * 7919 % 10007}, please."
    common = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        return {"messages": [{"role": "user", "content": text}], "reasoning_effort": "low", **common}
    return {"prompt": text, **common}


async def one(http: httpx.AsyncClient, path: str, payload: dict, timeout: float) -> Result:
    start = time.perf_counter()
    ttft, tokens, finished, done = None, 0, False, False
    try:
        async with http.stream("POST", path, json=payload, timeout=timeout) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"]))
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text and ttft is None:
                        ttft = time.perf_counter() - start
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    complete = done and finished and tokens > 0
    return Result(complete, ttft, time.perf_counter() - start, tokens, None if complete else "incomplete response")


async def phase(name: str, url: str, args, count: int, concurrency: int, deadline: float) -> Phase:
    path = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    results: list[Result] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            i = queue.get_nowait()
            results.append(await one(http, path, body(args.endpoint, i, args.max_tokens), args.request_timeout))

    async with httpx.AsyncClient(base_url=url, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    missing = count - len(results)
    results += [Result(False, error="not run: the deadline passed")] * missing
    return Phase(name, count, concurrency, wall, results)


def markdown(report: dict) -> str:
    batched, alone = report["phases"]
    rows = [
        ("requests (errors)", lambda p: f"{p['requests']} ({p['errors']})"),
        ("concurrent clients", lambda p: str(p["concurrency"])),
        ("requests/s", lambda p: f"{p['requests_per_s']:.2f}"),
        ("generated tok/s (aggregate)", lambda p: f"{p['tok_per_s']:.1f}"),
        ("TTFT p50 / p99 (ms)", lambda p: f"{p['ttft_p50_ms']:.0f} / {p['ttft_p99_ms']:.0f}"),
        ("latency p50 / p99 (s)", lambda p: f"{p['latency_p50_s']:.2f} / {p['latency_p99_s']:.2f}"),
    ]
    lines = ["| | batched | one at a time |", "| --- | --- | --- |"]
    lines += [f"| {label} | {fmt(batched)} | {fmt(alone)} |" for label, fmt in rows]
    lines.append(f"\nSpeed-up of batched over one-at-a-time serving (tok/s): **{report['speedup']:.2f}×**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, default=None, help="checkpoint (default: a tiny synthetic one)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sequential-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--deadline", type=float, default=1800.0, help="seconds the whole run may take")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.model
        if checkpoint is None:
            from ossq.synth import synthesize

            checkpoint = synthesize(Path(tmp) / "tiny", config="tiny", seed=0)
        server = Server(checkpoint, serve_flags)
        try:
            asyncio.run(phase("warm-up", server.url, args, 2, 1, deadline))
            batched = asyncio.run(phase("batched", server.url, args, args.requests, args.concurrency, deadline))
            alone = asyncio.run(phase("one at a time", server.url, args, args.sequential_requests, 1, deadline))
        finally:
            server.stop()
    phases = [batched.summary(), alone.summary()]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "model": str(args.model or "tiny (synthetic)"),
        "endpoint": args.endpoint,
        "max_tokens": args.max_tokens,
        "system": system_info(),
        "phases": phases,
        "speedup": phases[0]["tok_per_s"] / phases[1]["tok_per_s"],
    }
    print(markdown(report))
    for ph in phases:
        for error in ph["first_errors"]:
            print(f"{ph['phase']}: {error}", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.json:
        args.json.write_text(json.dumps({**report, "results": {"batched": [asdict(r) for r in batched.results]}}))
    return 1 if any(ph["errors"] for ph in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
