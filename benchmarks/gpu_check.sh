#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU and jax[cuda], flax, optax,
# numpy (torch/torchvision/transformers for --peers); no data-pipeline packages needed.
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh                 # tests + whole suite + peers
#   ONLY="bert_base resnet50" PEERS= bash benchmarks/gpu_check.sh
#
# Writes under $OUT: nvidia-smi.txt, pytest-gpu.log (the tests marked `gpu`: cuDNN attention,
# the cuDNN LSTM and the Pallas kernels (LSTM, attention with dropout) against the XLA
# paths), and per group of workloads suite-N.log/.json.
# ONLY: workload groups separated by ";" (each group one `python -m benchmarks` run, in
# order, so the first group's numbers exist even if a later one runs out of time). A group
# may carry flags of its own after its workloads, e.g.
#   ONLY="bert_base --impls default; bert_base --impls default --step-rng unsafe_rbg"
# EXTRA: more flags for every benchmark run, e.g. EXTRA="--step-rng unsafe_rbg".
# PROFILE=1: also profile each of our steps (benchmarks/profile.py) into $OUT/profile-N/:
# summary.txt/.json and the gzipped optimised HLO; the raw traces are deleted unless
# KEEP_TRACES=1 (they can be large). To profile only some groups, give those groups
# `--profile $OUT/profile-N` instead (the same clean-up applies to any profile under $OUT).
# TESTS= (empty) skips the tests; PEERS= (empty) skips the peers. BENCH_TIMEOUT (s) bounds
# each group: at that time the suite is sent SIGTERM, kills the workload process it is
# running (so nothing of this group holds the GPU when the next starts), and still writes
# the rows measured so far to suite-N.json (the rest marked stopped). --timeout S in a group
# bounds each of its workload processes instead, and the group goes on to the next.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
if [ -n "${TESTS-1}" ]; then
  JAX_PLATFORMS=cuda timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -m gpu -o addopts= \
    -p no:cacheprovider tests/test_attention.py tests/test_rnn.py tests/test_pallas_lstm.py \
    tests/test_pallas_attention.py 2>&1 | tee "$OUT/pytest-gpu.log"
fi
PEERS=${PEERS---peers}
i=0
IFS=';' read -ra GROUPS_ <<<"${ONLY:-}"
[ ${#GROUPS_[@]} -eq 0 ] && GROUPS_=("")
for group in "${GROUPS_[@]}"; do
  i=$((i + 1))
  profile=()
  [ -n "${PROFILE:-}" ] && profile=(--profile "$OUT/profile-$i")
  # shellcheck disable=SC2086
  timeout -k 30 "${BENCH_TIMEOUT:-3000}" python -m benchmarks --suite gpu ${group:+--only $group} \
    $PEERS ${EXTRA:-} ${profile[@]+"${profile[@]}"} --json "$OUT/suite-$i.json" 2>&1 | tee "$OUT/suite-$i.log"
  find "$OUT" -name step.hlo.txt -exec gzip -f {} \;
  [ -n "${KEEP_TRACES:-}" ] || find "$OUT" -depth -type d -name trace -path '*profile*' -exec rm -rf {} \;
done
