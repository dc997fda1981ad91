"""
What the scripts share, in one flat file, so that no script ever imports another.

    errors      UserError: a mistake the user can fix, in one line; run_main turns it into `name: error: …`
    device      resolve_device, amp_dtype (cpu_auto_dtype: measured), autocast, inference_dtype, peak_flops
    files       save_json, save_checkpoint, load_checkpoint, find_checkpoint, load_tokenizer
    data        load_data (meta.json and the token bins as TokenFiles: read, never mapped), get_batch (windows ->
                inputs and masked targets)
    inference   the shared flags, load_model, make_generator, robust_stdio, read_gsm8k
    replies     generate_reply: the one place an assistant turn is produced (chat.py, eval.py)
    runs        configure_optimizer (AdamW, or Muon + AdamW), set_lr, MetricsLog and StopFlag

Library functions here raise UserError; only a script's main turns it into a message and exit status 1.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from model import Forge, ModelConfig
from tokenizer import TextStream, all_special_ids, get_tokenizer, special_ids, split_thinking
from tasks import final_number

# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad setting), explained in one line."""


def run_main(main, *args):
    """Run a script's main: a UserError ends it with `script.py: error: message` and exit status 1."""
    try:
        return main(*args)
    except UserError as e:
        script = os.path.basename(sys.modules[main.__module__].__file__)
        sys.exit(f"{script}: error: {e}")


# ----------------------------------------------------------------------------- device and precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense bf16/fp16 tensor-core peaks (datasheets), the denominator of MFU; other devices show no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def resolve_device(name="auto"):
    """'auto' -> cuda > mps > cpu; any other name (cpu, cuda, cuda:N, mps) is checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    present = {"cpu": True, "mps": torch.backends.mps.is_available(),
               "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
    if not present.get(device.type, False):
        raise UserError(f"device {name!r} is not available on this machine: use auto or cpu")
    return name


def amp_dtype(device_type, dtype="auto"):
    """The autocast dtype, or None for plain fp32. 'auto': bf16 on GPUs that have it, else fp16 (train
    with a GradScaler); on a CPU bf16 where its matmuls measure faster than fp32's (cpu_auto_dtype), else
    fp32. Never fp16 on a CPU: it is emulated there, orders of magnitude slower than fp32. MPS stays fp32
    unless asked."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        if dtype == "float16" and device_type == "cpu":
            raise UserError("float16 is emulated on CPUs (far slower than fp32): use bfloat16 or float32")
        if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bfloat16: use float16 (or auto)")
        return None if dtype == "float32" else DTYPES[dtype]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu":
        return cpu_auto_dtype()[0]
    return None


_MATMUL_GFLOPS = {}  # thread count -> measured speeds: measured once per process


def cpu_matmul_gflops(n=1024, reps=3):
    """This CPU's matmul speed with the current thread count, {"float32": GFLOP/s, "bfloat16": GFLOP/s}: the
    best of a few n x n products each, after a warm-up (well under a second where bf16 is native). Random
    numbers come from a generator of its own, so measuring never shifts a seeded run."""
    threads = torch.get_num_threads()
    if threads not in _MATMUL_GFLOPS:
        a, b = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0))
        speed = {}
        for name in ("float32", "bfloat16"):
            x, y = a.to(DTYPES[name]), b.to(DTYPES[name])
            seconds = []
            for _ in range(reps + 1):  # the first product pays for allocation and packing: dropped
                t0 = time.perf_counter()
                x @ y
                seconds.append(time.perf_counter() - t0)
            speed[name] = 2 * n ** 3 / min(seconds[1:]) / 1e9
        _MATMUL_GFLOPS[threads] = speed
    return _MATMUL_GFLOPS[threads]


def cpu_auto_dtype():
    """dtype=auto on a CPU -> (bf16, or None for fp32; why, in words): bf16 autocast where this CPU multiplies
    bf16 matrices faster than fp32 ones. Measured rather than read from CPU flags: some CPUs that report
    AVX512-BF16 run bf16 matmuls slower than fp32 (README, Performance)."""
    speed = cpu_matmul_gflops()
    bf16, fp32 = speed["bfloat16"], speed["float32"]
    choice = torch.bfloat16 if bf16 > fp32 else None
    return choice, (f"{'bfloat16' if choice else 'float32'} (bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} "
                    f"on this CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})")


def autocast(device_type, dtype):
    """Mixed-precision context for amp_dtype's choice (a no-op for fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def inference_dtype(device_type, dtype, n_params):
    """The dtype the weights are cast to for generation: cast once rather than autocast every op, since
    half-precision weights halve the bytes read per token. auto: the training autocast dtype, except on a
    CPU for models under 50M parameters, whose decoding is bound by per-op overhead, higher in bf16
    (README, Performance)."""
    if dtype == "auto" and device_type == "cpu" and n_params < 50e6:
        return torch.float32
    return amp_dtype(device_type, dtype) or torch.float32


def peak_flops(device):
    """The GPU's datasheet peak in FLOP/s, or None where it is unknown (CPUs, MPS, unlisted GPUs)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- files
# A checkpoint is a dict: "model" (state dict), "model_args" (ModelConfig fields), "tokenizer" (name),
# "config" (the run's settings), and for resuming: "optimizer", "scaler", "iter_num", "best_val_loss", "rng".
# Everything in it is a tensor or plain Python data, so it loads with weights_only=True.

def save_json(obj, path):
    """Readable JSON written like checkpoints: to a temporary name, then renamed over the old file."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


def save_checkpoint(ckpt, path):
    """torch.save to a temporary name, then rename: a kill at any moment leaves the old file intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode on device, the checkpoint dict)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with `python train.py` or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}): truncated or not a torch file")
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise UserError(f"{path} is not a nanoforge checkpoint (it has no model / model_args)")
    return model_from(ckpt["model_args"], ckpt["model"], path).to(device).eval(), ckpt


def model_from(model_args, state_dict, path):
    """A Forge built from a file's model_args and weights; a mismatch is a one-line UserError."""
    try:
        model = Forge(ModelConfig(**model_args))
        model.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: its weights do not fit its model_args ({str(e).splitlines()[0]})")
    return model


def find_checkpoint(out_dir):
    """The checkpoint a script uses by default: out_dir/best.pt (lowest val loss), else out_dir/ckpt.pt."""
    best = os.path.join(out_dir, "best.pt")
    return best if os.path.isfile(best) else os.path.join(out_dir, "ckpt.pt")


def load_tokenizer(name):
    """tokenizer.get_tokenizer, with its problems (an unknown name, no GPT-2 ranks offline) as UserError."""
    try:
        return get_tokenizer(name)
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------- data

class TokenFile:
    """One of prepare.py's bins (token ids or a loss mask) on disk: its length, and slices, each read with one
    pread into a new array. Never mapped: a memmap kept open for a run keeps every page it touched resident in
    the process (RssFile) until that is the whole corpus; read like this, the process holds one batch, whatever
    the file's size. The page cache still keeps what was read, but that is the kernel's to reclaim."""

    def __init__(self, path, dtype):
        self.dtype = np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)  # closed with the TokenFile (and at exit)
        self.size = os.fstat(self.fd).st_size // self.dtype.itemsize

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a TokenFile reads contiguous slices only, as get_batch does: tokens[s:s + T + 1]")
        start, stop, _ = index.indices(self.size)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, max(stop - start, 0) * size, start * size), self.dtype)


def load_data(data_dir, splits=("train", "val")):
    """meta.json and {split: (tokens, mask or None)}: prepare.py's files as TokenFiles (read on demand)."""
    default_dir = os.path.normpath(data_dir) == os.path.join("data", "reasoning")
    fix = "run `python prepare.py`" if default_dir else f"run `python prepare.py [DATASET ...] --out_dir {data_dir}`"
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"no prepared data in {data_dir} (meta.json is missing): {fix} first")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"{meta_path} is unreadable: {fix} again") from None
    if not isinstance(meta, dict) or not {"tokenizer", "vocab_size"} <= meta.keys():
        raise UserError(f"{meta_path} has no tokenizer / vocab_size: {fix} again")
    bins = {}
    for split in splits:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: {fix} again")
        tokens = TokenFile(path, np.uint16)
        mask_path = os.path.join(data_dir, f"{split}_mask.bin")
        mask = TokenFile(mask_path, np.uint8) if os.path.isfile(mask_path) else None
        if mask is not None and len(mask) != len(tokens):
            raise UserError(f"{mask_path} has {len(mask)} entries for {len(tokens)} tokens: {fix} again")
        bins[split] = (tokens, mask)
    return meta, bins


def get_batch(tokens, mask, starts, block_size):
    """Windows of block_size tokens at starts -> (x, y), int64 (B, T) on the CPU. y is x shifted by one token,
    and -1 (ignored by the loss) where the mask is 0: mask[i] says whether token i is one to learn. Training
    draws random starts (random_starts); the val loss reads consecutive windows."""
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts])  # tokens: a TokenFile or an array
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))
    y = torch.from_numpy(windows[:, 1:].astype(np.int64))
    if mask is not None:
        learn = np.stack([mask[s + 1:s + block_size + 1] for s in starts])
        y[torch.from_numpy(learn == 0)] = -1
    return x, y


def random_starts(tokens, batch_size, block_size, generator=None):
    """batch_size random window starts in tokens, from torch's RNG (or generator)."""
    return torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned host memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


# ----------------------------------------------------------------------------- loading a model for inference

def add_model_args(parser):
    """Flags that pick the checkpoint and where it runs."""
    parser.add_argument("--ckpt", help="checkpoint file (default: OUT_DIR/best.pt, else OUT_DIR/ckpt.pt)")
    parser.add_argument("--out_dir", default="out", help="train.py's output directory (default: out)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="precision of the weights; auto: see inference_dtype in common.py")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text")


def add_sampling_args(parser, max_new_tokens, temperature):
    """Flags for model.generate; the defaults differ per script (eval.py decodes greedily)."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling: only the smallest set of tokens holding p of the probability")


def sampling_kwargs(args):
    """The generate() keyword arguments from the flags, checked (argparse cannot check ranges)."""
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top_k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top_p must be in (0, 1]")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def checkpoint_path(args):
    """--ckpt, else the best checkpoint of --out_dir, else its latest."""
    return args.ckpt or find_checkpoint(args.out_dir)


def load_model(args):
    """The checkpoint of --ckpt/--out_dir on --device, ready for generation -> (model, enc, ckpt): the model
    in eval mode in its inference dtype, ckpt the checkpoint's dict without the weights (config, iter_num)."""
    path = checkpoint_path(args)
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(path, device)
    enc = load_tokenizer(ckpt.get("tokenizer", "byte"))
    if model.config.vocab_size < enc.n_vocab:
        raise UserError(f"{path} has a {model.config.vocab_size}-token vocabulary, smaller than its tokenizer "
                        f"{enc.name!r} ({enc.n_vocab}): the checkpoint is corrupt")
    model.to(inference_dtype(torch.device(device).type, args.dtype, model.num_params()["total"]))
    if args.compile:
        # Compile the forward, not the module: generate() calls self(...) on the eager module. dynamic=True
        # because the prompt length and the KV cache position change every call.
        model.forward = torch.compile(model.forward, dynamic=True)
    for heavy in ("model", "optimizer", "scaler"):
        ckpt.pop(heavy, None)
    return model, enc, ckpt


def make_generator(model, seed):
    """A seeded RNG on the model's device, so that a seed reproduces the same tokens."""
    return torch.Generator(device=model.rope_cos.device).manual_seed(seed)


def robust_stdio():
    """Never crash on text: undecodable input bytes and unprintable output characters become U+FFFD / '?'."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def read_gsm8k(path, limit=None):
    """(task, messages, answer) items from a GSM8K-style jsonl: {"question", "answer"}, the answer ending in
    "#### N" (openai/gsm8k) or just holding the number."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            question, answer = rec["question"], rec["answer"].split("####")[-1]
            if not isinstance(question, str) or final_number(answer) is None:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path}:{lineno} is not a GSM8K record: expected JSON with a question and an "
                            "answer ending in '#### N'") from None
        items.append(("gsm8k", [{"role": "user", "content": question}], answer.strip()))
        if limit and len(items) == limit:
            break
    if not items:
        raise UserError(f"{path} holds no GSM8K records")
    return items


# ----------------------------------------------------------------------------- replies

# The special tokens that may occur inside an assistant reply; any other one (<|/assistant|>, <|eos|>, or
# the model starting a turn of its own such as <|user|>) ends the reply and is never shown.
REPLY_TOKENS = ("<|think|>", "<|/think|>", "<|no_think|>", "<|assistant|>")


def reply_stop_ids(enc):
    return all_special_ids(enc) - {special_ids(enc)[t] for t in REPLY_TOKENS}


@dataclass
class Reply:
    part: str = "answer"        # where the newest text belongs: "thinking" or "answer"
    ids: list = field(default_factory=list)  # generated token ids, the stop token included
    thinking_tokens: int = 0    # ordinary tokens inside the think block
    seconds: float = 0.0
    finish: str = "length"      # "stop" (end of turn), "length" (max_new_tokens or full context), "interrupted"
    thinking: "str | None" = None  # the think block's text, None when the model answered without one
    answer: str = ""


def generate_reply(model, enc, prompt, sampling, generator=None, on_text=None, interruptible=False,
                   should_stop=None):
    """Generate the assistant's turn for prompt (from render_prompt). on_text(reply, text) is called as
    printable text arrives, with reply.part telling whether it is thinking or answer. With interruptible,
    Ctrl-C ends the reply early (finish="interrupted") instead of propagating. should_stop(reply), asked
    after every token, ends the reply when it returns a finish reason (serve.py: a stop string, a client
    that left, the request's time limit)."""
    sp = special_ids(enc)
    stop_ids = reply_stop_ids(enc)
    forced = forced_reply_start(prompt, enc)
    reply = Reply(part="thinking" if forced[-1:] == [sp["<|think|>"]] else "answer")
    stream = TextStream(enc)
    t0 = time.perf_counter()
    try:
        for token_id in model.generate(prompt, **sampling, stop_ids=stop_ids, generator=generator):
            reply.ids.append(token_id)
            if token_id in stop_ids:
                reply.finish = "stop"
                break
            text = stream(token_id)  # a special token flushes a half-decoded character of its part
            if token_id == sp["<|think|>"]:
                reply.part = "thinking"
            elif token_id == sp["<|/think|>"]:
                reply.part = "answer"
            elif reply.part == "thinking" and token_id not in stream.special:
                reply.thinking_tokens += 1  # counted as it streams: chat.py shows it when the thinking ends
            if text and on_text:
                on_text(reply, text)
            if should_stop and (finish := should_stop(reply)):
                reply.finish = finish
                break
    except KeyboardInterrupt:
        if not interruptible:
            raise
        reply.finish = "interrupted"
    if (text := stream.flush()) and on_text:  # the reply ended inside a character
        on_text(reply, text)
    reply.seconds = time.perf_counter() - t0
    return read_reply(reply, forced, enc, stop_ids)


def read_reply(reply, forced, enc, stop_ids):
    """Fill in reply's thinking, answer and thinking_tokens from its ids and what the prompt forced."""
    sp, special = special_ids(enc), all_special_ids(enc)
    ended = reply.ids[-1:] and reply.ids[-1] in stop_ids  # not when should_stop ended it on a text token
    ids = forced + (reply.ids[:-1] if ended else reply.ids)  # the stop token may be a <|/user|>
    thinking, reply.answer = split_thinking(ids, enc)
    reply.thinking = thinking if sp["<|think|>"] in ids else None
    reply.thinking_tokens, inside = 0, False  # the count generate_reply keeps as it streams, from the ids
    for t in ids:
        inside = t == sp["<|think|>"] or (inside and t != sp["<|/think|>"])
        reply.thinking_tokens += inside and t not in special
    return reply


def forced_reply_start(prompt, enc):
    """What the prompt already says about the reply: <|think|> (reasoning on), <|no_think|><|assistant|> (off)
    or nothing (the model chooses): the ids after its last <|/user|>. They are part of the reply."""
    user_end = len(prompt) - 1 - prompt[::-1].index(special_ids(enc)["<|/user|>"])
    return list(prompt[user_end + 1:])


def generate_replies(model, enc, prompts, sampling, generator=None, batch_size=64):
    """Replies to many prompts (from render_prompt) at once: prompts of equal length share a batch of
    model.generate_batch, up to batch_size rows. Greedy replies equal generate_reply's; a reply's seconds
    are its batch's time shared by its rows. For evaluation, where nothing streams."""
    stop_ids = reply_stop_ids(enc)
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    replies = [None] * len(prompts)
    for same_length in by_length.values():
        for k in range(0, len(same_length), batch_size):
            rows = same_length[k:k + batch_size]
            t0 = time.perf_counter()
            ids = model.generate_batch([prompts[i] for i in rows], **sampling, stop_ids=stop_ids, generator=generator)
            seconds = (time.perf_counter() - t0) / len(rows)
            for i, reply_ids in zip(rows, ids):
                finish = "stop" if reply_ids[-1:] and reply_ids[-1] in stop_ids else "length"
                reply = Reply(ids=reply_ids, seconds=seconds, finish=finish)
                replies[i] = read_reply(reply, forced_reply_start(prompts[i], enc), enc, stop_ids)
    return replies


# ----------------------------------------------------------------------------- training runs

def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, optimizer="adamw", muon_lr=0.0):
    """model.configure_optimizers' AdamW; with optimizer="muon", Muon at muon_lr (0: learning_rate) for the
    matrices inside the blocks (attention and MLP projections) and that AdamW for the rest: the embedding (tied:
    also the output layer), a factorized embedding's projection, the norm gains."""
    if optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer={optimizer!r}: expected adamw or muon")
    if optimizer == "adamw":
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type)
    matrices = [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]
    adamw = model.configure_optimizers(weight_decay, learning_rate, betas, device_type, {id(p) for p in matrices})
    # Muon orthogonalizes each update (singular values near 1): its RMS is 1/sqrt(max(rows, cols)), whatever
    # the gradient's scale. "match_rms_adamw" multiplies it by 0.2 * sqrt(max(rows, cols)), an update RMS of
    # 0.2 * lr for every shape, that of a typical AdamW step; and the decoupled weight decay multiplies the
    # unadjusted lr as AdamW's does. So learning_rate and weight_decay tuned for AdamW carry over (Moonshot,
    # "Muon is Scalable for LLM Training"), which is why muon_lr defaults to learning_rate. torch's default,
    # Keller Jordan's "original" sqrt(max(1, rows/cols)), gives an RMS of lr / sqrt(fan_in): it would need a
    # learning rate 0.2 * sqrt(fan_in) times larger (3x at n_embd=256), and that would multiply the decay too.
    muon = torch.optim.Muon(matrices, lr=muon_lr or learning_rate, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw, muon_lr / learning_rate if muon_lr else 1.0)


class MuonAdamW:
    """Two optimizers stepped as one (configure_optimizer's optimizer="muon"). torch.amp.GradScaler takes it as one
    optimizer: unscale_ walks its param_groups and step() runs only when no gradient of either overflowed, so an
    fp16 overflow skips both together. The checkpoint holds both states. muon_scale is Muon's peak learning rate
    over AdamW's, for set_lr; kept here rather than in the param groups, which load_state_dict would overwrite with
    a checkpoint's (a resumed run's muon_lr is the one it is given)."""

    def __init__(self, muon, adamw, muon_scale):
        self.muon, self.adamw, self.muon_scale = muon, adamw, muon_scale

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces each optimizer's group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_lr(optimizer, lr):
    """Set the learning rate of an optimizer from configure_optimizer: lr for AdamW, lr scaled to Muon's own peak
    for its matrices (the same schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * optimizer.muon_scale


class MetricsLog:
    """One JSON object per line in out_dir/metrics.jsonl (and to wandb when a run is given)."""

    def __init__(self, path, resume_iter=None, wandb_run=None):
        self.path, self.wandb = path, wandb_run
        kept = []
        if resume_iter is not None and os.path.isfile(path):  # drop what an interrupted run logged past its ckpt
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


def start_wandb(project, run_name, config):
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb") from None
    return wandb.init(project=project, name=run_name or None, config=config)


class StopFlag:
    """Set by Ctrl-C (SIGINT) or SIGTERM; a training loop checks it between iterations, saves and exits, so
    no checkpoint ever holds a half-applied optimizer step. A second Ctrl-C quits at once (single process
    only: torchrun passes every signal on to its workers, who get the terminal's too)."""

    def __init__(self, ddp=False):
        self.signum, self.ddp = 0, ddp
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signum and not self.ddp:
            raise KeyboardInterrupt
        self.signum = signum
