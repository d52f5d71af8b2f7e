# A/B of this tree against ../.snapold (git archive of the base): kernels.py gemv+moe, ncu of the decode GEMV/MoE kernels, the GPU kernel tests.
source benchmarks/gpu_env.sh o
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm --format=csv > $OUT/tests.log 2>&1
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_ops.py tests/test_triton_moe.py >> $OUT/tests.log 2>&1; echo rc=$? >> $OUT/tests.log
tail -3 $OUT/tests.log
NEW=$PWD
for t in new old; do
  d=$NEW; [ $t = old ] && d=$NEW/../.snapold
  (cd $d && timeout 200 python3 benchmarks/kernels.py --out $OUT/k-$t --quick --only gemv moe) > $OUT/k-$t.log 2>&1
  mv $OUT/k-$t/kernels.json $OUT/k-$t.json; rmdir $OUT/k-$t
  grep -E "default|router|experts" $OUT/k-$t.log | head -30
done
for t in new old; do
  d=$NEW; [ $t = old ] && d=$NEW/../.snapold
  cp /dev/null $OUT/ncu-$t.csv
  (cd $d && timeout 150 ncu --clock-control none -k regex:'_qmv_kernel|_gate_up_kernel|_down_kernel' --launch-skip 0 --launch-count 10 \
     --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section LaunchStats \
     --csv --page details python3 $NEW/benchmarks/ncu_driver.py) > $OUT/ncu-$t.csv 2>> $OUT/ncu.err
  echo ncu $t rc=$? $(wc -l < $OUT/ncu-$t.csv)
done
