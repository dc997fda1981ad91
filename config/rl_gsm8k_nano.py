# Stage three on a GPU: reinforcement learning on GSM8K for Forge-1 Nano after pretraining and chat /
# chain-of-thought fine-tuning. Rewards compare the final number of the answer with GSM8K's "#### N".
#   needs: out-sft/best.pt (python train.py config/nano_3050ti.py, then config/sft_chat.py) and GSM8K's
#          train split as jsonl: python -c "import datasets; datasets.load_dataset('openai/gsm8k', 'main',
#          split='train').to_json('data/gsm8k_train.jsonl')"
#   run:   python rl.py config/rl_gsm8k_nano.py      then: python eval.py --out_dir out-rl-gsm8k --gsm8k FILE
# The last eval_items records of the file are held out for the periodic evaluation and best.pt.
init_from = "out-sft/best.pt"
out_dir = "out-rl-gsm8k"
gsm8k = "data/gsm8k_train.jsonl"
max_iters = 500
problems_per_step = 16
group_size = 8
max_new_tokens = 512
learning_rate = 2e-6         # a few percent of the fine-tuning's 5e-5
min_lr = 2e-7
warmup_iters = 10
eval_interval = 25
eval_items = 200
ckpt_interval = 25
grad_checkpoint = True       # a group of 8 replies of up to 512 tokens on a 4 GB card
screen = 1                   # the CPU demo's greedy screening and supervised mix-in are measured there only
sft_coef = 0.0               # (and 32 windows of 1,024 tokens would not fit a 4 GB card next to the replies)
