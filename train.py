"""
Train a Forge model: one readable loop, from a 2-core laptop to many GPUs.

    python prepare.py && python train.py                 # the embedded demo, sized for a 2-core CPU
    python train.py config/nano_3050ti.py --batch_size=1  # a preset, then command-line overrides
    python train.py --resume                             # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/sft_chat.py --init_from=out-nano/best.pt   # fine-tune: weights only
    python train.py --init_from=out/best.pt --lora_rank=8 --data_dir=...  # LoRA adapters on a frozen base
    python train.py --teacher=out/best.pt --n_layer=5 --n_embd=128      # distill into a smaller student
    torchrun --standalone --nproc_per_node=8 train.py config/h100_ddp.py  # DDP, one process per GPU

Settings are the module-level defaults below, overridden in order by config files (plain Python
assignments) and --key=value arguments (a Python literal of the default's type; text for text
settings; a bare --flag means True): see configurator.py. The effective config is printed and stored
in every checkpoint.

Test hook: NANOFORGE_NAN_ITERS="3,4" turns the loss into NaN at those iterations, to exercise the
non-finite guard (skip the update; stop after max_nonfinite in a row): see training.add_nan_hook.
"""
import contextlib
import math
import os
import sys
import textwrap
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from checkpoints import build_model, build_run_model
from common import StopFlag, UserError
from data import check_tokenizer, get_batch, load_data, random_starts, to_device
from device import (DTYPES, amp_dtype, autocast, choose_compile, compile_model, cpu_auto_dtype, peak_flops,
                    print_memory_estimate, setup_process)
from distill import distillation_loss, load_teacher
from lora import add_lora, parse_targets
from tokenizer import tokenizer_name
from training import (MetricsLog, add_nan_hook, check_optimizer_settings, clip_gradients, exit_if_stopped, get_lr,
                      make_optimizer, optimizer_step, run_training, save_run, set_lr, stage_at)

# ----------------------------------------------------------------------------- defaults
# The embedded demo: a 3M-parameter model on the built-in reasoning data (`python prepare.py`), tuned to
# finish in minutes on a 2-core CPU and to answer clearly better with its thinking than without.
# I/O
out_dir = "out"
data_dir = "data/reasoning"
init_from = ""           # a checkpoint path: start from its weights with a fresh optimizer (fine-tuning)
resume = False           # continue out_dir/ckpt.pt: same iteration, learning rate and data order
eval_interval = 500      # evaluate train/val loss every this many iterations (and at the end)
eval_iters = 10          # batches per split per evaluation
ckpt_interval = 250      # save out_dir/ckpt.pt every this many iterations (and on exit)
log_interval = 10        # progress bar and metrics.jsonl every this many iterations
dry_run = False          # print the config, model size and memory estimate, then exit
dry_run_vocab = 50304    # the vocabulary a dry run assumes while data_dir is not prepared (GPT-2's, padded)
wandb_log = False
wandb_project = "nanoforge"
wandb_run_name = ""
# model (the architecture of init_from / resume checkpoints wins over these)
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 256
ffn_hidden = 0           # 0: 8/3 * n_embd, rounded up to a multiple of 64
emb_rank = 0             # > 0: factorized embedding of this rank (Yxanul)
block_size = 256         # context length
dropout = 0.0
grad_checkpoint = False  # recompute activations in backward: much less memory, one more forward pass
# adapting a trained model (docs/adapt.md)
lora_rank = 0            # > 0: train LoRA adapters of this rank on init_from's block matrices, the rest frozen
lora_alpha = 16.0        # the adapters' update is scaled by lora_alpha / lora_rank
lora_targets = "all"     # all, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
teacher = ""             # a checkpoint (same tokenizer): also learn its token distributions (distillation)
distill_coef = 0.5       # loss = (1 - distill_coef) * data loss + distill_coef * T^2 * KL(teacher || student)
distill_temperature = 2.0  # T: both distributions softened by it, so the teacher's near-misses teach too
# optimization: tokens per step = batch_size * block_size * grad_accum * world size
batch_size = 16
grad_accum = 1
max_iters = 1000
optimizer = "muon"       # adamw | muon: Muon for the matrices inside the blocks, AdamW for the rest (training.py)
learning_rate = 2e-3     # peak learning rate (AdamW's)
muon_lr = 3e-3           # optimizer=muon: the matrices' peak learning rate, on the same schedule; 0: learning_rate
min_lr = 2e-4            # the end of the schedule (Muon's: scaled by muon_lr / learning_rate)
lr_schedule = "cosine"   # cosine | wsd, both after a linear warmup. cosine: down to min_lr along a cosine. wsd
                         # (warmup-stable-decay): constant, then down to min_lr over the last decay_frac
decay_frac = 0.2         # wsd: the share of the iterations (up to lr_decay_iters) spent decaying
warmup_iters = 100
lr_decay_iters = 0       # the schedule reaches min_lr here; 0: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0          # 0: no clipping
seq_curriculum = []      # [(from_iter, block_size, batch_size), ...]: shorter windows first (Yxanul)
windows = "documents"    # documents | random: windows start at a document's <|bos|> (prepare's index), or anywhere
max_nonfinite = 5        # stop after this many non-finite losses / gradients in a row
# system
device = "auto"          # auto | cpu | cuda | mps (torchrun: the local GPU)
dtype = "auto"           # auto | float32 | bfloat16 | float16 (auto: measured on CPUs; bf16, or fp16 on old GPUs)
compile = "auto"         # auto | True | False (auto: on for CUDA, and on CPUs where dtype=auto chose bf16)
seed = 1337

DEFAULTS = configurator.defaults_of(globals())
CHOICES = {"compile": ("auto", True, False), "device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", *DTYPES),
           "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd"), "windows": ("random", "documents")}
ARCHITECTURE = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "emb_rank")


# ----------------------------------------------------------------------------- configuration

def settings(argv):
    """(cfg, ckpt): the run's settings, and the checkpoint it starts from (init_from or resume) or None.
    defaults < a resumed run's stored config < config files and --key=value; the architecture (ARCHITECTURE)
    is the checkpoint's, whatever the settings say."""
    config, ckpt = configurator.settings_and_checkpoint(argv, DEFAULTS, CHOICES, "train one first")
    if ckpt is not None:
        config |= {k: ckpt["model_args"][k] for k in ARCHITECTURE}
    cfg = SimpleNamespace(**config)
    check_config(cfg)
    return cfg, ckpt


def check_config(cfg):
    """Relations between settings that no single type check catches."""
    configurator.check_ranges(
        cfg, at_least_one=("batch_size", "grad_accum", "block_size", "eval_interval", "eval_iters", "ckpt_interval",
                           "log_interval", "n_layer", "n_head", "n_kv_head", "n_embd", "max_nonfinite"),
        non_negative=("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "muon_lr", "min_lr",
                      "decay_frac", "weight_decay", "grad_clip", "lora_rank", "distill_coef", "distill_temperature"))
    for name, of in (("decay_frac", "the iterations"), ("distill_coef", "the loss")):
        if getattr(cfg, name) > 1:
            raise UserError(f"{name}={getattr(cfg, name)} is a share of {of}: at most 1")
    if cfg.lora_rank and not (cfg.init_from or cfg.resume or cfg.dry_run):
        raise UserError("lora_rank > 0 adapts a trained model: give it one with --init_from=CKPT")
    parse_targets(cfg.lora_targets)
    check_optimizer_settings(cfg)
    stages = cfg.seq_curriculum
    if any(not isinstance(s, tuple) or len(s) != 3 or not all(isinstance(v, int) for v in s) for s in stages):
        raise UserError(f"seq_curriculum={stages!r}: expected a list of (from_iter, block_size, batch_size)")
    if [s[0] for s in stages] != sorted(s[0] for s in stages):
        raise UserError("seq_curriculum stages must be in order of their from_iter")
    if any(s[1] > cfg.block_size or s[1] < 1 or s[2] < 1 for s in stages):
        raise UserError(f"seq_curriculum block sizes must be within 1..block_size={cfg.block_size}")


# ----------------------------------------------------------------------------- the model

def model_for_run(cfg, meta, ckpt, device="cpu"):
    """(model args, model, LoRA record or None): fresh, or with a checkpoint's weights (cfg holds its architecture
    then), with LoRA adapters on top (lora_rank: checkpoints.build_run_model); the vocabulary is the data's.
    device="meta" builds the shapes only (dry_run: no memory, no time)."""
    if ckpt is not None:
        check_tokenizer(meta, ckpt.get("tokenizer"), cfg.data_dir)
    stored = ckpt["model_args"] if ckpt is not None else {}  # fields train.py has no setting for (rope_theta...)
    args = stored | {k: getattr(cfg, k) for k in ARCHITECTURE} | dict(vocab_size=meta["vocab_size"],
        block_size=cfg.block_size, dropout=cfg.dropout, grad_checkpoint=cfg.grad_checkpoint)
    if ckpt is None or device == "meta":
        model = build_model(args, device=device)
        if cfg.lora_rank:  # the dry run of a LoRA run: its adapters are counted
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_targets(cfg.lora_targets), cfg.seed)
        return args, model, None
    source = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume else cfg.init_from
    return args, *build_run_model(args, ckpt, source, cfg, device)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx, device, rank, world):
    """Mean loss per split over eval_iters batches of every rank. The windows are the same at every
    evaluation, so successive losses differ only because the model did."""
    model.eval()
    losses = {}
    for split, (tokens, mask, index) in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed + rank)
        total = torch.zeros((), device=device)
        for _ in range(cfg.eval_iters):
            starts = random_starts(tokens, cfg.batch_size, cfg.block_size, generator, index)
            x, y = to_device(get_batch(tokens, mask, starts, cfg.block_size), device)
            with ctx:
                total += model(x, y)[1].float()
        if world > 1:
            dist.all_reduce(total)
        losses[split] = total.item() / (cfg.eval_iters * world)
    model.train()
    return losses


def setup(cfg):
    """(device, rank, local_rank, world, autocast dtype or None) of this process. A dry run assumes what a GPU
    would use; dtype=auto on a CPU says what it measured and chose."""
    if cfg.dry_run:
        return "cpu", 0, 0, 1, {"float32": None, "float16": torch.float16}.get(cfg.dtype, torch.bfloat16)
    device, rank, local_rank, world = setup_process(cfg.device)
    if device == "cpu" and cfg.dtype == "auto" and rank == 0:
        print(f"dtype auto: {cpu_auto_dtype()[1]}")  # measured just now (and kept): the choice and why
    return device, rank, local_rank, world, amp_dtype(device.split(":")[0], cfg.dtype)


def read_data(cfg, say):
    """meta.json and the train/val bins; a dry run needs only the vocabulary (dry_run_vocab where nothing is
    prepared)."""
    if cfg.dry_run and not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        say(f"dry run: {cfg.data_dir} is not prepared yet; assuming a vocabulary of {cfg.dry_run_vocab} tokens")
        return {"tokenizer": "assumed", "vocab_size": cfg.dry_run_vocab}, {}
    meta, splits = load_data(cfg.data_dir, () if cfg.dry_run else ("train", "val"), cfg.windows == "documents")
    for split, (tokens, _, _) in splits.items():
        if len(tokens) <= cfg.block_size:  # curriculum stages are no longer (check_config)
            raise UserError(f"{split}.bin holds {len(tokens)} tokens, too few for block_size={cfg.block_size}: "
                            "lower block_size or prepare more data")
    return meta, splits


def describe(cfg, meta, model, amp, world, device, master, say):
    """The config, the model, the tokens per step and (rank 0) the memory of the largest micro-batch."""
    mc, n_params = model.config, model.num_params()
    stages = [stage_at(cfg, it) for it in [0] + [s[0] for s in cfg.seq_curriculum]]
    T_max, B_max = max(stages, key=lambda tb: tb[0] * tb[1])  # the largest micro-batch sets peak memory
    say(textwrap.fill(" ".join(f"{k}={v!r}" for k, v in vars(cfg).items()), 110, initial_indent="config: ",
                      subsequent_indent="    ", break_on_hyphens=False))
    say(f"model: {n_params['total'] / 1e6:.2f}M parameters ({n_params['embedding'] / 1e6:.2f}M embedding), "
        f"{mc.n_layer} layers, d={mc.n_embd}, heads {mc.n_head}/{mc.n_kv_head}, ffn {mc.ffn_hidden}, "
        f"context {mc.block_size}, {tokenizer_name(meta['tokenizer'])} tokenizer (vocab {mc.vocab_size})")
    say(f"tokens per step: {B_max} micro-batch x {T_max} context x {cfg.grad_accum} accumulation x {world} "
        f"process{'es' if world > 1 else ''} = {B_max * T_max * cfg.grad_accum * world:,}"
        + (" (largest curriculum stage)" if cfg.seq_curriculum else ""))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained < n_params["total"]:
        say(f"trainable: {trained:,} parameters, {trained / n_params['total']:.2%} of the model (LoRA rank "
            f"{cfg.lora_rank} on {cfg.lora_targets}); the rest is frozen")
    if master:
        mem = model.estimate_memory(B_max, T_max, 2 if amp else 4)
        print_memory_estimate(mem, B_max, T_max, amp, model.config, device)


def describe_start(cfg, ckpt, splits, device, amp, use_compile, iter_num, say, master):
    """Where the run runs and what it starts from."""
    train_tokens, train_mask, _ = splits["train"]
    say(f"device: {device}{f' ({torch.cuda.get_device_name(device)})' if device.startswith('cuda') else ''}, "
        f"{'autocast ' + str(amp).removeprefix('torch.') if amp else 'float32'}, compile "
        f"{'on' if use_compile else 'off'}; data: {len(train_tokens):,} train / {len(splits['val'][0]):,} val tokens"
        f"{', loss on the assistant turns only (mask)' if train_mask is not None else ''}")
    if cfg.resume:
        say(f"resuming {os.path.join(cfg.out_dir, 'ckpt.pt')} at iteration {iter_num}")
    elif ckpt is not None:
        say(f"initialized from {cfg.init_from} (trained {ckpt.get('iter_num', '?')} iterations); fresh optimizer")
    elif master and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        say(f"warning: new run in {cfg.out_dir}: its ckpt.pt will be overwritten (--resume continues it instead)")
    if cfg.teacher:
        say(f"distilling {cfg.teacher}: loss = {1 - cfg.distill_coef:g} x data + {cfg.distill_coef:g} x "
            f"T^2 KL(teacher || student), T = {cfg.distill_temperature:g}")


def train_step(train_model, raw_model, next_batch, optimizer, scaler, cfg, ctx, stop, world, teacher=None):
    """One optimizer step over grad_accum micro-batches -> (loss, gradient norm, stop requested, update applied).
    The loss (a NaN anywhere is seen everywhere) and the stop requests are summed over ranks, so that every rank
    skips, and stops, at the same iteration."""
    loss_sum = torch.zeros((), device=raw_model.device)
    for micro_step in range(cfg.grad_accum):
        x, y = next_batch()
        last = micro_step == cfg.grad_accum - 1  # DDP all-reduces the gradients only after the last one
        with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():
            with ctx:
                loss = (distillation_loss(train_model, teacher, x, y, cfg.distill_coef, cfg.distill_temperature)
                        if teacher is not None else train_model(x, y)[1]) / cfg.grad_accum  # [1]: the loss, no logits
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    stats = torch.stack([loss_sum.float(), torch.tensor(float(stop.signum > 0), device=raw_model.device)])
    if world > 1:
        dist.all_reduce(stats)
    grad_norm = clip_gradients(raw_model, optimizer, scaler, cfg.grad_clip)
    loss_total, stop_votes, grad_norm = torch.cat([stats, grad_norm.float().view(1)]).tolist()  # one host sync
    loss = loss_total / world
    return loss, grad_norm, stop_votes > 0, optimizer_step(optimizer, scaler, loss, grad_norm)


def report_losses(iter_num, losses, say, log):
    val_ppl = math.exp(min(losses["val"], 50))
    say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val ppl {val_ppl:.2f}")
    if log:
        log.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], val_ppl=val_ppl)


def note_skipped(nonfinite, iter_num, loss, grad_norm, cfg, say, log):
    """Say and log an update skipped for a non-finite value -> the exit message after max_nonfinite in a row."""
    say(f"iter {iter_num}: non-finite loss ({loss}) or gradient norm ({grad_norm}): update skipped, "
        f"{nonfinite} in a row")
    if log:
        log.write(iter=iter_num, skipped=True, loss=loss, grad_norm=grad_norm)
    if nonfinite >= cfg.max_nonfinite:
        return (f"{nonfinite} non-finite losses or gradients in a row at iteration {iter_num}: stopped; {cfg.out_dir}"
                "/ckpt.pt holds the weights from before them. Lower learning_rate, set grad_clip or use "
                "dtype=bfloat16/float32, then --resume")
    return ""


def log_step(log, bar, iter_num, loss, lr, grad_norm, tokens_per_s, mfu, device):
    mem_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    log.write(iter=iter_num, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=round(tokens_per_s), mfu=mfu,
              peak_mem_gib=mem_gib)
    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.1e} {tokens_per_s / 1e3:.1f}k tok/s" + (f" mfu {mfu:.1%}" if mfu
                        else "") + (f" mem {mem_gib:.1f}G" if mem_gib else ""), refresh=False)


def main(argv):
    """Train with the settings in argv (config files, --key=value); return the trained model."""
    cfg, ckpt = settings(argv)
    device, rank, local_rank, world, amp = setup(cfg)
    device_type, master = device.split(":")[0], rank == 0
    say = tqdm.write if master else (lambda message: None)
    meta, splits = read_data(cfg, say)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args, raw_model, lora = model_for_run(cfg, meta, ckpt, device="meta" if cfg.dry_run else "cpu")
    describe(cfg, meta, raw_model, amp, world, device, master, say)
    if cfg.dry_run:
        return raw_model
    optimizer, scaler = make_optimizer(raw_model.to(device), cfg, device_type, amp, ckpt)
    iter_num, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if cfg.resume else (0, float("inf"))
    use_compile = choose_compile(cfg.compile, device_type, amp)
    describe_start(cfg, ckpt, splits, device, amp, use_compile, iter_num, say, master)
    del ckpt
    ctx = autocast(device_type, amp)
    T, B = stage_at(cfg, iter_num)
    train_tokens, train_mask, train_index = splits["train"]

    def next_batch():  # B random windows of T tokens (the current curriculum stage), on the device
        starts = random_starts(train_tokens, B, T, index=train_index)
        return to_device(get_batch(train_tokens, train_mask, starts, T), device)
    t0 = time.perf_counter()
    model = compile_model(raw_model, next_batch(), ctx) if use_compile else raw_model
    compile_time, use_compile = time.perf_counter() - t0, model is not raw_model
    teacher = load_teacher(cfg.teacher, meta, device, use_compile)  # None without one
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                      gradient_as_bucket_view=True) if world > 1 else model
    add_nan_hook(train_model, iter_num, cfg.grad_accum)

    def save(name):  # "rng" for the record only: every iteration reseeds from (seed, rank, iteration), see the loop
        save_run(os.path.join(cfg.out_dir, name), raw_model, model_args, meta["tokenizer"], vars(cfg), optimizer,
                 scaler, iter_num, lora, best_val_loss=best_val_loss, rng={"cpu": torch.get_rng_state(), "cuda":
                 torch.cuda.get_rng_state_all() if device_type == "cuda" else []})

    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.resume else None,
                     cfg.wandb_log and cfg.wandb_project, cfg.wandb_run_name, vars(cfg)) if master else None
    stop = StopFlag(ddp=world > 1)
    flops = peak_flops(device, amp) if device_type == "cuda" else None  # MFU: GPUs only
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master, unit="it", dynamic_ncols=True)
    start_iter, nonfinite, exit_message = iter_num, 0, ""
    tokens_per_s, tokens_seen, train_time, eval_time = 0.0, 0, 0.0, 0.0

    # ---- the loop: evaluate and checkpoint at the top, then one optimizer step
    while True:
        if not exit_message and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            t0 = time.perf_counter()
            losses = estimate_loss(model, splits, cfg, ctx, device, rank, world)
            eval_time += time.perf_counter() - t0
            report_losses(iter_num, losses, say, log)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if master and iter_num > 0:
                    save("best.pt")
        if exit_message or iter_num >= cfg.max_iters:
            break
        if master and iter_num > start_iter and iter_num % cfg.ckpt_interval == 0:
            save("ckpt.pt")

        # Every random choice in this step (batch windows, dropout) is a function of (seed, rank, iteration):
        # a resumed run, on any number of processes, replays the uninterrupted one exactly.
        torch.manual_seed(cfg.seed + 1_000_003 * iter_num + rank)
        if stage_at(cfg, iter_num) != (T, B):
            T, B = stage_at(cfg, iter_num)
            say(f"iter {iter_num}: curriculum stage: context {T}, micro-batch {B}")
        lr = set_lr(optimizer, get_lr(cfg, iter_num))
        t0 = time.perf_counter()
        loss, grad_norm, stop_requested, applied = train_step(train_model, raw_model, next_batch, optimizer, scaler,
                                                              cfg, ctx, stop, world, teacher)
        nonfinite = 0 if applied else nonfinite + 1
        if not applied:
            exit_message = note_skipped(nonfinite, iter_num, loss, grad_norm, cfg, say, log)
        dt = time.perf_counter() - t0  # the step's .tolist() waited for the GPU
        step_tokens = B * T * cfg.grad_accum * world
        train_time, tokens_seen = train_time + dt, tokens_seen + step_tokens
        # log the step by its index (iteration iter_num took the model from iter_num to iter_num + 1 updates)
        tokens_per_s = step_tokens / dt if iter_num - start_iter < 2 else 0.9 * tokens_per_s + 0.1 * step_tokens / dt
        if master and iter_num % cfg.log_interval == 0:
            mfu = raw_model.estimate_mfu(step_tokens, T, dt, flops * world) if flops else None
            log_step(log, bar, iter_num, loss, lr, grad_norm, tokens_per_s, mfu, device)
        iter_num += 1
        bar.update()
        if stop_requested and not exit_message:
            exit_message = f"interrupted: saved {cfg.out_dir}/ckpt.pt at iteration {iter_num}; --resume continues"

    # ---- the end: a last checkpoint whatever the reason
    if master:
        save("ckpt.pt")
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    exit_if_stopped(stop, exit_message, say)
    if exit_message:
        raise SystemExit(f"train.py: {exit_message}")
    say(f"done: iteration {iter_num}, best val loss {best_val_loss:.4f}, checkpoints {cfg.out_dir}/ckpt.pt (last) "
        f"and best.pt (lowest val loss). Training {train_time:.0f} s ({tokens_seen / max(train_time, 1e-9):,.0f} "
        f"tokens/s), evaluation {eval_time:.0f} s{f', compilation {compile_time:.0f} s' if use_compile else ''}")
    return raw_model


if __name__ == "__main__":
    run_training(main, sys.argv[1:])
