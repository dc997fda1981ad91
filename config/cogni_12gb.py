# Cogni, high performance (16 layers, d=1280, 20/5 heads, 1024 context) for 12 GB GPUs, on TinyStories.
# 4 x 1024 tokens x 8 accumulation = 32k tokens per step, with activation checkpointing.
#   needs: python prepare.py tinystories --out_dir data/tinystories
#   run:   python train.py config/cogni_12gb.py
out_dir = "out-cogni"
data_dir = "data/tinystories"
n_layer = 16
n_head = 20
n_kv_head = 5
n_embd = 1280
ffn_hidden = 3584
block_size = 1024
grad_checkpoint = True
batch_size = 4
grad_accum = 8
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 400
eval_interval = 500
eval_iters = 40
ckpt_interval = 500
