# Forge-1 Nano (12 layers, d=768, 12/4 heads, 114M parameters) on a 4 GB RTX 3050 Ti / GTX 1650:
# micro-batch 4 x 1024 tokens with activation checkpointing, 4 accumulation steps (16k tokens per step): the
# chunked loss (docs/performance.md) took the logits' 1.2 GiB out of the estimate, so the micro-batch doubled.
#   needs: python prepare.py openhermes platypus openthoughts --max_samples 100000 --out_dir data/forge
#   run:   python train.py config/nano_3050ti.py
# Out of memory? --batch_size=2 --grad_accum=8 (or 1 and 16) keeps the tokens per step.
out_dir = "out-nano"
data_dir = "data/forge"
n_layer = 12
n_head = 12
n_kv_head = 4
n_embd = 768
ffn_hidden = 2048
block_size = 1024
grad_checkpoint = True
batch_size = 4
grad_accum = 4
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = max_iters * 2 // 100  # 2% warmup, then cosine
eval_interval = 500
eval_iters = 40
ckpt_interval = 500
