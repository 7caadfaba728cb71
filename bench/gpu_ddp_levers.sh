#!/usr/bin/env bash
# DDP levers against the 1-GPU reference in the same call (nvidia-h200-x2, each part ~6 minutes).
# Session 6's profile: NCCL ran the fp32 gradient all-reduce with its LL protocol and the matmuls
# overlapping it slowed by 3 ms a step. Sessions 7-8 (bench/RESULTS_GPU.md §2), none adopted:
# NCCL_PROTO=Simple ±0, bf16 all-reduce 1.78x vs 1.83x, NCCL_MAX_NCHANNELS=8 1.80x, bucket views ±0.
# Session 9:
#   PART=a: 1 GPU at 16 and 64 x 1024; 2 GPUs at 16 x 1024 with the buffers no longer broadcast
#           before every forward (the new default), with them broadcast (torch's default), and with
#           NCCL's CTA policy "efficiency" (NCCL_CTA_POLICY=1: the fewest SMs that still give
#           decent bandwidth, for overlap with compute).
#   PART=b: 2 GPUs at 64 x 1024 each; then the engine under torchrun at 16 x 1024 with its kernel
#           profile: how long NCCL's kernels run and how much of that nothing overlaps
#           (PROFILE_ENV: environment for that run, e.g. NCCL_CTA_POLICY=1).
#   PART=c: gradients as views into DDP's buckets (the new default): the profile with and without
#           (bucket_view:0), then the stage on 1 GPU and on 2 at 16 x 1024.
#   PART=d: the stage on 1 and 2 GPUs at 32 and 64 x 1024, then the DDP and FSDP GPU tests.
# Session 10:
#   PART=e: the stage on 1 GPU at 16 and 64 x 1024 (one on each GPU, at once), then on 2 GPUs at
#           16 and 64 x 1024 each, then the DDP and FSDP GPU tests.
# Session 11:
#   PART=f: PART=e without the tests (fused projections and bf16 weight copies under DDP).
# Session 12:
#   PART=g: the DDP and FSDP GPU tests first (AdamW16 the optimizer now), then the 1-GPU references
#           and 2 GPUs at 64 x 1024 each.
# Session 13 (for the next session: DDP lost its 1.9x when one GPU got faster):
#   PART=h: the engine under torchrun at 64 x 1024 per GPU, its profile spanning a log step, with
#           the host syncs counted (does the DDP step still stop the host?), then the 1-GPU
#           reference and 2 GPUs at 64 x 1024 (the stage; ~8 minutes in all).
# Session 14 (two GPUs stayed at 1.07-1.09M tokens/s from session 9 on while one GPU alone got 4%
# faster; was a single GPU run beside another slower than alone? PART=i: no, but both GPUs run at
# their power cap and GPU 1 is 2.4% faster than GPU 0; bench/RESULTS_GPU.md §2):
#   PART=i: the stage at 64 x 1024 on GPU 0 alone, on GPU 1 alone, on both at once (two separate
#           runs), then DDP on both, with nvidia-smi's clocks, power, temperature and clock event
#           reasons logged every 500 ms (smi.csv; marks.txt says which run was when).
#   PART=j: GPU 0 alone, then DDP as it is, with the all-reduce in bf16, and with NCCL_PROTO=Simple
#           and with NCCL_MAX_NCHANNELS=8 (all measured at 16 x 1024 before, when the step left the
#           all-reduce less time to hide in; PART=i found both GPUs at their 700 W power limit).
#   PART=k: PART=h's DDP profile without the stage runs; the 1-GPU tests of the GPU-timed
#           tokens/s; the stage under FSDP with deferred logs forced on (its error, in full; since
#           the fix they are on under FSDP and the PATCH matches nothing).
#   PART=l: the stage on GPU 0, DDP (deferred logs without store_flos, the last host sync of a DDP
#           log step), FSDP (deferred logs now on), the engine's profile at 64 x 1024 on one GPU and
#           under DDP (where DDP's extra time goes), DDP with store_flos at each log again.
set -uo pipefail
source bench/gpu_common.sh
base_params
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
one_gpu_refs() {  # the 1-GPU references at 16 and 64 x 1024, one on each GPU, at once
  RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b16 1 ddp 300 16 &
  RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=1 ddp g1_b64 1 ddp 150 64
  wait
}
# nvidia-smi's clocks, power and temperatures every 500 ms into $OUT/smi.csv; `mark NAME` as each run
# starts (marks.txt), smi_stop ends it and prints bench/smi_summary.py's table.
smi_start() {
  q=timestamp,index,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,temperature.memory,utilization.gpu
  for r in clocks_event_reasons.active clocks_throttle_reasons.active ""; do
    nvidia-smi --query-gpu=$q${r:+,$r} --format=csv >/dev/null 2>&1 && { q=$q${r:+,$r}; break; }
  done
  nvidia-smi -q -d POWER,CLOCK,PERFORMANCE > $OUT/smi_q.txt 2>&1
  nvidia-smi --query-gpu=$q --format=csv -lms 500 > $OUT/smi.csv 2>&1 &
  smi=$!
}
mark() { echo "$(date +%T.%N | cut -c1-12) $*" | tee -a $OUT/marks.txt; }
smi_stop() {
  mark end; kill $smi
  python3 bench/smi_summary.py $OUT/smi.csv $OUT/marks.txt | tee $OUT/smi_summary.txt
}
ddp_tests() {
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfE \
    -k "ddp or fsdp" 2>&1 | tail -n 15 | tee $OUT/pytest_ddp.txt
}
if [ "${PART:-a}" = a ]; then
  one_gpu_refs
  RUN_TIMEOUT=120 ddp g2_b16 2 ddp 300 16
  RUN_TIMEOUT=120 PATCH='s/ddp_broadcast_buffers=False/ddp_broadcast_buffers=True/' ddp g2_b16_bcast 2 ddp 300 16
  RUN_TIMEOUT=120 NCCL_CTA_POLICY=1 ddp g2_b16_cta1 2 ddp 300 16
elif [ "$PART" = g ]; then
  ddp_tests
  one_gpu_refs
  RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
elif [ "$PART" = h ]; then
  timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
    bench/bench_train_gpu.py --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps 100 --batch 64 \
    --skip 45 --profile 10 --sync-debug --variants engine --out $OUT/bench_ddp.json > $OUT/bench_ddp_full.txt 2>&1
  grep -E "tok/s|profile|FAILED|Error" $OUT/bench_ddp_full.txt | tee $OUT/bench_ddp.txt
  RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b64 1 ddp 150 64
  RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
elif [ "$PART" = i ]; then
  smi_start
  mark g1_gpu0; RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b64_gpu0 1 ddp 150 64
  mark g1_gpu1; RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=1 ddp g1_b64_gpu1 1 ddp 150 64
  mark g1_both
  RUN_TIMEOUT=120 CUDA_VISIBLE_DEVICES=0 ddp g1_b64_both0 1 ddp 150 64 & both0=$!
  RUN_TIMEOUT=120 CUDA_VISIBLE_DEVICES=1 ddp g1_b64_both1 1 ddp 150 64
  wait $both0
  mark g2; RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
  smi_stop
elif [ "$PART" = j ]; then
  smi_start
  mark g1_gpu0; RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b64_gpu0 1 ddp 150 64
  mark g2; RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
  mark g2_bf16; RUN_TIMEOUT=130 EXTRA="ddp_allreduce: bf16" ddp g2_b64_bf16 2 ddp 150 64
  mark g2_simple; RUN_TIMEOUT=130 NCCL_PROTO=Simple ddp g2_b64_simple 2 ddp 150 64
  mark g2_ch8; RUN_TIMEOUT=130 NCCL_MAX_NCHANNELS=8 ddp g2_b64_ch8 2 ddp 150 64
  smi_stop
elif [ "$PART" = k ]; then
  timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
    bench/bench_train_gpu.py --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps 100 --batch 64 \
    --skip 45 --profile 10 --sync-debug --variants engine --out $OUT/bench_ddp.json > $OUT/bench_ddp_full.txt 2>&1
  grep -E "tok/s|profile|FAILED|Error" $OUT/bench_ddp_full.txt | tee $OUT/bench_ddp.txt
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfE \
    -k "never_wait or gpu_defaults" > $OUT/pytest_1gpu.txt 2>&1; tail -n 3 $OUT/pytest_1gpu.txt
  RUN_TIMEOUT=150 PATCH='s/if DEFERRED_LOGS and not sharded(t):/if DEFERRED_LOGS:/' ddp fsdp_deferred 2 fsdp 60 8
  grep -nE "Error|error|Traceback" $OUT/log_fsdp_deferred.txt | grep -v "^[0-9]*:W1" | head -n 8
elif [ "$PART" = l ]; then
  smi_start
  mark g1_gpu0; RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b64_gpu0 1 ddp 150 64
  mark g2; RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
  mark fsdp; RUN_TIMEOUT=100 ddp fsdp 2 fsdp 60 8
  python3 -c "import json; print('fsdp grad norms', [h.get('grad_norm') for h in json.load(open('$OUT/state_fsdp.json'))['log_history']][:4])"
  for w in 1 2; do
    mark prof_g$w
    launch="python3"; [ $w = 1 ] && export CUDA_VISIBLE_DEVICES=0
    [ $w = 2 ] && launch="python3 -m torch.distributed.run --standalone --nproc_per_node 2"
    timeout 150 $launch bench/bench_train_gpu.py --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps 100 \
      --batch 64 --skip 45 --profile 10 --sync-debug --variants engine --out $OUT/bench_g$w.json > $OUT/bench_g${w}_full.txt 2>&1
    unset CUDA_VISIBLE_DEVICES
    grep -E "tok/s|profile|FAILED|Error" $OUT/bench_g${w}_full.txt | grep -v UserWarning
  done
  mark g2_flos; RUN_TIMEOUT=130 PATCH='s/^            # No store_flos here/            tr.store_flos()\n&/' ddp g2_b64_flos 2 ddp 150 64
  smi_stop
elif [ "$PART" = e ] || [ "$PART" = f ]; then
  one_gpu_refs
  RUN_TIMEOUT=120 ddp g2_b16 2 ddp 300 16
  RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
  [ "$PART" = f ] || ddp_tests
elif [ "$PART" = b ] || [ "$PART" = c ]; then
  [ "$PART" = c ] || RUN_TIMEOUT=130 ddp g2_b64 2 ddp 150 64
  variants=engine  # DDP gradients are always bucket views now (the engine has no switch)
  env ${PROFILE_ENV:-} timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
    bench/bench_train_gpu.py --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps 150 --batch 16 \
    --skip 50 --profile 5 --variants $variants --out $OUT/bench_ddp.json > $OUT/bench_ddp_full.txt 2>&1
  grep -E "tok/s|profile|FAILED|Error" $OUT/bench_ddp_full.txt | tee $OUT/bench_ddp.txt
  if [ "$PART" = c ]; then
    RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b16 1 ddp 300 16
    RUN_TIMEOUT=120 ddp g2_b16 2 ddp 300 16
  fi
else
  for b in 32 64; do
    RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b$b 1 ddp 150 $b
    RUN_TIMEOUT=130 ddp g2_b$b 2 ddp 150 $b
  done
  ddp_tests
fi
echo "== done $(date +%T)"
pack_out
