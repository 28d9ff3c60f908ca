#!/usr/bin/env bash
# The GPU check: one command that runs pytest-lora's GPU steps and writes what they found under OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR          on a GPU machine (CUDA), under 8 minutes on one H100
#   scripts/gpu_check.sh OUT_DIR --cpu    the same steps on the CPU, small shapes (the script's own test)
#
# Setup: installs bitsandbytes from .gpu-wheels/ (scripts/fetch_gpu_wheels.sh) when it is missing, and
# pytest-lora (--no-deps) when it is missing, into a folder of this run on PYTHONPATH; nothing that is already
# there. Then prints the versions found and stops when one is outside pyproject.toml's declared range.
# Steps: (1) the examples on the device, serially and with -n 2; (2) a QLoRA step (r=8 and r=64, all linear
# layers, gradient checkpointing) on a random-weight Llama loaded in 4 bits through pytest-lora's loader:
# Llama-2-7b's shape and 2,048 tokens on CUDA, a small Llama with 128 tokens on the CPU; (3) an
# out-of-memory error inside lora_train (real on CUDA, simulated on the CPU), then the next test on the
# same base.
# OUT_DIR then holds summary.json, summary.md, qlora-benchmark.json (pytest-benchmark) and one log per
# stage (setup, examples-serial, examples-n2, qlora, oom): 8 files. Exit status: 0 when every step passed,
# 1 when one failed, 2 on a usage error; the summary is written either way.
#
# Environment: PYTHON (default: python, else python3); GPU_CHECK_BUDGET_S (the whole run's time limit,
# default 470 on CUDA, 1200 on a possibly shared CPU runner: a step gets what is left of it, at most its own
# limit);
# GPU_CHECK_MODEL_DIR (where the random-weight model is written once and reused; default
# $TMPDIR/pytest-lora-gpu-check); GPU_CHECK_WHEELS (default .gpu-wheels in the checkout).
set -euo pipefail

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
}

out=""
mode="cuda"
for arg in "$@"; do
    case "$arg" in
        --cpu) mode="cpu" ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "gpu_check: unknown option $arg" >&2
            usage >&2
            exit 2
            ;;
        *)
            if [[ -n "$out" ]]; then
                echo "gpu_check: one OUT_DIR only (got $out and $arg)" >&2
                exit 2
            fi
            out="$arg"
            ;;
    esac
done
if [[ -z "$out" ]]; then
    usage >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
python="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$python" ]]; then
    echo "gpu_check: no python on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
wheels="${GPU_CHECK_WHEELS:-$root/.gpu-wheels}"
model_dir="${GPU_CHECK_MODEL_DIR:-${TMPDIR:-/tmp}/pytest-lora-gpu-check}"
if [[ "$mode" == "cuda" ]]; then
    budget="${GPU_CHECK_BUDGET_S:-470}"
else
    budget="${GPU_CHECK_BUDGET_S:-1200}"
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The checkout's pytest_lora first, whatever else is installed; the model libraries quiet and offline.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
now() { date +%s.%N; }
since() { awk -v end="$(now)" -v start="$1" 'BEGIN { printf "%.1f", end - start }'; }
started=$(now)
deadline=$(($(date +%s) + budget))
installed=""
failed=0
rm -f "$out"/summary.json "$out"/summary.md "$out"/*.log "$out"/qlora-benchmark.json

write_summary() {
    "$python" "$root/scripts/gpu_check_report.py" summary --out "$out" --work "$work" --mode "$mode" \
        --wall "$(since "$started")" --budget "$budget" --installed "$installed" --not-run-reason "${1:-}"
}

# --- setup: install what is missing, then the versions --------------------------------------------------

setup_log="$out/setup.log"
{
    echo "gpu_check: mode $mode, checkout $root, python $python, out $out"
    echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
} | tee "$setup_log"

has_dist() {
    "$python" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$1" >/dev/null 2>&1
}

# What is missing goes into a folder of this run (--target, put on PYTHONPATH after the checkout): the machine's
# Python is left as it was, and an externally managed one (PEP 668) needs no override.
site="$work/site"
install() {
    echo "+ $python -m pip install --target $site $*" >>"$setup_log"
    "$python" -m pip install --disable-pip-version-check --no-input --target "$site" "$@" >>"$setup_log" 2>&1
}

setup_ok=1
if ! has_dist bitsandbytes; then
    shopt -s nullglob
    found=("$wheels"/bitsandbytes-*.whl)
    shopt -u nullglob
    if ((${#found[@]} == 0)); then
        echo "gpu_check: bitsandbytes is not installed and $wheels holds no bitsandbytes wheel." | tee -a "$setup_log" >&2
        echo "  fix: run scripts/fetch_gpu_wheels.sh where PyPI is reachable and carry .gpu-wheels/ with the checkout" \
            | tee -a "$setup_log" >&2
        setup_ok=0
    elif install --no-deps --no-index --find-links "$wheels" bitsandbytes; then
        installed+="bitsandbytes from $wheels;"
        echo "installed bitsandbytes from $wheels into $site" | tee -a "$setup_log"
    else
        echo "gpu_check: installing bitsandbytes from $wheels failed (see $setup_log)" | tee -a "$setup_log" >&2
        setup_ok=0
    fi
fi
if ((setup_ok)) && ! has_dist pytest-lora; then
    # pytest loads the plugin through the installed entry points; the code itself comes from the checkout.
    # No network: the build backend comes from the environment or from the setuptools wheel in .gpu-wheels.
    isolation=()
    if "$python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
        isolation=(--no-build-isolation)
    fi
    # Built from a copy, so the build leaves no build/ or egg-info in the checkout.
    mkdir -p "$work/src"
    cp -R "$root/pyproject.toml" "$root/README.md" "$root/LICENSE" "$root/pytest_lora" "$work/src/"
    if install --no-deps --no-index --find-links "$wheels" "${isolation[@]}" "$work/src"; then
        installed+="pytest-lora (--no-deps);"
        echo "installed pytest-lora --no-deps into $site" | tee -a "$setup_log"
    else
        echo "gpu_check: installing pytest-lora failed (see $setup_log)" | tee -a "$setup_log" >&2
        setup_ok=0
    fi
fi
if [[ -d "$site" ]]; then
    export PYTHONPATH="$root:$site${PYTHONPATH#"$root"}"
fi
if ((setup_ok)); then
    if ! "$python" "$root/scripts/gpu_check_report.py" versions --pyproject "$root/pyproject.toml" \
        --device "$mode" --out "$work/versions.json" 2>&1 | tee -a "$setup_log"; then
        setup_ok=0
    fi
fi
if ((!setup_ok)); then
    write_summary "the setup failed (setup.log): no step ran" >/dev/null || true
    echo "gpu_check: FAILED in the setup; summary in $out/summary.md" >&2
    exit 1
fi

# --- the steps -----------------------------------------------------------------------------------------

# run_step NAME LIMIT_S COMMAND...: the command under the smaller of LIMIT_S and what is left of the budget,
# its output in OUT/NAME.log, its exit code and time in the work folder for the summary.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((deadline - $(date +%s)))
    if ((left < limit)); then
        limit=$left
    fi
    printf '%q ' "$@" >"$work/$name.cmd"
    if ((limit < 10)); then
        echo "== $name: not run, the budget of ${budget} s is spent" | tee "$out/$name.log"
        printf '%s\tbudget\t0\n' "$name" >>"$work/steps.tsv"
        failed=1
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    local start seconds rc=0
    start=$(now)
    timeout --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
    seconds=$(since "$start")
    printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >>"$work/steps.tsv"
    if ((rc == 0)); then
        echo "   passed in ${seconds%.*} s"
    else
        failed=1
        echo "   FAILED (exit $rc) after ${seconds%.*} s; the end of $out/$name.log:"
        tail -n 25 "$out/$name.log" | sed 's/^/   | /'
    fi
}

# file order (pytest-randomly, where installed, would shuffle it), no cache files, test properties in the XML
pytest_args=(-p no:randomly -p no:cacheprovider -o junit_family=xunit1)
if [[ "$mode" == "cuda" ]]; then
    device_args=(--lora-require-gpu --lora-device cuda)
    limits=(150 120 300 120)
else
    device_args=(--lora-device cpu)
    limits=(480 360 240 180)
fi

run_step examples-serial "${limits[0]}" "$python" -m pytest -m lora "${device_args[@]}" examples/ \
    --hypothesis-profile=lora-ci "${pytest_args[@]}" --junitxml="$work/examples-serial.xml"
run_step examples-n2 "${limits[1]}" "$python" -m pytest -m lora "${device_args[@]}" examples/ -n 2 \
    --hypothesis-profile=lora-ci "${pytest_args[@]}" --junitxml="$work/examples-n2.xml"
run_step qlora "${limits[2]}" env PYTEST_LORA_GPU_TESTS_DEVICE="$mode" PYTEST_LORA_QLORA_MODEL_DIR="$model_dir" \
    "$python" -m pytest tests/perf/test_gpu_qlora.py -s "${pytest_args[@]}" --junitxml="$work/qlora.xml" \
    --benchmark-json="$out/qlora-benchmark.json"
run_step oom "${limits[3]}" env PYTEST_LORA_GPU_TESTS_DEVICE="$mode" \
    "$python" -m pytest tests/perf/test_gpu_oom.py "${device_args[@]}" --lora-verify-base -s "${pytest_args[@]}" \
    --junitxml="$work/oom.xml"

echo
summary_rc=0
write_summary || summary_rc=$?
if ((failed || summary_rc)); then
    echo "gpu_check: FAILED; summary in $out/summary.md and $out/summary.json" >&2
    exit 1
fi
echo "gpu_check: passed; summary in $out/summary.md and $out/summary.json"
