"""
Reinforcement learning on verifiable rewards: the model answers each problem several times, the answers that
check out are rewarded, and the policy is pushed toward them (GRPO-style: a group baseline, no value network).

    python prepare.py && python train.py && python rl.py && python eval.py --out_dir out-rl
    python rl.py --max_iters=100 --group_size=16    # settings as in train.py: defaults below, config files, --key=value
    python rl.py --resume                           # continue out_dir/ckpt.pt exactly where it stopped
    python rl.py config/rl_gsm8k_nano.py            # GSM8K final-number rewards for a fine-tuned Forge-1 Nano (GPU)

Every step draws problems_per_step problems from the training side of tasks.py (never the held-out problems
eval.py scores), more often from the tasks the model fails most, and first those it answers wrong greedily
(of screen times as many candidates); samples group_size replies to each with thinking forced on (reasoning="auto":
the model chooses); rewards a reply 1 when the answer after <|/think|> checks out and 0 otherwise (wrong, cut off,
or no answer after the thinking), less think_cost per max_new_tokens thinking tokens; and takes one optimizer step on

    loss = -sum over replies and their tokens of (reward - mean reward of its group) * log p(token) / constant

The constant (problems x group x max_new_tokens) does not depend on the replies' lengths: dividing each
reply by its own length would make a long wrong reply cost less per token than a short one. Groups whose
replies all scored the same have no advantage anywhere and teach nothing; they are skipped (and logged).
With sft_coef > 0 the step also learns sft_coef x the supervised loss on a batch of the training data, which
keeps the policy on the traces it was trained on (InstructGPT's PPO-ptx).
Every eval_interval steps the model answers held-out problems greedily; best.pt keeps the best accuracy.
Checkpoints have train.py's format, so sample.py, chat.py, eval.py and export.py read out_dir as they read out/.
"""
import os
import random
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import configurator
from checkpoints import chat_policy
from common import StopFlag, UserError
from data import check_tokenizer, get_batch, load_data, random_starts, read_gsm8k, to_device
from device import DTYPES
from replies import (VALIDATION_SEED, evaluate, generate_replies, greedy_rewards, is_correct, report_heldout,
                     reply_token_losses)
from tasks import TASKS, difficulty_of, heldout_items, sample_problem
from tokenizer import render_prompt
from training import (MetricsLog, check_optimizer_settings, clip_gradients, exit_if_stopped, make_optimizer,
                      optimizer_step, run_training, save_run, set_lr)

# ----------------------------------------------------------------------------- defaults
# Tuned for the default model of `python prepare.py && python train.py` on a 2-core CPU (see README).
# I/O
init_from = "out/best.pt"  # the supervised checkpoint to improve
out_dir = "out-rl"
resume = False             # continue out_dir/ckpt.pt: same step, optimizer, pass rates and problem draws
data_dir = ""              # the prepared data the checkpoint was trained on (its difficulty, eval.py's val loss);
                           # "": the init checkpoint's own data_dir
gsm8k = ""                 # a GSM8K-style jsonl ({question, answer "... #### N"}): rewards on its final numbers
gsm8k_eval = ""            # the held-out jsonl for the evaluation and best.pt (GSM8K's test split); "": the last
                           # eval_items records of gsm8k
eval_interval = 30         # greedy evaluation on held-out problems every this many steps (and at the end)
eval_items = 100           # held-out problems per task for that evaluation (answered in batches: seconds)
ckpt_interval = 20         # save out_dir/ckpt.pt every this many steps (and on exit)
# reinforcement learning
max_iters = 60
problems_per_step = 8
group_size = 16            # replies per problem: the baseline is their mean; 16 finds a right one where few are
max_new_tokens = 192
reasoning = "on"           # the replies' mode (sampled, screened, evaluated): "on" forces a think block; "auto" lets
                           # the model choose, and with think_cost it learns when thinking pays (adaptive thinking)
think_cost = 0.0           # reward = correct - think_cost * thinking tokens / max_new_tokens (AdaptThink, L1)
temperature = 1.0          # sampling temperature of the replies (exploration)
top_k = 0                  # 0: no top-k filter
top_p = 1.0                # 1.0: no nucleus filter
task_floor = 0.1           # every task keeps at least this draw weight, even when it is always right
screen = 4                 # > 1: draw problems_per_step x screen problems, answer them greedily, and keep those
                           # answered wrong first
# optimization: one on-policy update per batch of replies
optimizer = "adamw"        # adamw | muon, as in train.py (a fresh optimizer, whatever the init checkpoint used)
learning_rate = 1e-4       # 1/20 of train.py's AdamW peak (1/30 of Muon's): the policy is already good, keep it close
muon_lr = 0.0              # optimizer=muon: the matrices' peak learning rate, on the same schedule; 0: learning_rate
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
grad_checkpoint = False    # recompute activations in backward: less memory for long replies on small GPUs
lora_rank = 0              # > 0: train LoRA adapters of this rank on the block matrices only, as train.py's
lora_alpha = 16.0          # the adapters' update is scaled by lora_alpha / lora_rank
lora_targets = "all"       # all, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
sft_coef = 0.3             # > 0: also learn this times the supervised loss on a batch of data_dir's training data
sft_batch_size = 32        # windows of the init checkpoint's block_size per step for that loss
micro_batch = 8            # rows (replies, or sft windows) per forward and backward pass of the update: memory
                           # grows with it, the gradient does not change
# system
device = "auto"
dtype = "auto"             # as train.py: auto | float32 | bfloat16 | float16
seed = 1337

DEFAULTS = configurator.defaults_of(globals())
CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", *DTYPES), "optimizer": ("adamw", "muon"),
           "reasoning": ("on", "auto")}


# ----------------------------------------------------------------------------- settings and problems

def settings(argv):
    """(cfg, ckpt): defaults < a resumed run's stored settings < config files and --key=value, and the
    checkpoint to start from (the init checkpoint, or out_dir/ckpt.pt with --resume)."""
    cfg, ckpt = configurator.policy_settings(argv, DEFAULTS, CHOICES, "rl.py")
    configurator.check_ranges(cfg, at_least_one=("max_iters", "problems_per_step", "screen", "group_size",
                                                 "max_new_tokens", "eval_interval", "eval_items", "ckpt_interval"))
    if cfg.group_size < 2:
        raise UserError("group_size must be at least 2: the baseline of a reply is its group's mean reward")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0 or cfg.temperature <= 0 or cfg.learning_rate < 0 or cfg.muon_lr < 0:
        raise UserError("temperature must be > 0, top_p in (0, 1], top_k >= 0, learning_rate and muon_lr >= 0")
    if cfg.sft_coef < 0 or cfg.think_cost < 0 or min(cfg.sft_batch_size, cfg.micro_batch) < 1:
        raise UserError("sft_coef and think_cost must be >= 0, sft_batch_size and micro_batch at least 1")
    if cfg.sft_coef and not cfg.data_dir:
        raise UserError("sft_coef > 0 mixes in the supervised loss on prepared data, and the init checkpoint names "
                        "no data_dir: pass --data_dir=DIR (or --sft_coef=0)")
    check_optimizer_settings(cfg)
    return cfg, ckpt


class Problems:
    """Where the problems come from: the built-in tasks (training side), or a GSM8K file, evaluated on the first
    eval_items of gsm8k_eval (else on gsm8k's last eval_items, kept out of training). A training record whose
    question is also held out is dropped. Draws favour the tasks with the lowest running pass rate."""

    def __init__(self, cfg, difficulty):
        self.difficulty = difficulty
        if cfg.gsm8k:
            items = read_gsm8k(cfg.gsm8k)
            if not cfg.gsm8k_eval and len(items) <= cfg.eval_items:
                raise UserError(f"{cfg.gsm8k} holds {len(items)} records: more than eval_items={cfg.eval_items} "
                                "are needed (the last eval_items are held out for evaluation), or set gsm8k_eval")
            self.heldout = read_gsm8k(cfg.gsm8k_eval, cfg.eval_items) if cfg.gsm8k_eval else items[-cfg.eval_items:]
            held = {messages[0]["content"].strip() for _, messages, _ in self.heldout}
            self.train = [item for item in items if item[1][0]["content"].strip() not in held]
            if not self.train:
                raise UserError(f"every record of {cfg.gsm8k} is held out: train on another file than gsm8k_eval")
            self.tasks = ["gsm8k"]
        else:
            self.train = None
            self.heldout = list(heldout_items(cfg.eval_items * len(TASKS), VALIDATION_SEED, difficulty))
            self.tasks = TASKS
        self.pass_rate = dict.fromkeys(self.tasks, 0.5)  # running mean reward per task, updated every step

    def draw(self, n, rng, floor):
        """n (task, messages, answer) problems, task t drawn with weight max(1 - pass rate of t, floor)."""
        weights = [max(1 - self.pass_rate[t], floor) for t in self.tasks]
        problems = []
        for task in rng.choices(self.tasks, weights, k=n):
            if task == "gsm8k":
                problems.append(rng.choice(self.train))
            else:
                question, _, answer = sample_problem(task, rng, self.difficulty, heldout=False)
                problems.append((task, [{"role": "user", "content": question}], answer))
        return problems

    def update(self, task_rewards, momentum=0.9):
        for task, rewards in task_rewards.items():
            self.pass_rate[task] = momentum * self.pass_rate[task] + (1 - momentum) * sum(rewards) / len(rewards)


# ----------------------------------------------------------------------------- sampling and rewards

def reward(reply, task, answer):
    """1.0 for a correct reply (replies.is_correct: it ended its turn and the answer after its thinking checks
    out), else 0.0: wrong, cut off, or no answer after the thinking."""
    return float(is_correct(reply, task, answer))


def sample_groups(model, enc, problems, cfg, ctx, generator):
    """group_size replies per problem (thinking forced on, or the model's choice with reasoning="auto") -> [(prompt
    ids, [Reply, ...])]. The copies of one prompt have the same length, so each group is one batch without padding."""
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                    top_p=cfg.top_p)
    groups = []
    model.eval()
    with ctx:
        for _, messages, _ in problems:
            prompt = render_prompt(messages, enc, cfg.reasoning)
            groups.append((prompt, generate_replies(model, enc, [prompt] * cfg.group_size, sampling, generator,
                                                    batch_size=cfg.group_size)))
    model.train()
    return groups


def policy_loss(model, prompt, replies, advantages, constant, ctx):
    """-sum(advantage * log p(token)) / constant over the reply tokens of one group (stop tokens included:
    ending the turn is learned too). Replies (token id lists) are right-padded; padding is not scored."""
    token_losses = reply_token_losses(model, [prompt] * len(replies), replies, ctx)
    return (torch.tensor(advantages, device=model.device)[:, None] * token_losses).sum() / constant


def screen_problems(model, enc, candidates, n, max_new_tokens, ctx, reasoning):
    """n of the candidate problems: those the model answers wrong greedily first, then the others in draw order
    -> (problems, share of candidates answered wrong). Greedy decoding is how the model is used and scored,
    and its mistakes are where sampled groups disagree and teach."""
    rewards, _ = greedy_rewards(model, enc, candidates, max_new_tokens, ctx, reasoning)
    order = sorted(range(len(candidates)), key=lambda i: rewards[i])  # stable: wrong (0) first, draw order kept
    return [candidates[i] for i in order[:n]], 1 - sum(rewards) / len(rewards)


def get_lr(cfg, it):
    """Linear warmup, then linear decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + (1 - progress) * (cfg.learning_rate - cfg.min_lr)


def policy_gradient(model, batch, groups, constant, scaler, ctx, micro_batch, thinking_price=0.0):
    """Backward the policy loss of every group whose rewards differ, micro_batch replies at a time (the loss is a
    sum over replies: the same gradient) -> ({task: rewards}, loss, groups skipped). A reply's reward is its
    correctness less thinking_price per thinking token; the task rewards returned are the correctness alone.
    One on-policy update: the replies were sampled by exactly these weights, so the importance ratio of PPO/GRPO
    is 1 and there is nothing to clip; and since the policy moves once per batch, by a small learning rate, from
    a model that already answers well, no KL penalty to a reference is needed."""
    task_rewards, flat, loss_total = {}, 0, 0.0
    for (task, _, answer), (prompt, replies) in zip(batch, groups):
        correct = [reward(r, task, answer) for r in replies]
        task_rewards.setdefault(task, []).extend(correct)
        rewards = [c - thinking_price * r.thinking_tokens for c, r in zip(correct, replies)]
        mean = sum(rewards) / len(rewards)
        if all(r == mean for r in rewards):  # no advantage anywhere: nothing to learn
            flat += 1
            continue
        for i in range(0, len(replies), micro_batch):
            rows = slice(i, i + micro_batch)
            loss = policy_loss(model, prompt, [r.ids for r in replies[rows]], [r - mean for r in rewards[rows]],
                               constant, ctx)
            scaler.scale(loss).backward()
            loss_total += loss.item()
    return task_rewards, loss_total, flat


def supervised_mixin(model, bins, cfg, iter_num, scaler, ctx):
    """Backward sft_coef x train.py's loss on sft_batch_size windows of the training data, micro_batch windows at a
    time, each weighted by its share of the scored tokens (the mean over all of them: the same gradient)
    -> {"sft_loss": loss}."""
    tokens, mask, _ = bins["train"]
    T = model.config.block_size
    starts = random_starts(tokens, cfg.sft_batch_size, T, torch.Generator().manual_seed(cfg.seed + iter_num))
    x, y = get_batch(tokens, mask, starts, T)
    scored, sft_loss = int((y != -1).sum()), 0.0
    for i in range(0, len(starts), cfg.micro_batch):
        xb, yb = to_device((x[i:i + cfg.micro_batch], y[i:i + cfg.micro_batch]), str(model.device))
        share = int((yb != -1).sum()) / max(scored, 1)
        if share == 0:
            continue  # prompt tokens only: nothing to learn here (and its mean loss is nan)
        with ctx:
            _, loss = model(xb, yb)
        scaler.scale(cfg.sft_coef * share * loss).backward()
        sft_loss += share * loss.item()
    return {"sft_loss": sft_loss}


def log_step(log, bar, iter_num, task_rewards, groups, flat, sample_seconds, pass_rates, **metrics):
    rewards = [r for rs in task_rewards.values() for r in rs]
    lengths = [len(r.ids) for _, replies in groups for r in replies]
    thinking = [r.thinking_tokens for _, replies in groups for r in replies]
    thought = [r.thinking is not None for _, replies in groups for r in replies]
    log.write(iter=iter_num, reward=sum(rewards) / len(rewards), **metrics, zero_variance_share=flat / len(groups),
              reply_tokens=sum(lengths) / len(lengths), sampling_tokens_per_s=sum(lengths) / sample_seconds,
              thinking_tokens=sum(thinking) / len(thinking), thought_share=sum(thought) / len(thought),
              **{f"reward_{t}": sum(rs) / len(rs) for t, rs in task_rewards.items()},
              **{f"pass_rate_{t}": p for t, p in pass_rates.items()})
    bar.set_postfix_str(f"reward {sum(rewards) / len(rewards):.2f} flat {flat}/{len(groups)} "
                        f"len {sum(lengths) / len(lengths):.0f} {sum(lengths) / sample_seconds:.0f} tok/s",
                        refresh=False)


# ----------------------------------------------------------------------------- the loop

def main(argv):
    cfg, ckpt = settings(argv)
    model, lora, enc, tokenizer, device, amp, ctx, sample_ctx = chat_policy(cfg, ckpt, "RL")
    # data_dir gives the built-in tasks' difficulty and the mix-in's training data (GSM8K needs neither)
    needs_data = cfg.data_dir and (cfg.sft_coef or not cfg.gsm8k)
    meta, bins = load_data(cfg.data_dir, splits=("train",) if cfg.sft_coef else ()) if needs_data else ({}, {})
    if bins:  # sft_coef mixes its documents in
        check_tokenizer(meta, enc.name, cfg.data_dir)
    problems = Problems(cfg, difficulty_of({} if cfg.gsm8k else meta))
    optimizer, scaler = make_optimizer(model, cfg, device.split(":")[0], amp, ckpt)
    iter_num, best_accuracy = (ckpt["iter_num"], ckpt["best_accuracy"]) if cfg.resume else (0, -1.0)
    if cfg.resume:
        problems.pass_rate = ckpt["pass_rates"]
    init_from = ckpt.get("init_from", cfg.init_from)
    config = vars(cfg) | {"init_from": init_from}
    del ckpt

    def save(name):
        save_run(os.path.join(cfg.out_dir, name), model, asdict(model.config), tokenizer, config, optimizer, scaler,
                 iter_num, lora, init_from=init_from, best_accuracy=best_accuracy, pass_rates=problems.pass_rate)

    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.resume else None)
    tqdm.write(f"rl: {init_from if not cfg.resume else cfg.out_dir + '/ckpt.pt'} "
               f"({model.num_params()['total'] / 1e6:.2f}M parameters) on {device}, "
               f"{str(amp or torch.float32).removeprefix('torch.')}; {cfg.problems_per_step} problems x "
               f"{cfg.group_size} replies per step, {'GSM8K ' + cfg.gsm8k if cfg.gsm8k else 'built-in tasks'}")
    stop = StopFlag()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="step", dynamic_ncols=True)
    constant = cfg.problems_per_step * cfg.group_size * cfg.max_new_tokens
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            accuracy, thinking = evaluate(model, enc, problems.heldout, cfg.max_new_tokens, sample_ctx, cfg.reasoning)
            overall = report_heldout(log, iter_num, accuracy, thinking)
            if overall > best_accuracy:
                best_accuracy = overall
                save("best.pt")
        if stop.signum or iter_num >= cfg.max_iters:
            break
        if iter_num % cfg.ckpt_interval == 0 and iter_num > 0:
            save("ckpt.pt")

        # Every random choice of this step is a function of (seed, step): a resumed run replays this one.
        rng = random.Random(cfg.seed * 1_000_003 + iter_num)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + iter_num)
        lr = set_lr(optimizer, get_lr(cfg, iter_num))
        t0 = time.perf_counter()
        batch = problems.draw(cfg.problems_per_step * cfg.screen, rng, cfg.task_floor)
        screened = {}
        if cfg.screen > 1:
            batch, wrong = screen_problems(model, enc, batch, cfg.problems_per_step, cfg.max_new_tokens, sample_ctx,
                                           cfg.reasoning)
            screened = {"greedy_wrong_share": wrong}
        t_sample = time.perf_counter()
        groups = sample_groups(model, enc, batch, cfg, sample_ctx, generator)
        sample_seconds = time.perf_counter() - t_sample
        task_rewards, loss, flat = policy_gradient(model, batch, groups, constant, scaler, ctx, cfg.micro_batch,
                                                   cfg.think_cost / cfg.max_new_tokens)
        problems.update(task_rewards)
        sft = supervised_mixin(model, bins, cfg, iter_num, scaler, ctx) if cfg.sft_coef else {}
        grad_norm = float(clip_gradients(model, optimizer, scaler, cfg.grad_clip))
        optimizer_step(optimizer, scaler, loss, grad_norm)
        log_step(log, bar, iter_num, task_rewards, groups, flat, sample_seconds, problems.pass_rate, loss=loss,
                 **sft, **screened, lr=lr, grad_norm=grad_norm, step_seconds=time.perf_counter() - t0)
        iter_num += 1
        bar.update()

    save("ckpt.pt")
    bar.close()
    exit_if_stopped(stop, f"interrupted: saved {cfg.out_dir}/ckpt.pt at step {iter_num}; --resume continues",
                    tqdm.write)
    tqdm.write(f"done: step {iter_num}, best held-out accuracy {best_accuracy:.1%} in {cfg.out_dir}/best.pt; "
               f"score it with python eval.py --out_dir {cfg.out_dir}")


if __name__ == "__main__":
    run_training(main, sys.argv[1:])
