#!/usr/bin/env bash
# The next device call's parts, in order of value, each under a time limit of its own inside the
# call's (LIMIT seconds, default 570 of the device's 600), so that a part that runs long leaves
# the later parts their turn and every finished part's files come back. Run on the device
# machine from the repository root; writes under $OUT (at most 8 files come back from a call).
#
#   bash bench/gpu_call.sh cudnn cmdbuf    # ~6 min: bench/NOTES.md, sessions 25 and 26
#   bash bench/gpu_call.sh colocate        # ~8 min: the inference step's margin at the 90th pct
#
# cudnn:    cuDNN's fused attention against XLA's: agreement (check_gpu.py part 5), then both
#           timed in one process (attention.py).
# cmdbuf:   decode.py's command-buffer update-mode variants at the TinyLlama shape, then the
#           engine's whole step (engine_ms) under the fastest mode whose output matched.
# colocate: harli with the inference step's margin at the 90th percentile (harli:e90) beside
#           harli, static and serve-only on the same traces; fill_analysis strips the timelines.
set -u
LIMIT=${LIMIT:-570}
START=$(date +%s)

left() { echo $((LIMIT - $(date +%s) + START)); }

# part NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (and what is left), logged to
# $OUT/NAME.log, and prints its status and the log's tail.
part() {
    local name=$1 seconds=$2
    shift 2
    if ((seconds > $(left) - 5)); then seconds=$(($(left) - 5)); fi
    if ((seconds < 30)); then
        echo "== $name: skipped, $(left) s left"
        return
    fi
    timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc=$? at $(($(date +%s) - START)) s"
    tail -n 20 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for what in "$@"; do
    case $what in
    cudnn)
        part check 170 python3 bench/check_gpu.py --prefill-only --out "$OUT/check.json"
        part attention 240 python3 bench/attention.py --out "$OUT"
        ;;
    cmdbuf)
        decode=(python3 bench/decode.py --part ours --models tinyllama-1.1b
            --init-random tinyllama-1.1b --batches 1,32 --contexts 1024 --no-prefill)
        part cmdbuf 150 "${decode[@]}" --out "$OUT/decode-cmdbuf.json" --variants \
            kernel,cb-never-update,cb-capture-cmd-never-update,cb-skip-temp,cb-vmm-persistent-temp
        # The mode whose synced step was fastest, on every row, with the default's output: the
        # whole engine (engine_ms) under it, in a second process (XLA_FLAGS is read at start).
        mode=$(python3 - "$OUT/decode-cmdbuf.json" 2>/dev/null <<'PICK'
import json, statistics, sys
rows = list(json.load(open(sys.argv[1]))["details"].values())  # each row's variants
names = {k for r in rows for k in r if k.startswith("cb-")}
fine = [n for n in names if all(r.get(n, {}).get("matches_default") for r in rows)]
best = min(fine, key=lambda n: statistics.mean(r[n]["ours_sync_ms"] for r in rows), default="")
print(rows[0][best]["options"]["xla_gpu_command_buffer_update_mode"] if best else "")
PICK
        )
        echo "== fastest matching update mode: ${mode:-none}"
        if [[ -n $mode ]]; then
            XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=$mode" \
                part cmdbuf-engine 120 "${decode[@]}" --out "$OUT/decode-cmdbuf-$mode.json"
        fi
        ;;
    colocate)
        part colocate 520 python3 bench/colocate.py --duration 8 --page-size 128 \
            --loads heavy,light --policies serve-only,harli,harli:e90,static --remeasure \
            --timelines --out /tmp/colo
        for result in /tmp/colo/colocate-*.json; do
            [[ -f $result ]] || continue # the part was skipped
            python3 bench/fill_analysis.py "$result" --strip "$OUT/$(basename "$result")" | tail -n 30
        done
        ;;
    *) echo "unknown part $what (cudnn, cmdbuf, colocate)" && exit 2 ;;
    esac
done
