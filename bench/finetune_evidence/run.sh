#!/usr/bin/env bash
# The runs behind docs/finetuning.md, one stage at a time, on a 2-core CPU:
#
#   bash bench/finetune_evidence/run.sh STAGE [STAGE ...]
#
# stages, in order: base random cls_full cls_lora cls_random instruct instruct_lora chat text lora_bench
# Runs go to $E (default /tmp/evidence); each stage writes $E/logs/STAGE.log (stdout+stderr) and
# $E/logs/STAGE.time (`/usr/bin/time -v`: wall time and max RSS). Run from the repository root.
# The settings below are the ones used for the numbers in docs/finetuning.md.
set -euo pipefail

E=${E:-/tmp/evidence}
DATA=${DATA:-/work/shared/data}
BASE_STEPS=${BASE_STEPS:-600}         # pretraining steps (sized to ~13 minutes on the shared 2-core machine)
mkdir -p "$E/logs"

run() {  # run STAGE CMD...: log the exact command, time it, keep its output
    local stage=$1; shift
    printf '%q ' "$@" > "$E/logs/$stage.cmd"; echo >> "$E/logs/$stage.cmd"
    echo "== $stage: $*"
    /usr/bin/time -v -o "$E/logs/$stage.time" "$@" 2>&1 | tee "$E/logs/$stage.log"
}

stage_base() {  # 1. pretrain the base model on the built-in Shakespeare corpus, BPE 4096, 4L/4H/256d, ctx 256
    run base python -m gptforge train --data.source shakespeare --data.tokenizer bpe --data.bpe_vocab_size 4096 \
        --data.dir "$E/data/shakespeare_bpe4096" \
        --model.n_layer 4 --model.n_head 4 --model.n_embd 256 --model.block_size 256 --model.dropout 0.0 \
        --train.run_dir "$E/base" --train.micro_batch_size 8 --train.max_steps "$BASE_STEPS" --train.lr 2e-3 \
        --train.warmup_steps 50 --train.eval_every 100 --train.eval_batches 10 --train.time_limit_s 840 \
        --train.progress false
}

stage_random() {  # 2c. a randomly initialised model of the same shape, with the base's tokenizer
    run random python - "$E/base/checkpoints/best" "$E/random_init" <<'EOF'
import sys
from pathlib import Path
import torch
from gptforge.checkpoint import read_model_config, save_checkpoint
from gptforge.model import GPT
from gptforge.tokenizer import load_tokenizer

base, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(1337)
cfg = read_model_config(base)
save_checkpoint(out, GPT(cfg), load_tokenizer(base / "tokenizer"))
print(f"random init {cfg} -> {out}")
EOF
}

CLS=(--finetune.data "$DATA/SMSSpamCollection.tsv" --finetune.epochs 3 --finetune.evals_per_epoch 4 --train.micro_batch_size 16
     --train.warmup_steps 50 --train.progress false)

stage_cls_full() {  # 2a. spam classifier: full fine-tuning from the base
    run cls_full python -m gptforge finetune classify --from "$E/base" "${CLS[@]}" --train.lr 5e-4 \
        --train.run_dir "$E/cls_full"
}

stage_cls_lora() {  # 2b. spam classifier: LoRA rank 8 on attn+mlp (base frozen; adapters + head train)
    run cls_lora python -m gptforge finetune classify --from "$E/base" "${CLS[@]}" --train.lr 2e-3 \
        --finetune.lora.rank 8 --finetune.lora.alpha 16 --finetune.lora.targets '[attn,mlp]' \
        --train.run_dir "$E/cls_lora"
}

stage_cls_random() {  # 2c. spam classifier: the same recipe as 2a from random weights
    run cls_random python -m gptforge finetune classify --from "$E/random_init" "${CLS[@]}" --train.lr 5e-4 \
        --train.run_dir "$E/cls_random"
}

INS=(--finetune.data "$DATA/alpaca_instructions_1100.json" --finetune.epochs 3 --finetune.evals_per_epoch 2 --finetune.response_tokens 128
     --train.micro_batch_size 8 --train.warmup_steps 50 --train.sample_tokens 48 --train.progress false)

stage_instruct() {  # 3. Alpaca instruction SFT, full fine-tuning
    run instruct python -m gptforge finetune instruct --from "$E/base" "${INS[@]}" --train.lr 5e-4 \
        --train.run_dir "$E/instruct"
}

stage_instruct_lora() {  # 3'. the same with LoRA rank 8
    run instruct_lora python -m gptforge finetune instruct --from "$E/base" "${INS[@]}" --train.lr 2e-3 \
        --finetune.lora.rank 8 --train.run_dir "$E/instruct_lora"
}

stage_chat() {  # 4. chat SFT on OpenAssistant trees (every root-to-leaf path)
    run chat python -m gptforge finetune chat --from "$E/base" --finetune.data "$DATA/oasst_en_100_trees.jsonl" \
        --finetune.oasst_paths all --finetune.epochs 6 --finetune.evals_per_epoch 1 --train.micro_batch_size 8 --train.lr 5e-4 \
        --train.warmup_steps 50 --train.sample_tokens 48 --train.progress false --train.run_dir "$E/chat"
}

stage_text() {  # 5. domain text (WikiText-2 validation: modern encyclopedic English) with an LR sweep first
    # the slice: the file's first 300,000 characters, cut back to the start of the article they end in
    python - "$DATA/wikitext2_valid.txt" "$E/data/wikitext2_valid_300k.txt" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
cut = max(m.start() for m in re.finditer(r"\n \n = [^=\n]+ = \n", text[:300_000]))
open(sys.argv[2], "w", encoding="utf-8").write(text[:cut + 1])
print(f"{sys.argv[2]}: {cut + 1:,} characters")
PY
    run text python -m gptforge finetune text --from "$E/base" --finetune.data "$E/data/wikitext2_valid_300k.txt" \
        --finetune.lr_sweep '[1e-4,3e-4,1e-3,3e-3]' --finetune.sweep_steps 20 --finetune.epochs 1 \
        --finetune.evals_per_epoch 4 --train.micro_batch_size 8 --train.warmup_steps 20 --train.progress false \
        --train.run_dir "$E/text"
}

stage_lora_bench() {  # 6. trainable parameters and peak memory, full vs LoRA (GPT-2 vocabulary, 6L/384d)
    run lora_bench python bench/bench_lora.py
}

for s in "$@"; do "stage_$s"; done
