#!/usr/bin/env bash
# Run on the CPU machine after `make repro`: the data the GPU scripts carry (`run` with
# carry [".whl", "bench/out/gpu_data"]): the default stdlib splits and a 50,176-piece tokenizer
# (GPT-2-sized vocab, a multiple of 128) trained on them, and the splits' token shards with it.
# About 30 s.
set -euo pipefail
out=bench/out/gpu_data
rm -rf $out && mkdir -p $out /tmp/gpu_data_params
cp -r data/splits $out/splits
printf "tokenizer: {vocab_size: 50176, input_sentence_size: 0}\n" > /tmp/gpu_data_params/o.yaml
cp params.yaml /tmp/gpu_data_params/params.yaml
python tools/profile.py /tmp/gpu_data_params/o.yaml /tmp/gpu_data_params/params.yaml
python stages/train_tokenizer.py --params /tmp/gpu_data_params/params.yaml --output $out/tokenizer \
  --metrics $out/tokenizer_metrics.json
python stages/tokenize_splits.py --params /tmp/gpu_data_params/params.yaml --tokenizer $out/tokenizer \
  --output $out/tokens --metrics $out/tokenize_metrics.json
