# Forge-1 Mini (24 layers, d=1024, 16/4 heads, 2048 context, 322M parameters) on a 15 GB Colab T4.
# The T4 has no bfloat16: fp16 autocast with a GradScaler. 2 x 2048 tokens x 16 accumulation = 64k tokens per step.
#   needs: python prepare.py openhermes platypus openthoughts --max_samples 300000 --out_dir data/forge
#   run:   python train.py config/mini_t4.py
out_dir = "out-mini"
data_dir = "data/forge"
n_layer = 24
n_head = 16
n_kv_head = 4
n_embd = 1024
ffn_hidden = 2816
block_size = 2048
grad_checkpoint = True
batch_size = 2
grad_accum = 16
dtype = "float16"
max_iters = 10000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 200
eval_interval = 500
eval_iters = 20
ckpt_interval = 250  # Colab sessions end without warning: save often, then --resume
