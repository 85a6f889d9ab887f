#!/usr/bin/env bash
# One-off: fused attention's K/V fragments through four-matrix ldmatrix, loads grouped before
# their products (LIPSTREAM_FLASH_LDMATRIX, and _BOUND with registers capped) against the plain
# kernels, on one avatar engine file (profile 24; group norms of large batches split, now the
# default) and on whisper's served rows; two alternating rounds. Numerics first.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
O=$OUT; W=/tmp/work; mkdir -p $W/ab
bin=./.device/bin/lipstream
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader | tee $O/gpu.txt
for x in LIPSTREAM_FLASH_LDMATRIX; do
  env $x=1 ./.device/bin/gpu_ops --nocapture --test-threads=1 norms_attention tiny_models > $W/ops_$x.txt 2>&1; echo "ops $x rc=$?" | tee -a $O/ops_summary.txt
  grep -E "attention.*rel L2|whisper.*graph rel L2|test result|panicked|FAILED" $W/ops_$x.txt | tail -30 >> $O/ops_summary.txt
  grep -E "test result|panicked" $W/ops_$x.txt
done
t=$SECONDS
$bin engine build --mode avatar --batches 24 --out /tmp/a.engine > $W/build.log 2>&1 || tail -5 $W/build.log
echo "build: $((SECONDS-t)) s"
run() { # name envs...
  local n=$1; shift
  env "$@" $bin bench engine --engine /tmp/a.engine --stages avatar --runs 30 --profile --out $W/ab/$n.json > /dev/null 2> $W/ab/$n.log || tail -5 $W/ab/$n.log
  env "$@" $bin bench engine --stages whisper-rows --batches 1,4,8 --runs 50 --profile --out $W/ab/w$n.json > /dev/null 2> $W/ab/w$n.log || tail -5 $W/ab/w$n.log
}
for r in 1 2; do
  [ $r = 2 ] && [ $SECONDS -gt 170 ] && break
  run plain_$r X=0
  run lm_$r LIPSTREAM_FLASH_LDMATRIX=1
  run lmb_$r LIPSTREAM_FLASH_LDMATRIX_BOUND=1
  for v in lm lmb; do
    python3 scripts/device/ab.py $W/ab/plain_$r.json $W/ab/${v}_$r.json | grep -v per_frame | sed "s/^/$v: /" | tee -a $O/ab_summary.txt
    python3 scripts/device/ab.py $W/ab/wplain_$r.json $W/ab/w${v}_$r.json | grep -v per_frame | sed "s/^/$v: /" | tee -a $O/ab_summary.txt
  done
  echo "t=$SECONDS"
done
for v in plain lm lmb; do echo "== $v"; grep -E "^  attention " $W/ab/${v}_*.log; grep -E "^  attention " $W/ab/w${v}_*.log; done | tee $O/attention.txt
tar -C $W -czf $O/ab.tgz ab build.log ops_LIPSTREAM_FLASH_LDMATRIX.txt
echo "total $SECONDS s"
