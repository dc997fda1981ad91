# AETHER-style small Q/A chatbot: a 7M-parameter model on your own question/answer pairs, e.g. a
# dataset.json of [{"question": "Hello!", "answer": "Hi! How can I help you today?"}, ...]. Byte
# tokenizer (a GPT-2 vocabulary would be most of the model) and strong dropout: a few thousand pairs
# are memorized fast. CPU is fine; a GPU is quicker.
#   needs: python prepare.py dataset.json --tokenizer byte --out_dir data/aether
#   run:   python train.py config/aether_qa.py
out_dir = "out-aether"
data_dir = "data/aether"
n_layer = 6
n_head = 6
n_kv_head = 2
n_embd = 384
block_size = 256
dropout = 0.2
batch_size = 32
grad_accum = 1
max_iters = 3000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 200
eval_iters = 20
