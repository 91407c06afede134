#!/usr/bin/env bash
# The suite end to end on an embedded default, no download and no GPU needed:
#   1. build a tiny, randomly initialised ChatGLM-6B stand-in from data/ (tools/make_tiny_model.py),
#   2. fine-tune it with LoRA through the deepspeed launcher on data/spo_train.jsonl,
#   3. predict data/spo_test.jsonl and print the triple F1.
# The tiny model is a stand-in for ChatGLM-6B: it starts knowing nothing, so its F1 only shows the pipeline works.
# Everything goes to ${DEMO_DIR:-demo_output}/. On a GPU the same commands run there (drop DS_ACCELERATOR).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_DIR:-demo_output}
epochs=${DEMO_EPOCHS:-30}
echo "demo: a tiny random ChatGLM-6B stand-in is built, LoRA-trained for $epochs epochs of data/ and scored on" \
     "data/spo_test.jsonl, into $out/ (2.5-3.5 minutes on an idle 2-core CPU, most of it the training; far longer" \
     "when other work shares the cores)"
if ! python3 -c "import torch" 2>/dev/null; then
    echo "Installing requirements first (pip install -r requirements.txt) ..."
    python3 -m pip install -q -r requirements.txt
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu

echo "== 1/3 building a tiny ChatGLM-6B stand-in (random weights, tokenizer trained on data/) in $out/tiny-chatglm"
python3 tools/make_tiny_model.py --output_dir "$out/tiny-chatglm" --num_layers 4 --hidden_size 128

echo "== 2/3 LoRA fine-tuning through the deepspeed launcher ($epochs epochs of data/spo_train.jsonl)"
rm -rf "$out/lora"
deepspeed --num_gpus 1 finetuning_lora.py --model_dir "$out/tiny-chatglm" --output_dir "$out/lora" \
    --train_path data/spo_train.jsonl --max_len 192 --max_src_len 128 --train_batch_size 8 \
    --num_train_epochs "$epochs" --learning_rate 5e-3 --lora_r 32 --lora_dropout 0 \
    --lora_target query_key_value,dense,dense_h_to_4h,dense_4h_to_h --fp32 --log_steps 50 --warmup_ratio 0.05 \
    2>&1 | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]"

echo "== 3/3 predicting data/spo_test.jsonl"
python3 predict_lora.py --model_dir "$out/lora" --test_path data/spo_test.jsonl --output_dir "$out/predictions"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
metrics = json.load(open(f"{out}/predictions/metrics.json"))
rows = [json.loads(line) for line in open(f"{out}/predictions/predictions.jsonl", encoding="utf-8")]
print("\nexample:", rows[0]["text"], "\n  reference:", rows[0]["reference"].replace("\n", " | "),
      "\n  generated:", rows[0]["generated"].replace("\n", " | "))
print(f"\nTriple F1 on data/spo_test.jsonl: {metrics['f1']:.4f} (micro F1 {metrics['micro_f1']:.4f}, "
      f"{metrics['rows']} rows in {metrics['seconds']:.1f} s)")
print("This was a tiny random stand-in for ChatGLM-6B; with the real weights use --model_dir ChatGLM-6B (README).")
PY
