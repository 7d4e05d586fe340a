#!/usr/bin/env bash
# The GPU checks in one go (for a lent GPU machine whose image has torch, triton and transformers but none of
# our other dependencies): the GPU tests, then bench/awq_gpu.py. Logs and the results JSON go to $OUT
# (default ./gpu_out). Wheels for pydantic and its dependencies, when the image lacks them, in ./.whl
# (bench/gpu_wheels.sh fetches them here; carry .whl to the device). A prepared run, as one call:
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)   (the device sets $OUT)
# or in two calls on the warm machine, each with the whole call's time (the first start compiles many kernel
# forms, and the tests and the bench together can outgrow one call):
#   run(command="PHASE=tests TEST_TIMEOUT=560 bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#   run(command="PHASE=bench BENCH_TIMEOUT=560 bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --target /tmp/site pydantic
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PHASE=${PHASE:-all}
if [ "$PHASE" != bench ]; then
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fused.py \
        "tests/test_kernels.py" "tests/test_kv_quant.py" "tests/test_awq_engine.py" "tests/test_awq_inputs.py" \
        "tests/test_awq_tune.py" -m "gpu or not gpu" \
        -k "${TEST_K:-gpu or fused or static}" 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "$PHASE" != tests ]; then
    timeout "${BENCH_TIMEOUT:-330}" python3 bench/awq_gpu.py --no-doc --json-out "$OUT/awq_gpu.json" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log" | grep -v '^{"K"' | tail -60
fi
if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
    timeout 120 ncu --clock-control none -k regex:gemv --metrics \
        gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__grid_size \
        python3 bench/ncu_gemv.py 2>&1 | tee "$OUT/ncu.txt" | grep -E "gemv|duration|throughput|registers|warps_active|inst_executed|grid_size" | head -40
fi
