#!/usr/bin/env bash
# Tensor parallelism on a machine with 1..8 GPUs (issue 14), from the repo root:
#   OUT=dir bash benchmarks/gpu_parallel.sh        (results under $OUT, or ./parallel-out)
# 1. the GPUs and an NCCL all-reduce across all of them (bus bandwidth at 256 MiB, latency at the 5.6 KiB
#    of one decode token's hidden state), NVLink multicast off (NCCL_NVLS_ENABLE=0);
# 2. a synthetic gpt-oss-20b in the published layout (random weights), converted as `-q --q-bits 4`
#    (MXFP4 experts kept, 4-bit g64 rest);
# 3. `ossq bench` plain on one GPU, then through the distributed path (`torchrun`, --tp 1: the overhead
#    must be nil), then --tp 2/4/8 as far as the GPUs go: batch-1 decode and 64-sequence throughput;
# 4. `ossq generate --temp 0` at every degree, its text compared with --tp 1's (bf16 partial sums are
#    added in another order across ranks, so a late divergence is possible; the table says where);
# 5. --ep 2/4/8 the same way (bench's figures are one rank's; the machine runs N times them), and
#    `ossq serve --dp N` under benchmarks/serve_load.py against --dp 1 (SERVE=0 skips it);
# 6. $OUT/parallel.md: the table. Every degree runs the default ops (Triton and CUDA graphs on CUDA).
# Takes about 5 minutes on one GPU (SYNTH reuses $WORK/src when it exists).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" parallel-out
export NCCL_NVLS_ENABLE=0
W=${WORK:-/tmp/ossq-gpu}
GEN=${GEN_TOKENS:-64}
mkdir -p "$W"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/machine.txt"
echo "device_count: $N" | tee -a "$OUT/machine.txt"

cat > "$W/allreduce.py" <<'EOF'
import os, time, torch, torch.distributed as dist
dist.init_process_group("nccl")
r, n = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
def timed(numel, iters):
    x = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
    for _ in range(5): dist.all_reduce(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(iters): dist.all_reduce(x)
    torch.cuda.synchronize(); return (time.perf_counter() - t) / iters
big = timed(128 * 2**20, 20)  # 256 MiB of bf16
small = timed(2880, 200)  # one token's hidden state of gpt-oss (2880 bf16)
if r == 0:
    bus = 2 * (n - 1) / n * 256 * 2**20 / big / 1e9
    print(f"| {n} | {bus:.1f} | {small * 1e6:.1f} |")
dist.destroy_process_group()
EOF
{
  echo "## NCCL all-reduce (NCCL_NVLS_ENABLE=0)"
  echo
  echo "| GPUs | bus bandwidth at 256 MiB (GB/s) | latency at 5.6 KiB (µs) |"
  echo "|---:|---:|---:|"
  if [ "$N" -gt 1 ]; then torchrun --standalone --nproc-per-node "$N" "$W/allreduce.py"; else echo "| 1 | — | — |"; fi
} > "$OUT/allreduce.md"
cat "$OUT/allreduce.md"

[ -e "$W/src" ] || ossq synth --preset 20b --out "$W/src" --device cuda
[ -e "$W/mxfp4-q4" ] || ossq convert --hf-path "$W/src" --mlx-path "$W/mxfp4-q4" -q --q-bits 4 --device cuda
BENCH=(bench -m "$W/mxfp4-q4" --prompt-tokens 90 --gen-tokens "$GEN" --batch 64 --repeats 2 --warmup 1)
PROMPT=(generate -m "$W/mxfp4-q4" -p "Explain tensor parallelism." --max-tokens 48 --temp 0)
ossq "${BENCH[@]}" --json "$OUT/plain.json" || true  # a failed run is a row of the table
ossq "${PROMPT[@]}" > "$OUT/generate-plain.txt"
torchrun --standalone --nproc-per-node 1 -m ossq.cli "${BENCH[@]}" --tp 1 --json "$OUT/tp1.json" || true
for tp in 1 2 4 8; do
  [ "$tp" -le "$N" ] || break
  [ "$tp" -eq 1 ] || ossq "${BENCH[@]}" --tp "$tp" --json "$OUT/tp$tp.json" || true
  ossq "${PROMPT[@]}" --tp "$tp" > "$OUT/generate-tp$tp.txt" || true
  if [ "$tp" -gt 1 ]; then
    ossq "${BENCH[@]}" --ep "$tp" --json "$OUT/ep$tp.json" || true
    ossq "${PROMPT[@]}" --ep "$tp" > "$OUT/generate-ep$tp.txt" || true
  fi
done
if [ "${SERVE:-1}" = 1 ]; then
  for dp in 1 "$N"; do
    timeout 300 python3 benchmarks/serve_load.py -m "$W/mxfp4-q4" --requests 512 --concurrency $((64 * dp)) \
      --sequential-requests 4 --max-tokens 128 --deadline 240 --markdown "$OUT/serve-dp$dp.md" -- --device cuda \
      --dp "$dp" > /dev/null 2>&1 || true
    [ "$dp" -eq "$N" ] && break
  done
fi

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def row(name, path):
    r = json.loads(path.read_text())["rows"][0]
    if r.get("error"):
        return f"| {name} | error: {r['error']} | | | |"
    return f"| {name} | {r['generation_tps']:,.1f} | {r['batch_tps@64']:,.1f} | {r['peak_memory_gb']:.1f} |"
def text(p):  # the completion, without the lines of timings
    lines = p.read_text().splitlines() if p.exists() else []
    return "\n".join(l for l in lines if "tok/s" not in l and "peak memory" not in l)
ref = text(out / "generate-tp1.txt")
lines = ["## gpt-oss-20b (synthetic, MXFP4 experts + 4-bit g64), greedy", "",
         "| run | batch-1 decode (tok/s) | 64 sequences (tok/s, all) | peak memory rank 0 (GB) | greedy text = --tp 1 |",
         "|---|---:|---:|---:|---|"]
plain = row("plain, one GPU", out / "plain.json")
lines.append(plain[:-1] + (" | " + ("yes" if text(out / "generate-plain.txt") == ref else "no") + " |"))
for flag, tp in [("tp", t) for t in (1, 2, 4, 8)] + [("ep", t) for t in (2, 4, 8)]:
    p = out / f"{flag}{tp}.json"
    if p.exists():
        same = text(out / f"generate-{flag}{tp}.txt") == ref
        name = f"--{flag} {tp}" + (" (torchrun)" if tp == 1 else "") + (" (one rank's; ×N the machine's)" if flag == "ep" else "")
        lines.append(row(name, p)[:-1] + f" | {'yes' if same else 'no'} |")
for dp in sorted(out.glob("serve-dp*.md")):
    lines += ["", f"### ossq serve --dp {dp.stem.removeprefix('serve-dp')}", "", dp.read_text()]
(out / "parallel.md").write_text((out / "allreduce.md").read_text() + "\n" + "\n".join(lines) + "\n")
print((out / "parallel.md").read_text())
EOF
