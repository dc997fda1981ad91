# The embedded demo, spelled out: exactly train.py's defaults. A 3M-parameter Forge learns the built-in
# reasoning tasks (arithmetic, sorting, counting, word problems, with step-by-step thinking) in minutes
# on a 2-core CPU (faster with native bf16), and faster still on any GPU.
#   needs: python prepare.py                      (data/reasoning, byte tokenizer, offline, seconds)
#   run:   python train.py config/cpu_reasoning.py
out_dir = "out"
data_dir = "data/reasoning"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 256
block_size = 256
batch_size = 16
grad_accum = 1
max_iters = 1000
optimizer = "muon"
muon_lr = 3e-3
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
eval_interval = 500
eval_iters = 10
windows = "documents"
