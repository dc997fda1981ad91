"""
Direct Preference Optimization (Rafailov et al. 2023): learn from pairs of replies to one prompt, one preferred
(chosen) over the other (rejected), the loss itself keeping the model near a frozen copy of where it started (the
reference): no reward model, no sampling while it trains.

    python prepare.py && python train.py && python dpo.py && python eval.py --out_dir out-dpo
    python dpo.py --num_pairs=512 --beta=0.2    # settings as in train.py: defaults below, config files, --key=value
    python dpo.py --pairs=prefs.jsonl           # your own preference pairs instead of the model's own replies
    python dpo.py --resume                      # continue out_dir/ckpt.pt exactly where it stopped

pairs="" builds them offline, before training, from the model's own replies to training problems of the built-in
tasks (rl.py's: never the held-out ones eval.py scores): of samples_per_prompt replies (thinking on, as rl.py), a
right one (replies.is_correct) and a wrong one that ended its turn make a pair. They go to out_dir/pairs.jsonl, one
JSON object a line, the format pairs=PATH reads ("prompt": "text" may stand for one user turn; "task" and "answer"
are optional):

    {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "task": "add", "answer": "5",
     "chosen": {"thinking": "2+3: 2+3=5, 5", "content": "5"}, "rejected": {"thinking": "2+3: 2+3=6, 6", "content": "6"}}

A reply is an assistant turn as in the SFT data, thinking (null or absent: a direct answer) and content, rendered
by tokenizer.py's chat format as plain text (a typed <|think|> stays text); a string is a reply without thinking.

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))
           - nll_coef * log pi(chosen) / len(chosen)

log pi(reply) sums over its tokens after the prompt, from <|think|> (or <|no_think|>) through <|/assistant|>.
beta * (log pi - log ref) is a reply's implicit reward: logged are its margin (chosen - rejected) and the share of
pairs where that is positive (preference accuracy). Held-out evaluation and best.pt as in rl.py, and its checkpoint
format: sample.py, chat.py, eval.py and export.py read out_dir as they read out/.
"""
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import configurator
from checkpoints import chat_policy
from common import StopFlag, UserError
from data import load_data
from device import DTYPES
from replies import VALIDATION_SEED, evaluate, generate_replies, is_correct, reply_token_losses, report_heldout
from tasks import TASKS, difficulty_of, heldout_items, sample_problem
from tokenizer import render_conversation, render_prompt
from training import (MetricsLog, check_optimizer_settings, clip_gradients, exit_if_stopped, make_optimizer,
                      optimizer_step, run_training, save_run, set_lr)

# ----------------------------------------------------------------------------- defaults
# I/O
init_from = "out/best.pt"  # the checkpoint to improve, and the frozen reference
out_dir = "out-dpo"
resume = False             # continue out_dir/ckpt.pt: same step, optimizer, pairs (out_dir/pairs.jsonl) and order
pairs = ""                 # a jsonl of preference pairs (the format above); "": build them from the model's replies
data_dir = ""              # the prepared data the checkpoint was trained on (the tasks' difficulty); "": the init
                           # checkpoint's own data_dir
eval_interval = 10         # greedy evaluation on held-out problems every this many steps (and at the end)
eval_items = 100           # held-out problems per task for it: rl.py's, the same problems
ckpt_interval = 20         # save out_dir/ckpt.pt every this many steps (and on exit)
# self-built pairs
num_pairs = 256
max_prompts = 2048         # stop drawing problems after this many, with fewer pairs if need be
samples_per_prompt = 8     # replies per problem: a pair needs a right and a wrong one among them
max_new_tokens = 192       # also the held-out evaluation's
reasoning = "on"           # the replies' mode (sampled and evaluated): "on" forces a think block, "auto" lets the
                           # model choose (then whether to think is part of the pair)
temperature = 1.0
# DPO
beta = 0.5                 # how far from the reference the implicit reward lets the policy go (the paper: 0.1;
                           # here 0.5 with learning_rate 2e-5 lost least, docs/adapt.md)
nll_coef = 1.0             # + this x the chosen reply's negative log-likelihood per token (Pang et al. 2024, IRPO:
                           # on reasoning, DPO alone lowers the chosen replies' likelihood too; docs/adapt.md)
max_iters = 48             # 3 passes over 256 pairs in batches of 16
batch_size = 16            # pairs per step
micro_batch = 8            # pairs per forward and backward pass (two rows each): memory, not the gradient
optimizer = "adamw"        # adamw | muon, as in train.py (a fresh optimizer)
learning_rate = 2e-5       # a fifth of rl.py's 1e-4: DPO's summed log-probs make far larger steps than rl.py's
                           # per-token policy gradient; 5e-5 took held-out accuracy from 95.4% to 84-88% in 48 steps
muon_lr = 0.0              # optimizer=muon: the matrices' learning rate; 0: learning_rate
warmup_iters = 5           # linear warmup, then constant: the DPO paper's schedule
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
grad_checkpoint = False    # recompute activations in backward: less memory for long pairs
lora_rank = 0              # > 0: train LoRA adapters of this rank on the block matrices only, as train.py's
lora_alpha = 16.0          # the adapters' update is scaled by lora_alpha / lora_rank
lora_targets = "all"       # all, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
# system
device = "auto"
dtype = "auto"             # as train.py: auto | float32 | bfloat16 | float16
seed = 1337

DEFAULTS = configurator.defaults_of(globals())
CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", *DTYPES), "optimizer": ("adamw", "muon"),
           "reasoning": ("on", "auto")}
PAIR_FORMAT = '{"messages": [...] or "prompt": text, "chosen": reply, "rejected": reply}'


def settings(argv):
    """(cfg, ckpt): defaults < a resumed run's stored settings < config files and --key=value, and the checkpoint
    to start from (init_from, or out_dir/ckpt.pt with --resume)."""
    cfg, ckpt = configurator.policy_settings(argv, DEFAULTS, CHOICES, "dpo.py")
    configurator.check_ranges(cfg, at_least_one=("max_iters", "num_pairs", "max_prompts", "samples_per_prompt",
                                                 "max_new_tokens", "batch_size", "micro_batch",
                                                 "eval_interval", "eval_items", "ckpt_interval"),
                              non_negative=("warmup_iters", "learning_rate", "muon_lr", "weight_decay", "grad_clip"))
    if cfg.samples_per_prompt < 2:
        raise UserError("samples_per_prompt must be at least 2: a pair needs a right and a wrong reply")
    if cfg.beta <= 0 or cfg.temperature <= 0 or cfg.nll_coef < 0:
        raise UserError("beta and temperature must be > 0, nll_coef >= 0")
    check_optimizer_settings(cfg)
    return cfg, ckpt


# ----------------------------------------------------------------------------- pairs

def parse_pair(obj):
    """A pairs file's object -> its record: messages, and chosen and rejected as {"thinking", "content"}; other keys
    kept as they are. Raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "chosen" not in obj or "rejected" not in obj or ("messages" in obj) == ("prompt" in obj):
        keys = ", ".join(map(repr, obj)) or "none"
        raise ValueError(f"expected chosen, rejected, and messages or prompt (one of them), got {keys}")
    record = dict(obj)
    if "prompt" in record:
        if not isinstance(prompt := record.pop("prompt"), str):
            raise ValueError("prompt must be a string")
        record["messages"] = [{"role": "user", "content": prompt}]
    for key in ("chosen", "rejected"):
        reply = {"content": obj[key]} if isinstance(obj[key], str) else obj[key]
        if (not isinstance(reply, dict) or not isinstance(reply.get("content"), str) or set(reply) - {"thinking",
                "content"} or not isinstance(reply.get("thinking"), (str, type(None)))):
            raise ValueError(f'{key} must be a reply: text, or {{"thinking": text or null, "content": text}}')
        record[key] = {"thinking": reply.get("thinking"), "content": reply["content"]}
    return record


def encode_pair(record, enc):
    """(prompt, chosen, rejected) token ids: the prompt ends with the user's turn (whether to think is the reply's
    first token), a reply is its assistant turn as render_conversation renders it, up to its <|/assistant|>."""
    prompt = render_prompt(record["messages"], enc, "auto")
    replies = [render_conversation(record["messages"] + [{"role": "assistant", **record[key]}], enc)[0]
               for key in ("chosen", "rejected")]
    return prompt, *(ids[len(prompt):-1] for ids in replies)  # -1: the <|eos|> after the conversation


def read_pairs(path, enc, block_size):
    """The preference pairs of a jsonl file -> (records, [(prompt, chosen, rejected) ids]). Whatever is wrong is a
    one-line UserError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read pairs={path}: {getattr(e, 'strerror', None) or e}") from None
    records, encoded = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_pair(json.loads(line))
            ids = encode_pair(record, enc)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not JSON ({e.msg}): expected {PAIR_FORMAT}") from None
        except ValueError as e:  # parse_pair's, or the chat renderer's
            raise UserError(f"{path}:{lineno}: {e}") from None
        if ids[1] == ids[2]:
            raise UserError(f"{path}:{lineno}: chosen and rejected are the same reply: a pair needs two different ones")
        if (length := len(ids[0]) + max(len(ids[1]), len(ids[2])) - 1) > block_size:
            raise UserError(f"{path}:{lineno}: the pair is {length} tokens, longer than the model's context "
                            f"({block_size}): shorten it or leave it out")
        records.append(record)
        encoded.append(ids)
    if not records:
        raise UserError(f"{path} holds no preference pairs: expected one JSON object a line, {PAIR_FORMAT}")
    return records, encoded


def write_pairs(records, path):
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(f"{path}.tmp", path)


def pick_pair(problem, replies, enc, block_size):
    """The pair a problem's replies give, or None: the first right reply chosen, the first wrong one that ended its
    turn rejected. A cut-off reply is never rejected: the file holds whole turns, and rendered as one it would end
    in a <|/assistant|> (perhaps after an empty answer) that the model never wrote, which DPO would then push down."""
    task, messages, answer = problem
    right = [r for r in replies if is_correct(r, task, answer)]
    wrong = [r for r in replies if r.finish == "stop" and not is_correct(r, task, answer)]
    if not right or not wrong:
        return None
    record = {"messages": messages, "task": task, "answer": answer,
              "chosen": {"thinking": right[0].thinking, "content": right[0].answer},
              "rejected": {"thinking": wrong[0].thinking, "content": wrong[0].answer}}
    prompt, chosen, rejected = encode_pair(record, enc)
    return record if len(prompt) + max(len(chosen), len(rejected)) - 1 <= block_size else None


def build_pairs(model, enc, cfg, difficulty, ctx, stop):
    """Up to num_pairs pairs from the model's own replies to training problems, the tasks in turn, drawn until there
    are enough or max_prompts were tried -> (records, problems drawn)."""
    rng, generator = random.Random(cfg.seed), torch.Generator(device=model.device).manual_seed(cfg.seed)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    records, drawn = [], 0
    bar = tqdm(total=cfg.num_pairs, unit="pair", desc="building pairs", dynamic_ncols=True, leave=False)
    model.eval()
    while len(records) < cfg.num_pairs and drawn < cfg.max_prompts and not stop.signum:
        task = TASKS[drawn % len(TASKS)]
        question, _, answer = sample_problem(task, rng, difficulty, heldout=False)
        messages = [{"role": "user", "content": question}]
        prompts = [render_prompt(messages, enc, cfg.reasoning)] * cfg.samples_per_prompt
        with ctx:  # copies of one prompt: one length, one batch
            replies = generate_replies(model, enc, prompts, sampling, generator)
        drawn += 1
        if record := pick_pair((task, messages, answer), replies, enc, model.config.block_size):
            records.append(record)
            bar.update()
    model.train()
    bar.close()
    return records, drawn


def run_pairs(cfg, model, enc, difficulty, ctx, stop):
    """The run's pairs: built or read (pairs=PATH), written to out_dir/pairs.jsonl (kept there: a resumed run reads
    them again, and they can be looked at), and read back from there -> (records, encoded, problems drawn or None)."""
    path, drawn = os.path.join(cfg.out_dir, "pairs.jsonl"), None
    if not cfg.resume:
        if cfg.pairs:
            records, _ = read_pairs(cfg.pairs, enc, model.config.block_size)
        else:
            records, drawn = build_pairs(model, enc, cfg, difficulty, ctx, stop)
            exit_if_stopped(stop, "interrupted while building pairs: nothing saved", tqdm.write)
            if not records:
                raise UserError(f"no pairs: of {cfg.samples_per_prompt} replies to each of {drawn} problems, never "
                                "both a right one and a wrong one that ended its turn: raise samples_per_prompt, "
                                "temperature or max_new_tokens, or pass pairs=PATH")
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_pairs(records, path)
    records, encoded = read_pairs(path, enc, model.config.block_size)
    return records, encoded, drawn


# ----------------------------------------------------------------------------- the loss

def reply_logprobs(model, pairs, ctx):
    """log p of the chosen and of the rejected reply of (prompt, chosen, rejected) ids -> (chosen, rejected), one
    forward pass over both."""
    prompts = [prompt for prompt, _, _ in pairs] * 2
    logp = -reply_token_losses(model, prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], ctx).sum(1)
    return logp[:len(pairs)], logp[len(pairs):]


@torch.no_grad()
def reference_logprobs(model, encoded, micro_batch, ctx):
    """The reference's log-probs of every pair's chosen and rejected replies -> (pairs, 2) on the CPU, computed once
    by the init model before it trains: they are all DPO asks of its frozen reference, so no second model is kept in
    memory. They go into the checkpoints, so --resume needs neither the init checkpoint nor the time again."""
    return torch.cat([torch.stack(reply_logprobs(model, encoded[i:i + micro_batch], ctx), 1).float().cpu()
                      for i in range(0, len(encoded), micro_batch)])


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO's loss of each pair, and the implicit rewards beta * (log pi - log ref) of its chosen and rejected
    replies (detached)."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def step_pairs(n, batch_size, seed, it):
    """The pairs of step it: consecutive batches of a seeded shuffle of the n pairs, another every pass; a function
    of (seed, step), so a resumed run learns on what the uninterrupted one would."""
    positions = range(it * batch_size, (it + 1) * batch_size)
    orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
              for epoch in {position // n for position in positions}}
    return [orders[position // n][position % n] for position in positions]


def dpo_step(model, encoded, ref, indices, beta, micro_batch, scaler, ctx, nll_coef=0.0):
    """Backward the mean DPO loss of the pairs at indices, plus nll_coef x the chosen replies' negative log-likelihood
    per token, micro_batch pairs at a time (each pair's loss / the batch size: the same gradient) -> the batch's loss,
    reward margin, preference accuracy, mean implicit rewards and the chosen replies' NLL per token."""
    totals = torch.zeros(6)
    for i in range(0, len(indices), micro_batch):
        rows = indices[i:i + micro_batch]
        policy_chosen, policy_rejected = reply_logprobs(model, [encoded[j] for j in rows], ctx)
        reference = ref[rows].to(policy_chosen.device)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference[:, 0], reference[:, 1], beta)
        nll = -policy_chosen / torch.tensor([len(encoded[j][1]) for j in rows], device=policy_chosen.device)
        losses = losses + nll_coef * nll
        scaler.scale(losses.sum() / len(indices)).backward()
        totals += torch.stack([losses.detach().sum(), (chosen - rejected).sum(), (chosen > rejected).sum(),
                               chosen.sum(), rejected.sum(), nll.detach().sum()]).float().cpu()
    names = ("loss", "reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward", "chosen_nll")
    return {name: value / len(indices) for name, value in zip(names, totals.tolist())}


# ----------------------------------------------------------------------------- the loop

def main(argv):
    cfg, ckpt = settings(argv)
    if cfg.resume and "ref_logprobs" not in ckpt:
        raise UserError(f"{cfg.out_dir}/ckpt.pt is not a dpo.py run's: pick another out_dir, or --init_from it")
    model, lora, enc, tokenizer, device, amp, ctx, sample_ctx = chat_policy(cfg, ckpt, "DPO")
    difficulty = difficulty_of(load_data(cfg.data_dir, splits=())[0] if cfg.data_dir else {})
    source = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume else cfg.init_from
    tqdm.write(f"dpo: {source} ({model.num_params()['total'] / 1e6:.2f}M parameters) on {device}, "
               f"{str(amp or torch.float32).removeprefix('torch.')}; {cfg.batch_size} pairs per step, beta {cfg.beta}")
    stop = StopFlag()
    t0 = time.perf_counter()
    records, encoded, drawn = run_pairs(cfg, model, enc, difficulty, sample_ctx, stop)
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    if cfg.resume and digest != ckpt["pairs_digest"]:
        raise UserError(f"{cfg.out_dir}/pairs.jsonl changed since the run started: put it back, or start a new run")
    t1 = time.perf_counter()
    ref = ckpt["ref_logprobs"] if cfg.resume else reference_logprobs(model, encoded, cfg.micro_batch, ctx)
    tasks = Counter(r["task"] if isinstance(r.get("task"), str) else "other" for r in records)
    origin = f"{drawn} problems sampled" if drawn is not None else cfg.pairs if not cfg.resume else "out_dir"
    tqdm.write(f"dpo: {len(records)} pairs (" + ", ".join(f"{t} {n}" for t, n in sorted(tasks.items()))
               + f") from {origin} in {t1 - t0:.1f}s; reference log-probs in {time.perf_counter() - t1:.1f}s")
    optimizer, scaler = make_optimizer(model, cfg, device.split(":")[0], amp, ckpt)
    iter_num, best_accuracy = (ckpt["iter_num"], ckpt["best_accuracy"]) if cfg.resume else (0, -1.0)
    init_from = ckpt.get("init_from", cfg.init_from)
    config = vars(cfg) | {"init_from": init_from}
    del ckpt

    def save(name):
        save_run(os.path.join(cfg.out_dir, name), model, asdict(model.config), tokenizer, config, optimizer, scaler,
                 iter_num, lora, init_from=init_from, best_accuracy=best_accuracy, ref_logprobs=ref,
                 pairs_digest=digest)

    heldout = list(heldout_items(cfg.eval_items * len(TASKS), VALIDATION_SEED, difficulty))
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.resume else None)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            accuracy, thinking = evaluate(model, enc, heldout, cfg.max_new_tokens, sample_ctx, cfg.reasoning)
            if (overall := report_heldout(log, iter_num, accuracy, thinking)) > best_accuracy:
                best_accuracy = overall
                save("best.pt")
        if stop.signum or iter_num >= cfg.max_iters:
            break
        if iter_num % cfg.ckpt_interval == 0 and iter_num > 0:
            save("ckpt.pt")

        t0 = time.perf_counter()
        lr = set_lr(optimizer, cfg.learning_rate * min(1.0, (iter_num + 1) / (cfg.warmup_iters + 1)))
        indices = step_pairs(len(encoded), cfg.batch_size, cfg.seed, iter_num)
        metrics = dpo_step(model, encoded, ref, indices, cfg.beta, cfg.micro_batch, scaler, ctx, cfg.nll_coef)
        grad_norm = float(clip_gradients(model, optimizer, scaler, cfg.grad_clip))
        optimizer_step(optimizer, scaler, metrics["loss"], grad_norm)
        log.write(iter=iter_num, **metrics, lr=lr, grad_norm=grad_norm, step_seconds=time.perf_counter() - t0)
        bar.set_postfix_str(f"loss {metrics['loss']:.3f} margin {metrics['reward_margin']:.3f} "
                            f"acc {metrics['preference_accuracy']:.0%}", refresh=False)
        iter_num += 1
        bar.update()

    save("ckpt.pt")
    bar.close()
    exit_if_stopped(stop, f"interrupted: saved {cfg.out_dir}/ckpt.pt at step {iter_num}; --resume continues",
                    tqdm.write)
    tqdm.write(f"done: step {iter_num} in {time.perf_counter() - t_train:.1f}s of training (evaluations included), "
               f"best held-out accuracy {best_accuracy:.1%} in {cfg.out_dir}/best.pt; "
               f"score it with python eval.py --out_dir {cfg.out_dir}")


if __name__ == "__main__":
    run_training(main, sys.argv[1:])
