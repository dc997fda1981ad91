"""
Train a Forge model: one readable loop, from a 2-core laptop to many GPUs.

    python prepare.py && python train.py                 # the embedded demo: ~8 minutes on a 2-core CPU
    python train.py config/nano_3050ti.py --batch_size=1  # a preset, then command-line overrides
    python train.py --resume                             # continue out_dir/ckpt.pt exactly where it stopped
    python train.py config/sft_chat.py --init_from=out-nano/best.pt   # fine-tune: weights only
    torchrun --standalone --nproc_per_node=8 train.py config/h100_ddp.py  # DDP, one process per GPU

Settings are the module-level defaults below, overridden in order by config files (plain Python
assignments) and --key=value arguments (a Python literal of the default's type; text for text
settings; a bare --flag means True). The effective config is printed and stored in every checkpoint.

Test hook: NANOFORGE_NAN_ITERS="3,4" turns the loss into NaN at those iterations, to exercise the
non-finite guard (skip the update; stop after max_nonfinite in a row).
"""
import ast
import builtins
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import CheckpointError, Forge, ModelConfig, amp_dtype, autocast, load_checkpoint, resolve_device, save_checkpoint

# ----------------------------------------------------------------------------- defaults
# The embedded demo: a 3M-parameter model on the built-in reasoning data (`python prepare.py`),
# tuned to finish in about 8 minutes on a 2-core CPU with bf16 (85% vs 35% with and without thinking).
# I/O
out_dir = "out"
data_dir = "data/reasoning"
init_from = ""           # a checkpoint path: start from its weights with a fresh optimizer (fine-tuning)
resume = False           # continue out_dir/ckpt.pt: same iteration, learning rate and data order
eval_interval = 250      # evaluate train/val loss every this many iterations (and at the end)
eval_iters = 20          # batches per split per evaluation
ckpt_interval = 250      # save out_dir/ckpt.pt every this many iterations (and on exit)
log_interval = 10        # progress bar and metrics.jsonl every this many iterations
dry_run = False          # print the config, model size and memory estimate, then exit
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
grad_checkpoint = False  # recompute activations in backward: much less memory, ~30% more compute
# optimization: tokens per step = batch_size * block_size * grad_accum * world size
batch_size = 16
grad_accum = 1
max_iters = 2000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
lr_decay_iters = 0       # cosine decay to min_lr over this many iterations; 0: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0          # 0: no clipping
seq_curriculum = []      # [(from_iter, block_size, batch_size), ...]: shorter windows first (Yxanul)
max_nonfinite = 5        # stop after this many non-finite losses / gradients in a row
# system
device = "auto"          # auto | cpu | cuda | mps (torchrun: the local GPU)
dtype = "auto"           # auto | float32 | bfloat16 | float16 (auto: bf16 where fast, fp16 on older GPUs)
compile = "auto"         # auto | True | False (auto: on for CUDA and for CPUs with native bf16)
seed = 1337

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))}
ARCHITECTURE = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "emb_rank")
NAN_ITERS_ENV = "NANOFORGE_NAN_ITERS"

# Dense bf16/fp16 tensor-core peaks (datasheets), the denominator of MFU; other devices show no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


class ConfigError(Exception):
    """A bad setting, explained in one line."""


# ----------------------------------------------------------------------------- configuration

def parse_args(argv):
    """Config files and --key=value arguments, in order -> {key: value}, each checked against DEFAULTS."""
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            overrides[key] = check_value(key, parse_value(key, text) if has_value else True)
        else:
            overrides.update(read_config_file(arg))
    return overrides


def parse_value(key, text):
    """Text settings take the text as it is; everything else is a Python literal."""
    if isinstance(DEFAULTS.get(key), str) and key != "compile":
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # not a literal: check_value reports the type mismatch


def read_config_file(path):
    """A config file is Python: its top-level assignments (names without a leading _) are overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (arguments are config files or --key=value)")
    namespace = {}
    try:
        exec(builtins.compile(open(path).read(), path, "exec"), namespace)  # `compile` is a setting here
    except Exception as e:
        line = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        raise ConfigError(f"{path}{line}: {type(e).__name__}: {e}")
    return {k: check_value(k, v, path) for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}


def check_value(key, value, where="command line"):
    """The value if key is a setting and value has its default's type (an int is fine for a float)."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else "see the defaults at the top of train.py"
        raise ConfigError(f"unknown setting {key!r} ({where}): {hint}")
    default = DEFAULTS[key]
    if key == "compile":
        ok = isinstance(value, bool) or value == "auto"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, (list, tuple))
        value = [tuple(stage) if isinstance(stage, (list, tuple)) else stage for stage in value] if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        want = "auto, True or False" if key == "compile" else f"{type(default).__name__} (like {default!r})"
        raise ConfigError(f"{key}={value!r} ({where}): expected {want}")
    return value


def check_config(cfg):
    """Relations between settings that no single type check catches."""
    for key in ("batch_size", "grad_accum", "block_size", "eval_interval", "eval_iters", "ckpt_interval",
                "log_interval", "n_layer", "n_head", "n_kv_head", "n_embd", "max_nonfinite"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"device={cfg.device!r}: choose auto, cpu, cuda or mps")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r}: choose auto, float32, bfloat16 or float16")
    stages = cfg.seq_curriculum
    if any(not isinstance(s, tuple) or len(s) != 3 or not all(isinstance(v, int) for v in s) for s in stages):
        raise ConfigError(f"seq_curriculum={stages!r}: expected a list of (from_iter, block_size, batch_size)")
    if [s[0] for s in stages] != sorted(s[0] for s in stages):
        raise ConfigError("seq_curriculum stages must be in order of their from_iter")
    if any(s[1] > cfg.block_size or s[1] < 1 or s[2] < 1 for s in stages):
        raise ConfigError(f"seq_curriculum block sizes must be within 1..block_size={cfg.block_size}")


def stage_at(cfg, it):
    """(block_size, batch_size) for iteration it: the last curriculum stage started, else the config's."""
    T, B = cfg.block_size, cfg.batch_size
    for start, stage_T, stage_B in cfg.seq_curriculum:
        if it >= start:
            T, B = stage_T, stage_B
    return T, B


def get_lr(cfg, it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- data

def load_data(data_dir, need_bins=True):
    """meta.json and {split: (tokens, mask or None)} as read-only memmaps of prepare.py's files."""
    fix = "run `python prepare.py`" if os.path.normpath(data_dir) == os.path.normpath(DEFAULTS["data_dir"]) \
        else f"run `python prepare.py [DATASET ...] --out {data_dir}`"
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"no prepared data in {data_dir} (meta.json is missing): {fix} first")
    with open(meta_path) as f:
        meta = json.load(f)
    if not {"tokenizer", "vocab_size"} <= meta.keys():
        raise ConfigError(f"{meta_path} has no tokenizer / vocab_size: {fix} again")
    splits = {}
    for split in ("train", "val") if need_bins else ():
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing: {fix} again")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        mask_path = os.path.join(data_dir, f"{split}_mask.bin")
        mask = np.memmap(mask_path, dtype=np.uint8, mode="r") if os.path.isfile(mask_path) else None
        if mask is not None and len(mask) != len(tokens):
            raise ConfigError(f"{mask_path} has {len(mask)} entries for {len(tokens)} tokens: {fix} again")
        splits[split] = (tokens, mask)
    return meta, splits


def get_batch(tokens, mask, batch_size, block_size, generator=None):
    """batch_size random windows -> (x, y), int64 (B, T) on the CPU. y is x shifted by one token, and -1
    (ignored by the loss) where the mask is 0: mask[i] says whether token i is one to learn."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    window = starts[:, None] + np.arange(block_size + 1)  # one fancy-index gather, no Python loop
    x = torch.from_numpy(tokens[window[:, :-1]].astype(np.int64))
    y = torch.from_numpy(tokens[window[:, 1:]].astype(np.int64))
    if mask is not None:
        y[torch.from_numpy(mask[window[:, 1:]] == 0)] = -1
    return x, y


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned host memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


# ----------------------------------------------------------------------------- device, precision, memory

def setup_device(cfg):
    """(device, rank, local_rank, world_size) for this process; torchrun's variables mean DDP."""
    ddp = "RANK" in os.environ
    try:
        name = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"device={cfg.device}: {e}") from None
    if not ddp:
        return name, 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if name == "cuda":
        name = f"cuda:{local_rank}"
        torch.cuda.set_device(name)
    dist.init_process_group(backend="nccl" if name.startswith("cuda") else "gloo")
    return name, rank, local_rank, world


def choose_dtype(cfg, device_type):
    try:
        return amp_dtype(device_type, cfg.dtype)
    except ValueError as e:
        raise ConfigError(f"dtype={cfg.dtype}: {e}") from None


def choose_compile(cfg, device_type, ptdtype):
    """compile=auto: on where it measured faster. CUDA: always. CPU (2 cores, the default model): compiled
    bf16 steps ran 1.10x faster than eager (17.9k vs 16.3k tokens/s), fp32 only 1.04x, and a cold compile
    costs ~16-18 s plus ~5 s for the evaluation graph. MPS: off (Inductor's Metal backend is experimental)."""
    if cfg.compile == "auto":
        return device_type == "cuda" or (device_type == "cpu" and ptdtype == torch.bfloat16)
    return cfg.compile


def compile_model(raw_model, batch, ctx):
    """torch.compile, tried on one forward and backward pass: where it cannot work here (no C++ compiler,
    no Triton, an unsupported platform) warn and train eagerly instead."""
    compiled = torch.compile(raw_model, dynamic=False)  # static shapes: recompiles once per curriculum stage
    try:
        with ctx:
            loss = compiled(*batch)[1]
        loss.backward()
        return compiled
    except Exception as e:  # the toolchain's errors are many and long; eager mode has none of them
        print(f"warning: torch.compile failed here ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
              "training without it (pass --compile=False to skip the attempt)")
        return raw_model
    finally:
        raw_model.zero_grad(set_to_none=True)


def activation_bytes(mc, act_bytes):
    """(saved, transient) activation bytes per token of a training step: what autograd keeps from the forward
    pass for backward, and what backward allocates on top at its peak (the loss gradient over the vocabulary
    and, with checkpointing, the block being recomputed). act_bytes is 2 under autocast, 4 in fp32. Measured
    on model.py with saved-tensor hooks; tests/test_train.py checks `saved` against them."""
    d, f, h, kv, V, s = mc.n_embd, mc.ffn_hidden, mc.n_head, mc.n_kv_head * mc.head_dim, mc.vocab_size, act_bytes
    # per block: q/k/v/out/MLP tensors in the activation dtype, fp32 copies around the two RMSNorms (none in
    # fp32, where .float() is a no-op), and a few per-row statistics (softmax log-sum-exp per head, rms)
    block = s * (7 * d + 4 * f + 2 * kv) + (16 if s == 2 else 4) * d + 4 * h + 8
    # embedding and final norm, and the loss's fp32 log-softmax over the vocabulary
    ends = (8 + s) * d + 12 + 4 * V
    saved = ends + mc.n_layer * (4 * d if mc.grad_checkpoint else block)  # checkpointing: each block's fp32 input
    transient = 8 * V + (block if mc.grad_checkpoint else 0)  # two fp32 gradients of the log-softmax
    return saved, transient


def estimate_memory(mc, n_params, batch_size, block_size, act_bytes):
    """Peak bytes per device of a training step: fp32 weights, gradients and AdamW's two moments, autocast's
    half-precision weight copies, and the activations of batch_size x block_size tokens."""
    saved, transient = activation_bytes(mc, act_bytes)
    return {"weights": 4 * n_params, "grads": 4 * n_params, "optimizer": 8 * n_params,
            "weight copies": n_params * act_bytes if act_bytes < 4 else 0,
            "activations": batch_size * block_size * (saved + transient)}


def print_memory_estimate(mem, batch_size, block_size, ptdtype, mc, device):
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    total = sum(mem.values())
    parts = " + ".join(f"{k} {gib(v)}" for k, v in mem.items() if v)
    print(f"memory estimate per device: {parts} = {gib(total)} GiB "
          f"(micro-batch {batch_size} x {block_size} tokens, {str(ptdtype or torch.float32).removeprefix('torch.')}, "
          f"grad_checkpoint={mc.grad_checkpoint})")
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        if total > free:
            print(f"warning: the estimate exceeds this GPU's free memory ({gib(free)} GiB): lower batch_size "
                  "(raise grad_accum to keep tokens per step), block_size, or set grad_checkpoint=True")


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- checkpoints and logs

def build_model(cfg, meta, ckpt, device="cpu"):
    """(model args, model): fresh, or with a checkpoint's weights. A checkpoint's architecture wins; the
    context length, dropout and activation checkpointing are this run's. device="meta" builds the shapes
    only (dry_run: no memory, no time)."""
    runtime = dict(vocab_size=meta["vocab_size"], block_size=cfg.block_size, dropout=cfg.dropout,
                   grad_checkpoint=cfg.grad_checkpoint)
    if ckpt is None:
        args = {k: getattr(cfg, k) for k in ARCHITECTURE} | runtime
    else:
        if ckpt.get("tokenizer") != meta["tokenizer"] or ckpt["model_args"]["vocab_size"] != meta["vocab_size"]:
            raise ConfigError(f"the checkpoint was trained with the {ckpt.get('tokenizer')} tokenizer (vocab "
                              f"{ckpt['model_args']['vocab_size']}) but {cfg.data_dir} holds {meta['tokenizer']} tokens "
                              f"(vocab {meta['vocab_size']}): prepare the data with --tokenizer {ckpt.get('tokenizer')}")
        args = ckpt["model_args"] | runtime
    try:
        with torch.device(device):
            model = Forge(ModelConfig(**args))
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise ConfigError(str(e)) from None
    if ckpt is not None and device != "meta":
        model.load_state_dict(ckpt["model"])
    return args, model


class MetricsLog:
    """One JSON object per line in out_dir/metrics.jsonl (and to wandb when enabled)."""

    def __init__(self, path, resume_iter, wandb_run):
        self.path, self.wandb = path, wandb_run
        kept = []
        if resume_iter is not None and os.path.isfile(path):  # drop what the interrupted run logged past its checkpoint
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["iter"] < resume_iter]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, **record):
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])


def start_wandb(cfg):
    if not cfg.wandb_log:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb") from None
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=vars(cfg))


class StopFlag:
    """Set by Ctrl-C (SIGINT) or SIGTERM; the loop checks it between iterations, saves ckpt.pt and exits,
    so no checkpoint ever holds a half-applied optimizer step. A second Ctrl-C quits at once (single
    process only: torchrun passes every signal on to its workers, who get the terminal's too)."""

    def __init__(self, ddp):
        self.signum, self.ddp = 0, ddp
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signum and not self.ddp:
            raise KeyboardInterrupt
        self.signum = signum


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx, device, rank, world):
    """Mean loss per split over eval_iters batches of every rank. The windows are the same at every
    evaluation, so successive losses differ only because the model did."""
    model.eval()
    losses = {}
    for split, (tokens, mask) in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed + rank)
        total = torch.zeros((), device=device)
        for _ in range(cfg.eval_iters):
            x, y = to_device(get_batch(tokens, mask, cfg.batch_size, cfg.block_size, generator), device)
            with ctx:
                total += model(x, y)[1].float()
        if world > 1:
            dist.all_reduce(total)
        losses[split] = total.item() / (cfg.eval_iters * world)
    model.train()
    return losses


def main(argv):
    """Train with the settings in argv (config files, --key=value); return the trained model."""
    # ---- settings: defaults < (a resumed run's stored config) < config files and --key=value
    overrides = parse_args(argv)
    config = DEFAULTS | overrides
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt") if config["resume"] else config["init_from"]
    ckpt = None
    if ckpt_path:
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"nothing to resume: {ckpt_path} does not exist (drop --resume to start a new run)"
                              if config["resume"] else f"init_from={ckpt_path}: no checkpoint there (train one first)")
        _, ckpt = load_checkpoint(ckpt_path)  # validated and on the CPU; build_model rebuilds the model for this run
        if config["resume"]:
            if "optimizer" not in ckpt:
                raise ConfigError(f"{ckpt_path} has no optimizer state: use --init_from={ckpt_path} instead")
            config = DEFAULTS | {k: v for k, v in ckpt["config"].items() if k in DEFAULTS} | overrides
    cfg = SimpleNamespace(**config)
    check_config(cfg)

    # ---- device and precision
    if cfg.dry_run:
        device, rank, local_rank, world = "cpu", 0, 0, 1
        ptdtype = {"float32": None, "float16": torch.float16}.get(cfg.dtype, torch.bfloat16)  # what a GPU would use
    else:
        device, rank, local_rank, world = setup_device(cfg)
        ptdtype = choose_dtype(cfg, device.split(":")[0])
    device_type, master = device.split(":")[0], rank == 0
    say = tqdm.write if master else (lambda message: None)

    # ---- data and model
    if cfg.dry_run and not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        say(f"dry run: {cfg.data_dir} is not prepared yet; assuming the GPT-2 tokenizer's vocabulary (50304)")
        meta, splits = {"tokenizer": "gpt2", "vocab_size": 50304}, {}
    else:
        meta, splits = load_data(cfg.data_dir, need_bins=not cfg.dry_run)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args, raw_model = build_model(cfg, meta, ckpt, device="meta" if cfg.dry_run else "cpu")
    config |= {k: model_args[k] for k in ARCHITECTURE}  # the stored config tells the truth about the architecture
    mc, n_params = raw_model.config, raw_model.num_params()
    stages = [stage_at(cfg, it) for it in [0] + [s[0] for s in cfg.seq_curriculum]]
    T_max, B_max = max(stages, key=lambda tb: tb[0] * tb[1])  # the largest micro-batch sets peak memory
    say(textwrap.fill(" ".join(f"{k}={v!r}" for k, v in config.items()), 110, initial_indent="config: ",
                      subsequent_indent="    ", break_on_hyphens=False))
    say(f"model: {n_params['total'] / 1e6:.2f}M parameters ({n_params['embedding'] / 1e6:.2f}M embedding), "
        f"{mc.n_layer} layers, d={mc.n_embd}, heads {mc.n_head}/{mc.n_kv_head}, ffn {mc.ffn_hidden}, "
        f"context {mc.block_size}, {meta['tokenizer']} tokenizer (vocab {mc.vocab_size})")
    say(f"tokens per step: {B_max} micro-batch x {T_max} context x {cfg.grad_accum} accumulation x {world} "
        f"process{'es' if world > 1 else ''} = {B_max * T_max * cfg.grad_accum * world:,}"
        + (" (largest curriculum stage)" if cfg.seq_curriculum else ""))
    mem = estimate_memory(mc, n_params["total"], B_max, T_max, 2 if ptdtype else 4)
    if master:
        print_memory_estimate(mem, B_max, T_max, ptdtype, mc, device)
    if cfg.dry_run:
        return raw_model

    use_compile = choose_compile(cfg, device_type, ptdtype)
    train_tokens, train_mask = splits["train"]
    for split, (tokens, _) in splits.items():
        if len(tokens) <= max(cfg.block_size, T_max):
            raise ConfigError(f"{split}.bin holds {len(tokens)} tokens, too few for block_size={cfg.block_size}: "
                              "lower block_size or prepare more data")
    say(f"device: {device}{f' ({torch.cuda.get_device_name(device)})' if device_type == 'cuda' else ''}, "
        f"{'autocast ' + str(ptdtype).removeprefix('torch.') if ptdtype else 'float32'}, compile "
        f"{'on' if use_compile else 'off'}; data: {len(train_tokens):,} train / {len(splits['val'][0]):,} val tokens"
        f"{', loss on the assistant turns only (mask)' if train_mask is not None else ''}")

    # ---- optimizer, and the state of a resumed run
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)  # fp16 only: bf16 needs no scaling
    iter_num, best_val_loss = 0, float("inf")
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        say(f"resuming {ckpt_path} at iteration {iter_num}")
    elif ckpt is not None:
        say(f"initialized from {ckpt_path} (trained {ckpt.get('iter_num', '?')} iterations); fresh optimizer")
    elif master and os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        say(f"warning: new run in {cfg.out_dir}: its ckpt.pt will be overwritten (--resume continues it instead)")
    del ckpt

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(device_type, ptdtype)
    T, B = stage_at(cfg, iter_num)
    t0 = time.perf_counter()
    model = compile_model(raw_model, to_device(get_batch(train_tokens, train_mask, B, T), device), ctx) \
        if use_compile else raw_model
    compile_time, use_compile = time.perf_counter() - t0, model is not raw_model
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                      gradient_as_bucket_view=True) if world > 1 else model
    nan_iters = {int(i) for i in os.environ.get(NAN_ITERS_ENV, "").split(",") if i.strip()}

    def save(name):
        save_checkpoint({"model": raw_model.state_dict(), "model_args": model_args, "tokenizer": meta["tokenizer"],
                         "config": config, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "iter_num": iter_num, "best_val_loss": best_val_loss,
                         # for the record only: every iteration reseeds from (seed, rank, iteration), see the loop
                         "rng": {"cpu": torch.get_rng_state(),
                                 "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []}},
                        os.path.join(cfg.out_dir, name))

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.resume else None, start_wandb(cfg))
    stop = StopFlag(ddp=world > 1)
    flops = peak_flops(device)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master, unit="it", dynamic_ncols=True)
    start_iter, nonfinite, exit_message = iter_num, 0, ""
    tokens_per_s, tokens_seen, train_time, eval_time = 0.0, 0, 0.0, 0.0

    # ---- the loop: evaluate and checkpoint at the top, then one optimizer step
    while True:
        if not exit_message and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            t0 = time.perf_counter()
            losses = estimate_loss(model, splits, cfg, ctx, device, rank, world)
            eval_time += time.perf_counter() - t0
            say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                f"val ppl {math.exp(min(losses['val'], 50)):.2f}")
            if master:
                log.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"],
                          val_ppl=math.exp(min(losses["val"], 50)))
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
        lr = get_lr(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(cfg.grad_accum):
            x, y = to_device(get_batch(train_tokens, train_mask, B, T), device)
            last = micro_step == cfg.grad_accum - 1  # DDP all-reduces the gradients only after the last one
            with contextlib.nullcontext() if world == 1 or last else train_model.no_sync():
                with ctx:
                    loss = train_model(x, y)[1] / cfg.grad_accum  # [1]: drop the logits before backward
                if iter_num in nan_iters:
                    loss = loss * float("nan")
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # Summed over ranks: the loss (a NaN anywhere is seen everywhere) and the stop requests, so that
        # every rank skips, and stops, at the same iteration.
        stats = torch.stack([loss_sum.float(), torch.tensor(float(stop.signum > 0), device=device)])
        if world > 1:
            dist.all_reduce(stats)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        loss_total, stop_votes, grad_norm = torch.cat([stats, grad_norm.float().view(1)]).tolist()  # one host sync
        loss_val, stop_requested = loss_total / world, stop_votes > 0
        # An fp16 overflow is the GradScaler's business (it skips the step and lowers its scale); any other
        # non-finite loss or gradient is skipped here, and too many in a row end the run.
        if math.isfinite(loss_val) and (math.isfinite(grad_norm) or scaler.is_enabled()):
            scaler.step(optimizer)
            nonfinite = 0
        else:
            nonfinite += 1
            say(f"iter {iter_num}: non-finite loss ({loss_val}) or gradient norm ({grad_norm}): update skipped, "
                f"{nonfinite} in a row")
            if master:
                log.write(iter=iter_num, skipped=True, loss=loss_val, grad_norm=grad_norm)
            if nonfinite >= cfg.max_nonfinite:
                exit_message = (f"{nonfinite} non-finite losses or gradients in a row at iteration {iter_num}: "
                                f"stopped; {cfg.out_dir}/ckpt.pt holds the weights from before them. Lower "
                                "learning_rate, set grad_clip or use dtype=bfloat16/float32, then --resume")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0  # .item() above waited for the GPU
        step_tokens = B * T * cfg.grad_accum * world
        train_time, tokens_seen = train_time + dt, tokens_seen + step_tokens
        # log the step by its index (iteration iter_num took the model from iter_num to iter_num + 1 updates)
        tokens_per_s = step_tokens / dt if iter_num - start_iter < 2 else 0.9 * tokens_per_s + 0.1 * step_tokens / dt
        if master and iter_num % cfg.log_interval == 0:
            mfu = raw_model.estimate_mfu(step_tokens, T, dt, flops * world) if flops else None
            mem_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
            log.write(iter=iter_num, loss=loss_val, lr=lr, grad_norm=grad_norm, tokens_per_s=round(tokens_per_s),
                      mfu=mfu, peak_mem_gib=mem_gib)
            bar.set_postfix_str(f"loss {loss_val:.4f} lr {lr:.1e} {tokens_per_s / 1e3:.1f}k tok/s"
                                + (f" mfu {mfu:.1%}" if mfu else "") + (f" mem {mem_gib:.1f}G" if mem_gib else ""),
                                refresh=False)
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
    if stop.signum:
        say(exit_message)
        sys.exit(128 + stop.signum)
    if exit_message:
        raise SystemExit(f"train.py: {exit_message}")
    say(f"done: iteration {iter_num}, best val loss {best_val_loss:.4f}, checkpoints {cfg.out_dir}/ckpt.pt (last) "
        f"and best.pt (lowest val loss). Training {train_time:.0f} s ({tokens_seen / max(train_time, 1e-9):,.0f} "
        f"tokens/s), evaluation {eval_time:.0f} s{f', compilation {compile_time:.0f} s' if use_compile else ''}")
    return raw_model


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError) as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted twice: stopped without saving (the last ckpt.pt is intact)")
