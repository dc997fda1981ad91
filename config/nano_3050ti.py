# Forge-1 Nano (12 layers, d=768, 12/4 heads) on a 4 GB RTX 3050 Ti / GTX 1650, with a 16k BPE trained on its
# data: 88.1M parameters instead of 114.2M with GPT-2's 50k tokens (12.6M embedding, not 38.6M), and an estimate
# of 2.31 GiB for a micro-batch of 8 x 1024 (GPT-2's vocabulary: 2.51 GiB at 4 x 1024). Activation checkpointing;
# 8 x 1024 tokens x 2 accumulation steps = 16k tokens per step (docs/tokenizer.md).
#   needs: python prepare.py openhermes platypus openthoughts --max_samples 100000 --tokenizer bpe:16384 \
#              --out_dir data/forge-bpe16k
#   run:   python train.py config/nano_3050ti.py
# Out of memory? --batch_size=4 --grad_accum=4 (or 2 and 8) keeps the tokens per step.
out_dir = "out-nano"
data_dir = "data/forge-bpe16k"
n_layer = 12
n_head = 12
n_kv_head = 4
n_embd = 768
ffn_hidden = 2048
block_size = 1024
grad_checkpoint = True
batch_size = 8
grad_accum = 2
dry_run_vocab = 16384  # --dry_run before prepare.py: the vocabulary it will train
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = max_iters * 2 // 100  # 2% warmup, then cosine
eval_interval = 500
eval_iters = 40
ckpt_interval = 500
