# Stage three on a GPU: reinforcement learning on GSM8K for Forge-1 Nano after pretraining and chat /
# chain-of-thought fine-tuning. Rewards compare the final number of the answer with GSM8K's "#### N".
#   needs: out-sft/best.pt (python train.py config/nano_3050ti.py, then config/sft_chat.py) and GSM8K's two
#          splits as jsonl: python -c "import datasets; [datasets.load_dataset('openai/gsm8k', 'main', split=s)
#          .to_json(f'data/gsm8k_{s}.jsonl') for s in ('train', 'test')]"
#          (or grade_school_math/data/{train,test}.jsonl from github.com/openai/grade-school-math)
#   run:   python rl.py config/rl_gsm8k_nano.py
#   then:  python eval.py --out_dir out-rl-gsm8k --gsm8k data/gsm8k_test.jsonl
# Held out means held out: sft_chat.py fine-tunes on GSM8K's train split, so the evaluation and best.pt use
# the first eval_items problems of the test split.
init_from = "out-sft/best.pt"
out_dir = "out-rl-gsm8k"
gsm8k = "data/gsm8k_train.jsonl"
gsm8k_eval = "data/gsm8k_test.jsonl"
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
