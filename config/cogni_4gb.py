# Cogni, minimal (8 layers, d=768, 12/3 heads, 256 context) for 4 GB GPUs, on TinyStories.
# 2 x 256 tokens x 16 accumulation = 8k tokens per step.
#   needs: python prepare.py tinystories --out_dir data/tinystories
#   run:   python train.py config/cogni_4gb.py
out_dir = "out-cogni"
data_dir = "data/tinystories"
n_layer = 8
n_head = 12
n_kv_head = 3
n_embd = 768
ffn_hidden = 2048
block_size = 256
batch_size = 2
grad_accum = 16
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 400
eval_interval = 500
eval_iters = 40
ckpt_interval = 500
