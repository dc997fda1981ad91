# Yxanul 177M at its full 4096-token context on 8 H100s (or A100 80GB): one process per GPU via torchrun.
# 8 x 4096 tokens x 8 GPUs = 262k tokens per step; bf16 and torch.compile are chosen automatically.
#   needs: python prepare.py fineweb-edu --out_dir data/fineweb     (the whole sample-10BT: ~10B tokens)
#   run:   torchrun --standalone --nproc_per_node=8 train.py config/h100_ddp.py
#   multi-node: torchrun --nnodes=N --node_rank=I --master_addr=HOST --master_port=29500 --nproc_per_node=8 ...
#   (out_dir and data_dir must be on a filesystem every node sees)
out_dir = "out-h100"
data_dir = "data/fineweb"
n_layer = 28
n_head = 12
n_kv_head = 2
n_embd = 768
ffn_hidden = 2048
emb_rank = 128
block_size = 4096
batch_size = 8
grad_accum = 1
max_iters = 40000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 1000
eval_interval = 1000
eval_iters = 20
ckpt_interval = 1000
