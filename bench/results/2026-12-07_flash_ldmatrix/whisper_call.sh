#!/usr/bin/env bash
set -uo pipefail
cd "$(dirname "$0")/../../.."
# One-off (little device time left): the ldmatrix attention experiments on whisper's served rows only.
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
O=$OUT; W=/tmp/work; mkdir -p $W/ab; bin=./.device/bin/lipstream
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/gpu.txt
LIPSTREAM_FLASH_LDMATRIX=1 ./.device/bin/gpu_ops --nocapture --test-threads=1 norms_attention > $W/ops.txt 2>&1; echo "ops rc=$?" | tee $O/ops_summary.txt
grep -E "attention.*rel L2|test result|panicked|FAILED" $W/ops.txt | tail -30 >> $O/ops_summary.txt; grep -E "test result|panicked" $W/ops.txt
for r in 1 2; do for v in plain lm lmb; do
  e=X=0; [ $v = lm ] && e=LIPSTREAM_FLASH_LDMATRIX=1; [ $v = lmb ] && e=LIPSTREAM_FLASH_LDMATRIX_BOUND=1
  env $e $bin bench engine --stages whisper-rows --batches 1,4,8 --runs 50 --profile --out $W/ab/w${v}_$r.json > /dev/null 2> $W/ab/w${v}_$r.log || tail -3 $W/ab/w${v}_$r.log
done
for v in lm lmb; do python3 scripts/device/ab.py $W/ab/wplain_$r.json $W/ab/w${v}_$r.json | grep -v "per_frame\|GPU\|step" | sed "s/^/$v: /" | tee -a $O/ab_summary.txt; done
echo "t=$SECONDS"; done
for v in plain lm lmb; do echo "== $v"; grep -E "profile|^  attention " $W/ab/w${v}_*.log; done > $O/attention.txt
tar -C $W -czf $O/ab.tgz ab ops.txt; echo "total $SECONDS s"
