"""
Reinforcement learning on verifiable rewards: the model answers each problem several times, the answers that
check out are rewarded, and the policy is pushed toward them (GRPO-style: a group baseline, no value network).

    python prepare.py && python train.py && python rl.py && python eval.py --out_dir out-rl
    python rl.py --max_iters=100 --group_size=16    # settings as in train.py: defaults below, config files, --key=value
    python rl.py --resume                           # continue out_dir/ckpt.pt exactly where it stopped
    python rl.py config/rl_gsm8k_nano.py            # GSM8K final-number rewards for a fine-tuned Forge-1 Nano (GPU)

Every step draws problems_per_step problems from the training side of tasks.py (never the held-out problems
eval.py scores), more often from the tasks the model fails most, and first those it answers wrong greedily
(of screen times as many candidates); samples group_size replies to each with thinking forced on; rewards a
reply 1 when the answer after <|/think|> checks out and 0 otherwise (wrong, cut off, or no answer after the
thinking); and takes one optimizer step on

    loss = -sum over replies and their tokens of (reward - mean reward of its group) * log p(token) / constant

The constant (problems x group x max_new_tokens) does not depend on the replies' lengths: dividing each
reply by its own length would make a long wrong reply cost less per token than a short one. Groups whose
replies all scored the same have no advantage anywhere and teach nothing; they are skipped (and logged).
With sft_coef > 0 the step also learns sft_coef x the supervised loss on a batch of the training data, which
keeps the policy on the traces it was trained on (InstructGPT's PPO-ptx).
Every eval_interval steps the model answers held-out problems greedily; best.pt keeps the best accuracy.
Checkpoints have train.py's format, so sample.py, chat.py, eval.py and export.py read out_dir as they read out/.
"""
import math
import os
import random
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import configurator
from common import (DTYPES, MetricsLog, StopFlag, UserError, amp_dtype, autocast, configure_optimizer, generate_replies,
                    get_batch, inference_dtype, load_data, load_tokenizer, random_starts, read_gsm8k, reply_stop_ids,
                    resolve_device, run_main, save_checkpoint, set_lr, to_device)
from model import Forge, ModelConfig
from tasks import TASKS, check_answer, difficulty_of, heldout_items, sample_problem
from tokenizer import render_prompt, special_ids, split_thinking

# ----------------------------------------------------------------------------- defaults
# Tuned for the default model of `python prepare.py && python train.py` on a 2-core CPU (see README).
# I/O
init_from = "out/best.pt"  # the supervised checkpoint to improve
out_dir = "out-rl"
resume = False             # continue out_dir/ckpt.pt: same step, optimizer, pass rates and problem draws
data_dir = ""              # the prepared data the checkpoint was trained on (its difficulty, eval.py's val loss);
                           # "": the init checkpoint's own data_dir
gsm8k = ""                 # a GSM8K-style jsonl ({question, answer "... #### N"}): rewards on its final numbers
eval_interval = 30         # greedy evaluation on held-out problems every this many steps (and at the end)
eval_items = 100           # held-out problems per task for that evaluation (answered in batches: seconds)
ckpt_interval = 20         # save out_dir/ckpt.pt every this many steps (and on exit)
# reinforcement learning
max_iters = 60
problems_per_step = 8
group_size = 16            # replies per problem: the baseline is their mean; 16 finds a right one where few are
max_new_tokens = 192
temperature = 1.0          # sampling temperature of the replies (exploration)
top_k = 0                  # 0: no top-k filter
top_p = 1.0                # 1.0: no nucleus filter
task_floor = 0.1           # every task keeps at least this draw weight, even when it is always right
screen = 4                 # > 1: draw problems_per_step x screen problems, answer them greedily, and keep those
                           # answered wrong first
# optimization: one on-policy update per batch of replies
optimizer = "adamw"        # adamw | muon, as in train.py (a fresh optimizer, whatever the init checkpoint used)
learning_rate = 1e-4       # 5% of train.py's peak: the policy is already good, keep it close
muon_lr = 0.0              # optimizer=muon: the matrices' peak learning rate, on the same schedule; 0: learning_rate
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
grad_checkpoint = False    # recompute activations in backward: less memory for long replies on small GPUs
sft_coef = 0.3             # > 0: also learn this times the supervised loss on a batch of data_dir's training data
sft_batch_size = 32        # windows of the init checkpoint's block_size per step for that loss
# system
device = "auto"
dtype = "auto"             # as train.py: auto | float32 | bfloat16 | float16
seed = 1337

DEFAULTS = configurator.defaults_of(globals())
CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", *DTYPES), "optimizer": ("adamw", "muon")}
VALIDATION_SEED = 7  # eval.py scores held-out problems drawn with another seed: best.pt is not chosen on them


# ----------------------------------------------------------------------------- settings and problems

def settings(argv):
    """(cfg, ckpt): defaults < a resumed run's stored settings < config files and --key=value, and the
    checkpoint to start from (the init checkpoint, or out_dir/ckpt.pt with --resume)."""
    config, ckpt = configurator.settings_and_checkpoint(
        argv, DEFAULTS, CHOICES, "train one first (python prepare.py && python train.py) or pass --init_from=PATH")
    if ckpt is None:
        raise UserError("init_from is empty: rl.py improves a trained checkpoint (default out/best.pt)")
    config["data_dir"] = config["data_dir"] or ckpt.get("config", {}).get("data_dir", "")
    cfg = SimpleNamespace(**config)
    for key in ("max_iters", "problems_per_step", "screen", "group_size", "max_new_tokens", "eval_interval",
                "eval_items", "ckpt_interval"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.group_size < 2:
        raise UserError("group_size must be at least 2: the baseline of a reply is its group's mean reward")
    if not 0 < cfg.top_p <= 1 or cfg.top_k < 0 or cfg.temperature <= 0 or cfg.learning_rate < 0 or cfg.muon_lr < 0:
        raise UserError("temperature must be > 0, top_p in (0, 1], top_k >= 0, learning_rate and muon_lr >= 0")
    if cfg.sft_coef < 0 or cfg.sft_batch_size < 1:
        raise UserError("sft_coef must be >= 0 and sft_batch_size at least 1")
    if cfg.sft_coef and not cfg.data_dir:
        raise UserError("sft_coef > 0 mixes in the supervised loss on prepared data, and the init checkpoint names "
                        "no data_dir: pass --data_dir=DIR (or --sft_coef=0)")
    if cfg.muon_lr and not cfg.learning_rate:
        raise UserError("muon_lr is a multiple of learning_rate's schedule: set learning_rate > 0 (or muon_lr=0)")
    return cfg, ckpt


class Problems:
    """Where the problems come from: the built-in tasks (training side), or a GSM8K file whose last eval_items
    records are kept for evaluation. Draws favour the tasks with the lowest running pass rate."""

    def __init__(self, cfg, difficulty):
        self.difficulty = difficulty
        if cfg.gsm8k:
            items = read_gsm8k(cfg.gsm8k)
            if len(items) <= cfg.eval_items:
                raise UserError(f"{cfg.gsm8k} holds {len(items)} records: more than eval_items={cfg.eval_items} "
                                "are needed (the last eval_items are held out for evaluation)")
            self.train, self.heldout, self.tasks = items[:-cfg.eval_items], items[-cfg.eval_items:], ["gsm8k"]
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

def reward(task, answer, reply, enc):
    """1.0 when reply (generated ids after a prompt that forced <|think|>) ended its turn and its answer after
    <|/think|> checks out, else 0.0: a reply cut off before its end, without <|/think|>, or wrong scores 0."""
    sp = special_ids(enc)
    if not reply or reply[-1] not in reply_stop_ids(enc) or sp["<|/think|>"] not in reply:
        return 0.0
    _, text = split_thinking([sp["<|think|>"]] + reply[:-1], enc)
    return float(check_answer(task, text, answer))


def sample_groups(model, enc, problems, cfg, ctx, generator):
    """group_size replies per problem (thinking forced on) -> [(prompt ids, [reply ids, ...])]. The copies of
    one prompt have the same length, so each group is one batch without padding."""
    stop_ids = reply_stop_ids(enc)
    groups = []
    model.eval()
    with ctx:
        for _, messages, _ in problems:
            prompt = render_prompt(messages, enc, "on")
            replies = model.generate_batch([prompt] * cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                           cfg.top_k or None, cfg.top_p, stop_ids, generator)
            groups.append((prompt, replies))
    model.train()
    return groups


def policy_loss(model, prompt, replies, advantages, constant, ctx):
    """-sum(advantage * log p(token)) / constant over the reply tokens of one group (stop tokens included:
    ending the turn is learned too). Replies are right-padded; padding is not scored."""
    length = len(prompt) + max(len(r) for r in replies)
    idx = torch.zeros(len(replies), length, dtype=torch.long)
    targets = torch.full((len(replies), length), -1, dtype=torch.long)
    for row, reply in enumerate(replies):
        seq = torch.tensor(prompt + reply)
        idx[row, :len(seq)] = seq
        targets[row, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]  # position i predicts token i + 1
    device = model.rope_cos.device
    idx, targets = idx[:, :-1].to(device), targets[:, :-1].to(device)
    with ctx:
        logits, _ = model(idx, targets)  # with targets: the logits of every position
    logp = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
    return -(torch.tensor(advantages, device=device)[:, None] * logp).sum() / constant


@torch.no_grad()
def greedy_rewards(model, enc, items, max_new_tokens, ctx):
    """Greedy answers to (task, messages, answer) items, thinking forced on -> (rewards, replies)."""
    prompts = [render_prompt(messages, enc, "on") for _, messages, _ in items]
    model.eval()
    with ctx:
        replies = generate_replies(model, enc, prompts, dict(max_new_tokens=max_new_tokens, temperature=0.0))
    model.train()
    return [reward(task, answer, r.ids, enc) for (task, _, answer), r in zip(items, replies)], replies


def evaluate(model, enc, items, max_new_tokens, ctx):
    """Greedy answers to held-out items -> ({task: accuracy}, mean thinking tokens)."""
    rewards, replies = greedy_rewards(model, enc, items, max_new_tokens, ctx)
    correct, counts = {}, {}
    for (task, _, _), r in zip(items, rewards):
        correct[task] = correct.get(task, 0) + r
        counts[task] = counts.get(task, 0) + 1
    accuracy = {task: correct[task] / counts[task] for task in counts}
    return accuracy, sum(r.thinking_tokens for r in replies) / len(replies)


def screen(model, enc, candidates, n, max_new_tokens, ctx):
    """n of the candidate problems: those the model answers wrong greedily first, then the others in draw order
    -> (problems, share of candidates answered wrong). Greedy decoding is how the model is used and scored,
    and its mistakes are where sampled groups disagree and teach."""
    rewards, _ = greedy_rewards(model, enc, candidates, max_new_tokens, ctx)
    order = sorted(range(len(candidates)), key=lambda i: rewards[i])  # stable: wrong (0) first, draw order kept
    return [candidates[i] for i in order[:n]], 1 - sum(rewards) / len(rewards)


def get_lr(cfg, it):
    """Linear warmup, then linear decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + (1 - progress) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- the loop

def main(argv):
    cfg, ckpt = settings(argv)
    device = resolve_device(cfg.device)
    device_type = device.split(":")[0]
    ptdtype = amp_dtype(device_type, cfg.dtype)
    ctx = autocast(device_type, ptdtype)
    enc = load_tokenizer(ckpt.get("tokenizer", "byte"))
    if "<|think|>" not in enc.special_tokens_set or ckpt["model_args"]["vocab_size"] < enc.n_vocab:
        raise UserError(f"the checkpoint's tokenizer ({enc.name}, vocab {ckpt['model_args']['vocab_size']}) has no "
                        "think tokens: RL needs a model trained on the chat format (prepare.py, train.py)")
    # data_dir gives the built-in tasks' difficulty and the mix-in's training data (GSM8K needs neither)
    needs_data = cfg.data_dir and (cfg.sft_coef or not cfg.gsm8k)
    meta, bins = load_data(cfg.data_dir, splits=("train",) if cfg.sft_coef else ()) if needs_data else ({}, {})
    problems = Problems(cfg, difficulty_of({} if cfg.gsm8k else meta))
    # Dropout off: the log-probabilities of the update must be those of the policy that sampled the replies.
    model = Forge(ModelConfig(**ckpt["model_args"] | {"dropout": 0.0, "grad_checkpoint": cfg.grad_checkpoint}))
    model.load_state_dict(ckpt["model"])
    model.to(device).train()
    # Generation runs in the precision sample.py would pick (fp32 for small models on a CPU, where half
    # precision only adds per-op overhead), the update in train.py's.
    sample_dtype = inference_dtype(device_type, cfg.dtype, model.num_params()["total"])
    sample_ctx = autocast(device_type, None if sample_dtype == torch.float32 else sample_dtype)
    optimizer = configure_optimizer(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                    cfg.optimizer, cfg.muon_lr)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    iter_num, best_accuracy = 0, -1.0
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_accuracy, problems.pass_rate = ckpt["iter_num"], ckpt["best_accuracy"], ckpt["pass_rates"]
    init_from = ckpt.get("init_from", cfg.init_from)
    config = vars(cfg) | {"init_from": init_from}
    del ckpt

    def save(name):
        save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "config": config,
                         "tokenizer": enc.name, "init_from": init_from, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "iter_num": iter_num, "best_accuracy": best_accuracy,
                         "pass_rates": problems.pass_rate}, os.path.join(cfg.out_dir, name))

    os.makedirs(cfg.out_dir, exist_ok=True)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.resume else None)
    n_params = model.num_params()["total"]
    tqdm.write(f"rl: {init_from if not cfg.resume else cfg.out_dir + '/ckpt.pt'} ({n_params / 1e6:.2f}M parameters) "
               f"on {device}, {str(ptdtype or torch.float32).removeprefix('torch.')}; "
               f"{cfg.problems_per_step} problems x {cfg.group_size} replies per step, "
               f"{'GSM8K ' + cfg.gsm8k if cfg.gsm8k else 'built-in tasks'}")
    stop = StopFlag()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="step", dynamic_ncols=True)
    constant = cfg.problems_per_step * cfg.group_size * cfg.max_new_tokens
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            accuracy, thinking = evaluate(model, enc, problems.heldout, cfg.max_new_tokens, sample_ctx)
            overall = sum(accuracy.values()) / len(accuracy)
            log.write(iter=iter_num, heldout_accuracy=overall, heldout_thinking_tokens=thinking,
                      **{f"heldout_{t}": a for t, a in accuracy.items()})
            tqdm.write(f"step {iter_num}: held-out accuracy {overall:.1%} ("
                       + ", ".join(f"{t} {a:.0%}" for t, a in accuracy.items()) + f"), thinking {thinking:.0f} tokens")
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
        lr = get_lr(cfg, iter_num)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        batch = problems.draw(cfg.problems_per_step * cfg.screen, rng, cfg.task_floor)
        screened = {}
        if cfg.screen > 1:
            batch, wrong = screen(model, enc, batch, cfg.problems_per_step, cfg.max_new_tokens, sample_ctx)
            screened = {"greedy_wrong_share": wrong}
        t_sample = time.perf_counter()
        groups = sample_groups(model, enc, batch, cfg, sample_ctx, generator)
        sample_seconds = time.perf_counter() - t_sample

        # One on-policy update: the replies were sampled by exactly these weights, so the importance ratio of
        # PPO/GRPO is 1 and there is nothing to clip; and since the policy moves once per batch, by a small
        # learning rate, from a model that already answers well, no KL penalty to a reference is needed.
        task_rewards, lengths, flat, loss_total = {}, [], 0, 0.0
        for (task, _, answer), (prompt, replies) in zip(batch, groups):
            rewards = [reward(task, answer, r, enc) for r in replies]
            task_rewards.setdefault(task, []).extend(rewards)
            lengths += [len(r) for r in replies]
            mean = sum(rewards) / len(rewards)
            if all(r == mean for r in rewards):
                flat += 1
                continue
            loss = policy_loss(model, prompt, replies, [r - mean for r in rewards], constant, ctx)
            scaler.scale(loss).backward()
            loss_total += loss.item()
        problems.update(task_rewards)
        sft = {}
        if cfg.sft_coef:  # the supervised mix-in: train.py's loss on a batch of its data, in the same step
            tokens, mask = bins["train"]
            T = model.config.block_size
            starts = random_starts(tokens, cfg.sft_batch_size, T, torch.Generator().manual_seed(cfg.seed + iter_num))
            x, y = to_device(get_batch(tokens, mask, starts, T), device)
            with ctx:
                _, sft_loss = model(x, y)
            scaler.scale(cfg.sft_coef * sft_loss).backward()
            sft = {"sft_loss": sft_loss.item()}
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        if math.isfinite(grad_norm) or scaler.is_enabled():  # a non-finite gradient skips the update
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        all_rewards = [r for rs in task_rewards.values() for r in rs]
        log.write(iter=iter_num, reward=sum(all_rewards) / len(all_rewards), loss=loss_total, **sft, **screened, lr=lr,
                  grad_norm=grad_norm, zero_variance_share=flat / len(groups), reply_tokens=sum(lengths) / len(lengths),
                  sampling_tokens_per_s=sum(lengths) / sample_seconds, step_seconds=time.perf_counter() - t0,
                  **{f"reward_{t}": sum(rs) / len(rs) for t, rs in task_rewards.items()},
                  **{f"pass_rate_{t}": p for t, p in problems.pass_rate.items()})
        bar.set_postfix_str(f"reward {sum(all_rewards) / len(all_rewards):.2f} flat {flat}/{len(groups)} "
                            f"len {sum(lengths) / len(lengths):.0f} {sum(lengths) / sample_seconds:.0f} tok/s",
                            refresh=False)
        iter_num += 1
        bar.update()

    save("ckpt.pt")
    bar.close()
    if stop.signum:
        tqdm.write(f"interrupted: saved {cfg.out_dir}/ckpt.pt at step {iter_num}; --resume continues")
        sys.exit(128 + stop.signum)
    tqdm.write(f"done: step {iter_num}, best held-out accuracy {best_accuracy:.1%} in {cfg.out_dir}/best.pt; "
               f"score it with python eval.py --out_dir {cfg.out_dir}")


if __name__ == "__main__":
    try:
        run_main(main, sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("rl.py: interrupted twice: stopped without saving (the last ckpt.pt is intact)")
