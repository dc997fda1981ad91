# Cogni, minimal (8 layers, d=768, 12/3 heads, 256 context) for 4 GB GPUs, on TinyStories, with a 16k BPE trained on
# it: 62.1M parameters instead of 88.2M with GPT-2's tokens, estimate 1.85 GiB at 8 x 256 (GPT-2's: 1.91 at 2 x 256).
# 8 x 256 tokens x 4 accumulation = 8k tokens per step.
#   needs: python prepare.py tinystories --tokenizer bpe:16384 --out_dir data/tinystories-bpe16k
#   run:   python train.py config/cogni_4gb.py
out_dir = "out-cogni"
data_dir = "data/tinystories-bpe16k"
n_layer = 8
n_head = 12
n_kv_head = 3
n_embd = 768
ffn_hidden = 2048
block_size = 256
batch_size = 8
grad_accum = 4
dry_run_vocab = 16384  # --dry_run before prepare.py: the vocabulary it will train
max_iters = 20000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 400
eval_interval = 500
eval_iters = 40
ckpt_interval = 500
