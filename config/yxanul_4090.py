# Yxanul 177M (28 layers, d=768, 12/2 heads, factorized embedding r=128) on a 24 GB RTX 4090, bf16.
# Sequence-length curriculum of the Yxanul design: short windows first, 512 -> 2048 tokens, with the
# micro-batch shrinking to keep memory flat; 8 accumulation steps.
#   needs: python prepare.py fineweb-edu --max_samples 2000000 --out_dir data/fineweb
#   run:   python train.py config/yxanul_4090.py
# (The full 4096-token context is trained on 8 GPUs: config/h100_ddp.py.)
out_dir = "out-yxanul"
data_dir = "data/fineweb"
n_layer = 28
n_head = 12
n_kv_head = 2
n_embd = 768
ffn_hidden = 2048
emb_rank = 128
block_size = 2048
batch_size = 4
grad_accum = 8
seq_curriculum = [(0, 512, 8), (5000, 1024, 6), (10000, 1536, 4), (15000, 2048, 4)]
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 500
eval_interval = 1000
eval_iters = 40
ckpt_interval = 1000
