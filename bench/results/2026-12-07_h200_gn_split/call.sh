#!/usr/bin/env bash
# One-off: LIPSTREAM_GN_SPLIT_BATCH timed on engine files built with it off and on (profiles
# 16 and 24), and LIPSTREAM_FLASH_LDMATRIX on the first file, two alternating rounds; whisper's
# served rows without and with the ldmatrix kernels.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
O=$OUT; W=/tmp/work; mkdir -p $W/ab
bin=./.device/bin/lipstream
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader | tee $O/gpu.txt
LIPSTREAM_FLASH_LDMATRIX=1 LIPSTREAM_GN_SPLIT_BATCH=1 ./.device/bin/gpu_ops --nocapture --test-threads=1 norms_attention tiny_models > $W/ops.txt 2>&1; echo "ops (both on) rc=$?" | tee $O/ops_summary.txt
grep -E "rel L2|test result|panicked|FAILED" $W/ops.txt | tail -40 >> $O/ops_summary.txt
grep -E "test result|panicked" $W/ops.txt
for v in off on; do
  x=0; [ $v = on ] && x=1
  t=$SECONDS
  LIPSTREAM_GN_SPLIT_BATCH=$x $bin engine build --mode avatar --batches 16,24 --out /tmp/$v.engine > $W/build_$v.log 2>&1 || tail -5 $W/build_$v.log
  echo "build $v: $((SECONDS-t)) s"
done
for r in 1 2; do
  for v in off lm on; do
    x=0; [ $v = on ] && x=1
    l=0; [ $v = lm ] && l=1
    e=/tmp/off.engine; [ $v = on ] && e=/tmp/on.engine
    LIPSTREAM_FLASH_LDMATRIX=$l LIPSTREAM_GN_SPLIT_BATCH=$x $bin bench engine --engine $e --stages avatar --runs 30 --profile --out $W/ab/${v}_$r.json > /dev/null 2> $W/ab/${v}_$r.log || tail -5 $W/ab/${v}_$r.log
  done
  python3 scripts/device/ab.py $W/ab/off_$r.json $W/ab/on_$r.json | grep -v per_frame | sed 's/^/gn_split: /' | tee -a $O/ab_summary.txt
  python3 scripts/device/ab.py $W/ab/off_$r.json $W/ab/lm_$r.json | grep -v per_frame | sed 's/^/ldmatrix: /' | tee -a $O/ab_summary.txt
  echo "t=$SECONDS"
done
for v in off lm on; do echo "== $v"; grep -A16 "avatar_frame B=24 profile" $W/ab/${v}_1.log | head -16; done > $O/profiles.txt
grep -E "group_norm|attention |conv_epilogue|conv " $O/profiles.txt
for r in 1 2; do for l in 0 1; do
  LIPSTREAM_FLASH_LDMATRIX=$l $bin bench engine --stages whisper-rows --batches 1,4,8 --runs 50 --profile --out $W/ab/whisper_${l}_$r.json > /dev/null 2> $W/ab/whisper_${l}_$r.log || tail -5 $W/ab/whisper_${l}_$r.log
done
python3 scripts/device/ab.py $W/ab/whisper_0_$r.json $W/ab/whisper_1_$r.json | grep -v per_frame | sed 's/^/whisper ldmatrix: /' | tee -a $O/ab_summary.txt
done
grep -A25 "profile" $W/ab/whisper_0_1.log | head -100 > $O/whisper_profile.txt
grep -A25 "B=4 profile" $W/ab/whisper_1_1.log | head -25 >> $O/whisper_profile.txt
tar -C $W -czf $O/ab.tgz ab build_off.log build_on.log ops.txt
echo "total $SECONDS s"
