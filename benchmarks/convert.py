"""Full-size conversion benchmark: ossq vs `mlx_lm convert` on a synthetic gpt-oss-20b.

    python benchmarks/convert.py WORKDIR [--keep-source] [--skip-mlx-lm] [--no-compare] [--experts keep|quantize]

Synthesizes gpt-oss-20b in the published MXFP4 layout into WORKDIR/gpt-oss-20b (≈ 13.8 GB; reused when
present), converts it to 4-bit group 64 with ossq and with mlx-lm — each in its own process, timed, with its
peak resident set read from `os.wait4`'s rusage and watched so that a runaway run is killed instead of
starving the machine — then checks that the two outputs hold the same tensors, bit for bit, in the same
shards. Deletes both outputs (and the source unless --keep-source) at the end. This process imports
neither torch nor mlx, so its own small image is all that a child's `ru_maxrss` inherits from the fork.
Prints a markdown table for benchmarks/convert-results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GB = 10**9
SOURCE_BYTES, OUTPUT_BYTES = 14 * GB, 12 * GB
RSS_LIMIT_BYTES = 16 * GB  # a run above this is killed (the machine has little more)

SYNTHESIZE = "import sys; from ossq.synth import synthesize; synthesize(sys.argv[1], config='20b', seed=0)"
OSSQ = """
import json, sys
from ossq.convert import convert
r = convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=4, q_group_size=64, experts=sys.argv[3], progress=False)
print(json.dumps({"bits_per_weight": r.bits_per_weight, "peak_rss_gb": r.peak_rss_gb, "shards": r.shards}))
"""
COMPARE = """
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
a, b = Path(sys.argv[1]), Path(sys.argv[2])
ia, ib = (json.loads((p / "model.safetensors.index.json").read_text()) for p in (a, b))
assert ia == ib, "index files differ"
for shard in sorted(set(ia["weight_map"].values())):
    with safe_open(str(a / shard), "pt") as fa, safe_open(str(b / shard), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys()), shard
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            same = x.dtype == y.dtype and x.shape == y.shape
            assert same and x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), k
print(json.dumps({"tensors": len(ia["weight_map"]), "shards": len(set(ia["weight_map"].values()))}))
"""


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_bytes: int
    stdout: str
    killed: bool


def run(argv: list[str], *, env: dict[str, str] | None = None) -> Run:
    """Run a child, watching its resident set; its peak comes from the kernel's rusage for that child."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done, killed = threading.Event(), threading.Event()
    threading.Thread(target=_watch, args=(proc.pid, done, killed), daemon=True).start()
    readers = [_Drain(proc.stdout), _Drain(proc.stderr)]
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, never by Popen, so the rusage is this child's
    done.set()
    seconds = time.perf_counter() - start
    stdout, stderr = (r.join_text() for r in readers)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not killed.is_set():
        raise RuntimeError(f"{argv[:3]} failed ({code}):\n{stderr[-4000:]}")
    return Run(seconds, usage.ru_maxrss * 1024, stdout, killed.is_set())


class _Drain(threading.Thread):
    """Collects a pipe so that a chatty child never blocks on a full one."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.chunks = stream, []
        self.start()

    def run(self) -> None:
        self.chunks.extend(self.stream)

    def join_text(self) -> str:
        self.join()
        return "".join(self.chunks)


def _watch(pid: int, done: threading.Event, killed: threading.Event) -> None:
    status = Path(f"/proc/{pid}/status")
    while not done.is_set():
        try:
            rss = next(
                int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmRSS:")
            )
        except (OSError, StopIteration):  # gone, or a zombie
            return
        if rss > RSS_LIMIT_BYTES:
            killed.set()
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return f"{os.cpu_count()} cores ({cpu}), {mem / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    code = (
        "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
        "('torch', 'safetensors', 'mlx', 'mlx-lm')))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--keep-source", action="store_true")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--experts", choices=("keep", "quantize"), default="keep")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src, ours, theirs = work / "gpt-oss-20b", work / "ossq-q4", work / "mlx-lm-q4"
    for stale in (ours, theirs):
        shutil.rmtree(stale, ignore_errors=True)
    rows = [f"machine: {machine()}", f"versions: {versions()}", f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}"]
    free = shutil.disk_usage(work).free
    with_mlx = not args.skip_mlx_lm and args.experts == "keep"  # mlx-lm has no one-step all-affine flavour
    need = (0 if (src / "config.json").exists() else SOURCE_BYTES) + OUTPUT_BYTES
    if free < need:
        sys.exit(f"{work}: {free / GB:.1f} GB free, need {need / GB:.0f} GB")
    if with_mlx and free < need + OUTPUT_BYTES:
        rows.append(f"mlx-lm skipped: {free / GB:.1f} GB free, both outputs need {(need + OUTPUT_BYTES) / GB:.0f} GB")
        with_mlx = False
    try:
        if not (src / "config.json").exists():
            r = run([sys.executable, "-c", SYNTHESIZE, str(src)])
            rows.append(f"synthesized {src.name} in {r.seconds:.0f} s")
        source_gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / GB
        rows.append(f"source: {source_gb:.2f} GB of safetensors")
        table = ["| tool | wall time | peak RSS | output | bits per weight |", "|---|---|---|---|---|"]
        r = run([sys.executable, "-c", OSSQ, str(src), str(ours), args.experts])
        info = json.loads(r.stdout.strip().splitlines()[-1]) if not r.killed else {}
        table.append(_row(f"ossq (experts={args.experts})", r, ours, info.get("bits_per_weight")))
        if with_mlx:
            argv = [
                sys.executable,
                "-m",
                "mlx_lm",
                "convert",
                "--hf-path",
                str(src),
                "--mlx-path",
                str(theirs),
                "-q",
                "--q-bits",
                "4",
                "--q-group-size",
                "64",
            ]
            r = run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            bpw = next(
                (
                    line.split("with ")[1].split(" bits")[0]
                    for line in r.stdout.splitlines()
                    if "bits per weight" in line
                ),
                None,
            )
            table.append(_row("mlx_lm convert", r, theirs, bpw))
            if not args.no_compare and not r.killed:
                c = run([sys.executable, "-c", COMPARE, str(ours), str(theirs)])
                rows.append(f"outputs identical: {c.stdout.strip()} (checked in {c.seconds:.0f} s)")
        print("\n".join(rows + [""] + table))
    finally:
        for path in (ours, theirs, *(() if args.keep_source else (src,))):
            shutil.rmtree(path, ignore_errors=True)


def _row(tool: str, r: Run, out: Path, bpw) -> str:
    if r.killed:
        return f"| {tool} | killed at {RSS_LIMIT_BYTES / GB:.0f} GB RSS after {r.seconds:.0f} s | > limit | – | – |"
    size = sum(p.stat().st_size for p in out.iterdir()) / GB
    bpw_text = f"{float(bpw):.3f}" if bpw is not None else "?"
    return f"| {tool} | {r.seconds:.0f} s | {r.peak_rss_bytes / GB:.2f} GB | {size:.2f} GB | {bpw_text} |"


if __name__ == "__main__":
    main()
