# Stage two: fine-tune a pretrained checkpoint on chat / chain-of-thought data. init_from loads its
# weights (and architecture) with a fresh optimizer; the loss covers only the assistant's turns (the
# masks prepare.py writes for chat data). A lower learning rate, a short warmup, fewer iterations.
#   needs: a stage-one checkpoint, e.g. python train.py config/nano_3050ti.py --data_dir=data/fineweb
#          python prepare.py openthoughts gsm8k openhermes --max_samples 50000 --max_doc_tokens 1024 \
#              --tokenizer data/fineweb --out_dir data/sft
#          (--tokenizer data/fineweb: the tokenizer stage one's data was prepared with, trained or not. gsm8k: GSM8K's
#          train split; rl_gsm8k_nano.py evaluates on its test split. --max_doc_tokens drops what a 1024-token window
#          cannot hold whole: meta.json counts them per source)
#   run:   python train.py config/sft_chat.py --init_from=out-nano/best.pt
# Micro-batch and checkpointing below fit a 4 GB card with Nano; raise batch_size on bigger GPUs.
init_from = "out-nano/best.pt"
out_dir = "out-sft"
data_dir = "data/sft"
block_size = 1024
windows = "documents"   # every window starts at a document: no answer is trained without its question
grad_checkpoint = True
batch_size = 2
grad_accum = 16
max_iters = 3000
optimizer = "adamw"  # train.py's default Muon is tuned on the CPU demo only; AdamW at this scale
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 60
weight_decay = 0.0
eval_interval = 250
eval_iters = 40
ckpt_interval = 250
