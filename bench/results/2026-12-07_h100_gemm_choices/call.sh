#!/usr/bin/env bash
# One-off: GPU checks, 24 avatar sessions on the new engine, then base vs new bench on its file.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
O=$OUT; mkdir -p /tmp/work
FULL_CHECK=0 OUT=/tmp/work ./scripts/device/test.sh > /tmp/work/test.txt 2>&1; echo "test rc=$?" | tee $O/test_summary.txt
grep -E "rel L2|test result|panicked|FAILED" /tmp/work/test.txt | tail -40 >> $O/test_summary.txt
grep -E "test result|panicked" /tmp/work/test.txt
LIPSTREAM_FLASH_HALF_EXP=1 ./.device/bin/gpu_ops --nocapture --test-threads=1 norms_attention tiny_models > /tmp/work/hexp_ops.txt 2>&1; echo "hexp ops rc=$?" | tee -a $O/test_summary.txt
grep -E "rel L2|test result|panicked" /tmp/work/hexp_ops.txt | tail -30 >> $O/test_summary.txt
grep -E "test result|panicked" /tmp/work/hexp_ops.txt
MODE=avatar SESSIONS=${SESSIONS:-24} DURATION=12 VARIANTS="new:" OUT=/tmp/work/serve ./scripts/device/serve_ab.sh > /dev/null 2>&1
cp /tmp/work/serve/summary.txt $O/serve_summary.txt; cp /tmp/work/serve/serve_ab.tgz $O/
cat $O/serve_summary.txt | grep -v OpenH264 | tail -30
e=/tmp/avatar.engine
./.device/bin/lipstream engine info $e | head -8
mkdir -p /tmp/work/ab
for r in 1 2; do
  [ $r = 2 ] && [ $SECONDS -gt 470 ] && break
  for b in base new hexp; do
    binp=./.device/bin/lipstream; [ $b = base ] && binp=.device/base/lipstream
    hx=0; [ $b = hexp ] && hx=1
    LIPSTREAM_FLASH_HALF_EXP=$hx $binp bench engine --engine $e --stages avatar --runs 30 --profile --out /tmp/work/ab/${b}_$r.json > /dev/null 2> /tmp/work/ab/${b}_$r.log || tail -5 /tmp/work/ab/${b}_$r.log
  done
  python3 scripts/device/ab.py /tmp/work/ab/base_$r.json /tmp/work/ab/new_$r.json | grep -v per_frame | tee -a $O/ab_summary.txt
  python3 scripts/device/ab.py /tmp/work/ab/new_$r.json /tmp/work/ab/hexp_$r.json | grep -v per_frame | tee -a $O/ab_summary.txt
done
for b in base new hexp; do echo "== $b"; grep -A14 "avatar_frame B=24 profile" /tmp/work/ab/${b}_1.log; done
tar -C /tmp/work -czf $O/ab.tgz ab
