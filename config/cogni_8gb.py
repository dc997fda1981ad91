# Cogni 168M-class (12 layers, d=1024, 16/4 heads, 512 context) for 6-8 GB GPUs, on TinyStories.
# 4 x 512 tokens x 8 accumulation = 16k tokens per step.
#   needs: python prepare.py tinystories --out_dir data/tinystories
#   run:   python train.py config/cogni_8gb.py
out_dir = "out-cogni"
data_dir = "data/tinystories"
n_layer = 12
n_head = 16
n_kv_head = 4
n_embd = 1024
ffn_hidden = 2816
block_size = 512
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
