#!/usr/bin/env bash
# `make demo` now against an earlier commit, back to back on this machine, each from a fresh clone.
#
#   bash benchmarks/bench_demo.sh [BASE=cc54913] [SEED=0]     # -> benchmarks/out/bench_demo.json
#
# Both clones use this checkout's .venv (the same packages) with PYTHONPATH set to the clone, build their
# own data (data/build_demo.py, as `make data`) and run `launch/demo.py --seed SEED`; the demo's own
# wall time (metrics.json `wall_seconds`, every step from the random base to the evaluation) and the
# whole command's are printed with their ratio HEAD / BASE and the held-out accuracies of both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${1:-cc54913}
SEED=${2:-0}
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d /tmp/bench_demo.XXXXXX)
mkdir -p benchmarks/out
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run_one() {  # $1 = label, $2 = commit
  local dir=$WORK/$1
  git clone --quiet "$ROOT" "$dir"
  git -C "$dir" checkout --quiet "$2"
  local start=$(date +%s)
  (cd "$dir" && PYTHONPATH=$dir $PY data/build_demo.py --out data/demo >/dev/null \
    && PYTHONPATH=$dir $PY launch/demo.py --out runs/demo --seed "$SEED" >"$WORK/$1.log" 2>&1)
  echo $(( $(date +%s) - start )) >"$WORK/$1.seconds"
}

run_one base "$BASE"
run_one head "$(git rev-parse HEAD)"
$PY - "$WORK" "$BASE" "$(git rev-parse --short HEAD)" "$SEED" <<'PYEOF'
import json, sys
from pathlib import Path
work, base, head, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = {}
for label in ("base", "head"):
    m = json.loads((work / label / "runs/demo/metrics.json").read_text())
    rows[label] = {
        "demo_seconds": m["wall_seconds"],
        "command_seconds": int((work / f"{label}.seconds").read_text()),
        "single_digit": round(m["single_digit"], 3),
        "composite": round(m["composite"], 3),
        "overall": round(m["overall"]["accuracy"], 3),
        "sum": round(m["per_category"]["sum"]["accuracy"], 3),
    }
ratio = rows["head"]["demo_seconds"] / rows["base"]["demo_seconds"]
result = {"base": base, "head": head, "seed": seed, **rows, "demo_time_ratio_head_over_base": round(ratio, 3)}
Path("benchmarks/out/bench_demo.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
PYEOF
rm -rf "$WORK"
