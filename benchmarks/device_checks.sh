#!/usr/bin/env bash
# Every CUDA figure BENCHMARKS.md lacks, and the GPU tests, in one run of under 9 minutes on the lent
# device machine (a session has 15 minutes of device time, the machine's start included).
#
#   here:   pip download -d .whl hydra-core omegaconf datasets wandb ...   # what an offline GPU machine lacks
#   there:  run(command="bash benchmarks/device_checks.sh", carry=[".whl"], timeout_s=600)
#   smoke:  bash benchmarks/device_checks.sh smoke      # tiny shapes on the CPU: checks this script
#
# Steps run most important first, each under its own time limit, so a slow one cannot take the rest
# with it. What comes back ($OUT, else ./device_out): results.txt (each step's JSON lines under a
# "### step rc=N seconds=S" header), log.txt (stderr), machine.txt (GPU, driver, packages).
set -uo pipefail
mode=${1:-cuda}
out=${OUT:-device_out}
mkdir -p "$out"
: >"$out/results.txt"
: >"$out/log.txt"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$out/log.txt" 2>&1 || { echo "wheels did not install" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(liger-kernel|cut-cross-entropy|lightning|peft|hydra-core|omegaconf|deepspeed|datasets|wandb) " || true
} >"$out/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "### $name: $*" >>"$out/log.txt"
  timeout --kill-after=10 "$limit" "$@" >"$out/step.out" 2>>"$out/log.txt"
  rc=$?
  echo "### $name rc=$rc seconds=$(( $(date +%s) - start ))" >>"$out/results.txt"
  cat "$out/step.out" >>"$out/results.txt"
  rm -f "$out/step.out"
  echo "$name: rc=$rc ($(( $(date +%s) - start )) s)"
}

if [ "$mode" = smoke ]; then
  dev=cpu; t5=tiny; llama=tiny; loss=(tiny tiny tiny); steps=1; repeats=1
else
  dev=cuda; t5=t5-large; llama=llama-1b; loss=(llama-1b t5-base t5-large); steps=5; repeats=3
fi
dec=(python3 benchmarks/decoding.py --device "$dev" --json)
mel=(python3 benchmarks/multi_exit_loss.py --device "$dev" --json)

# issue 7: batch 1 / 8 / 64 rows of both GPU shapes (hf, full, static, eetrain), then where gather wins
step "decoding $llama" 130 "${dec[@]}" --shape "$llama" --repeats "$repeats"
step "decoding $t5" 130 "${dec[@]}" --shape "$t5" --repeats "$repeats"
# issue 3: the fused multi-exit loss against plain and naive (peak memory, time)
step "multi_exit_loss ${loss[0]}" 80 "${mel[@]}" --shape "${loss[0]}" --steps "$steps"
step "decoding crossover $llama" 60 "${dec[@]}" --shape "$llama" --crossover --repeats "$repeats"
step "gpu tests" 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_distributed.py
step "multi_exit_loss ${loss[1]}" 40 "${mel[@]}" --shape "${loss[1]}" --steps "$steps"
step "multi_exit_loss ${loss[2]}" 45 "${mel[@]}" --shape "${loss[2]}" --steps "$steps"
# issue 13: what each real policy's decisions cost
step "decoding policies $t5" 40 "${dec[@]}" --shape "$t5" --policies --repeats "$repeats"
