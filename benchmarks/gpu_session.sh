#!/usr/bin/env bash
# Every GPU-only check of the project in one device run, sized for the lent machine's 15 minutes
# (issues #4 and #7; results go to BENCHMARKS.md with the device and the command):
#   1. pytest tests/kernels            the Triton kernels compiled for real, fp32 and bf16, and the
#                                      static decoder's CUDA graphs against the dynamic path
#   2. benchmarks/kernel_suite.py      RMSNorm, SwiGLU, MoE dispatch, FP8 GEMM, fused cross-entropy
#   3. benchmarks/fp8_gemm.py --sweep  FP8 GEMM / grouped GEMM tile configurations
#   4. benchmarks/pretrain_mfu.py      single-GPU MFU of `small`, bf16 and FP8, with a profile
#   5. benchmarks/model_generate.py --static  rollout decoding at 128 rows x 512 new tokens: CUDA-graph
#                                      static path vs the dynamic one vs transformers' generate()
#   6. benchmarks/optimizer_step.py    AdamW's step on a 1B-element flat partition (279M on CPU), foreach vs fused:
#                                      time and the step's extra memory
# Each part has its own time limit, so one slow part cannot lose the others; every part's output
# is also written under $OUT (the device tool brings it back).
#
# The GPU image has torch and triton but not pydantic, omegaconf or pytest. On the CPU machine, once:
#   echo /.whl/ >> .git/info/exclude   # (already in .gitignore)
#   ../shared/tools/gpu-wheels.sh .whl pytest pluggy iniconfig pygments packaging
# then through the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
set -uo pipefail
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PYTHON:-python3}
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/device.txt"
part tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_model_generate.py::test_gpu_static_cuda_graphs_equal_dynamic
part kernels 170 "$PY" benchmarks/kernel_suite.py
part fp8_sweep 90 "$PY" benchmarks/fp8_gemm.py --sweep --shapes 4096x4096x4096
part mfu 130 "$PY" benchmarks/pretrain_mfu.py --preset small --batch 16 --seq 2048 --steps 10 --fp8 --profile 25
part decode 60 "$PY" benchmarks/model_generate.py --static --repeats 1
part adamw 15 "$PY" benchmarks/optimizer_step.py
