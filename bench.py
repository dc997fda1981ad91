"""
Benchmarks: nanoforge's speed against a peer, side by side in one process, and its scripts as a user runs them.

    python bench.py                                  # every section at this machine's sizes
    python bench.py --quick                          # small sizes, few repeats
    python bench.py --sections train,generate --device cuda --dtype bfloat16 --compile --json bench.json
    python bench.py --gpu_check [--json FILE]        # does this GPU train and decode as expected: a few minutes

Sections:
  peak      the device's measured matmul rate per dtype: the ceiling that MFU is a fraction of
  train     a training step (forward + backward + AdamW) in tokens/s and MFU: model.py against
            transformers' LlamaForCausalLM loaded from `export.py --format hf` of the same weights (checked:
            same logits), with the same batch, dtype, SDPA attention, optimizer and compile setting
  generate  batch 1, greedy: prefill and decode tokens/s at prompt + output lengths of 256/512/1024:
            model.py with its KV cache, model.py recomputing the whole sequence every step (what nanoGPT's
            sample.py does), LlamaForCausalLM.generate with its cache, and (where llama_cpp is importable)
            llama.cpp on `export.py --format gguf` of the same weights, at f32, q8_0 and q4_0, each in a child
            process (one that crashes is left out, with a warning)
  data      data.get_batch (train.py's batches) from the token files against the batches a training step
            consumes, and `python prepare.py FILE` on a generated text of 20 MB, at the rate it reports
  memory    (CUDA) `python train.py config/PRESET.py` for two iterations at each micro-batch shape of each
            GPU preset, on random tokens: the peak memory it logs, against the preset's target card

Sizes: "tiny" is train.py's default CPU model (4 layers, d=256, byte vocabulary); "nano" is Forge-1 Nano
(12 layers, d=768, GQA 12/4, GPT-2 vocabulary), at its full context on a GPU and a reduced one on a CPU.
Timing: every contender is warmed up, then the contenders take turns (so background load hits them
alike) and the median is reported. Ratios are ours / peer: above 1 means nanoforge is faster.
bench.py imports no other script: it runs export.py, prepare.py and train.py in subprocesses.

--gpu_check (CUDA only) runs checks instead of the sections, a table each, a row a check: torch.compile against
eager, bf16 and fp16 (+ GradScaler) training steps, each config/ preset's memory estimate against its measured
peak, Forge-1 Nano's training MFU, decoding tokens/s with the KV cache. A failed row fails the command (exit 1).
"""
import argparse
import ast
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch

import configurator
from checkpoints import build_model, save_checkpoint
from common import UserError, run_main, save_json
from data import TokenFile, get_batch, random_starts
from device import DTYPES, amp_dtype, autocast, inference_dtype, peak_flops, resolve_device
from isolate import Child, ChildCrashed
from model import Forge, ModelConfig
from tokenizer import GPT2_RANKS_ENV
from training import clip_gradients, configure_optimizer, make_optimizer, optimizer_step, stage_at

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("peak", "train", "generate", "data", "memory")
TITLES = {"data": "data (prepare.py: the tokens/s it reports, interpreter start-up excluded)"}
GPU_PRESETS = {"nano_3050ti": 4, "mini_t4": 15, "yxanul_4090": 24}  # config file -> its target card's GiB
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context and kernels take on a card besides the allocator's memory
MODELS = {
    "tiny": ModelConfig(vocab_size=320, block_size=1024, n_layer=4, n_head=4, n_kv_head=2, n_embd=256),
    "nano": ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                        ffn_hidden=2048),
}


@dataclass
class Plan:
    train: list          # [(size name, batch size, context)]
    generate: list       # size names
    lengths: list        # generation: prompt + output lengths
    new_tokens: int      # generation: tokens generated per run (the recomputing path: an eighth)
    reps: int            # timed repeats of a training step
    gen_reps: int        # timed repeats of a generation run
    data_mb: int         # megabytes of text to tokenize
    file_tokens: int     # tokens in the train.bin get_batch reads


def make_plan(args):
    """Sizes, lengths and repeat counts for this device and mode; the flags override them."""
    if args.quick:
        plan = Plan([("tiny", 4, 128), ("nano", 1, 64)], ["tiny"], [128, 256], 16, 3, 1, 20, 2_000_000)
    elif args.device == "cuda":
        plan = Plan([("tiny", 16, 256), ("nano", 8, 1024)], ["tiny", "nano"], [256, 512, 1024], 64, 10, 3, 20,
                    20_000_000)
    else:  # a CPU: the Nano shape with a reduced context and batch
        plan = Plan([("tiny", 16, 256), ("nano", 2, 256)], ["tiny", "nano"], [256, 512, 1024], 64, 7, 3, 20,
                    20_000_000)
    plan.train = [(name, args.batch_size or b, args.block_size or t) for name, b, t in plan.train if name in args.sizes]
    plan.generate = [name for name in plan.generate if name in args.sizes]
    for flag in ("lengths", "new_tokens", "reps", "data_mb"):
        if getattr(args, flag):
            setattr(plan, flag, getattr(args, flag))
    plan.gen_reps = args.reps or plan.gen_reps
    if min(plan.lengths) <= plan.new_tokens:
        raise UserError(f"every generation length must exceed --new_tokens ({plan.new_tokens})")
    return plan


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def race(contenders, reps, warmup, device):
    """{name: median seconds of fn()} for contenders {name: fn}: each runs `warmup` times, then they take
    turns, in alternating order so that neither always runs first."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for rep in range(reps):
        for name in list(contenders)[::1 if rep % 2 == 0 else -1]:
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def fast_dtypes(device):
    """The dtypes this device computes natively (fp16 on a CPU is emulated, bf16 needs AVX512-BF16 or AMX)."""
    if device == "cuda":
        return ["float32", "bfloat16", "float16"] if torch.cuda.is_bf16_supported() else ["float32", "float16"]
    return ["float32", "bfloat16"] if device == "cpu" and amp_dtype("cpu") == torch.bfloat16 else ["float32"]


# ----------------------------------------------------------------------------- scripts, as a user runs them

def run_script(script, *args):
    """Run a script of this repo as a user does -> its stdout; a failure is a UserError with its last line."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or "no message").splitlines()[-1]
        raise UserError(f"`python {script} {' '.join(map(str, args))}` failed: {last}")
    return proc.stdout


# ----------------------------------------------------------------------------- the peer

def llama_peer(ours):
    """transformers' LlamaForCausalLM loaded from `export.py --format hf` of our weights, SDPA attention."""
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        raise UserError("the peer needs transformers: pip install -r requirements-dev.txt") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # its bar for loading weights
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt.pt")
        save_checkpoint({"model": ours.state_dict(), "model_args": asdict(ours.config), "tokenizer": "byte"}, ckpt)
        run_script("export.py", "--format", "hf", "--ckpt", ckpt, "--out_dir", tmp)
        peer = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), attn_implementation="sdpa",
                                                dtype=torch.float32)
    peer.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ours does
    peer.generation_config.pad_token_id = 0
    return peer.train()  # in the mode of a fresh model, as ours is


def load_llama_cpp(path, f32_cache, **kwargs):
    """llama_cpp.Llama(path, **kwargs), made in its child process (see llama_cpp_contenders)."""
    import llama_cpp
    kv_type = llama_cpp.GGML_TYPE_F32 if f32_cache else None  # None: llama.cpp's default, float16
    return llama_cpp.Llama(path, type_k=kv_type, type_v=kv_type, **kwargs)


def llama_cpp_contenders(ours, lengths):
    """{name: a Child holding a llama_cpp.Llama} on `export.py --format gguf` of our weights, at float32 (with a
    float32 KV cache: the same maths as ours) and at q8_0 and q4_0 (llama.cpp's default float16 KV cache: what its
    users run); {} when llama-cpp-python is not installed. Same threads as torch; flash attention off, its default for
    llama-cpp-python. Each runs in a child process, so that a native crash leaves that contender out, not the run."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt.pt")
        save_checkpoint({"model": ours.state_dict(), "model_args": asdict(ours.config), "tokenizer": "byte"}, ckpt)
        for dtype in ("float32", "q8_0", "q4_0"):
            name = f"llama.cpp {dtype.replace('float', 'f')}"
            run_script("export.py", "--format", "gguf", "--dtype", dtype, "--ckpt", ckpt, "--out_dir", tmp)
            try:  # the whole file is read at load: the temporary folder can go
                models[name] = Child(load_llama_cpp, os.path.join(tmp, "model.gguf"), f32_cache=dtype == "float32",
                                     n_ctx=max(lengths), n_threads=torch.get_num_threads(),
                                     n_threads_batch=torch.get_num_threads(), use_mmap=False, verbose=False)
            except ChildCrashed as e:
                llama_cpp_crashed(name, e)
    return models


def llama_cpp_crashed(name, crash):
    print(f"warning: {name} left out: {crash} (llama.cpp's AMX path segfaults on some Intel CPUs, see "
          f"docs/export.md)")


def build_pair(cfg, device):
    """(ours, peer) with identical weights, checked to compute the same logits."""
    torch.manual_seed(0)
    ours = Forge(cfg)
    peer = llama_peer(ours).to(device)
    ours.to(device)
    idx = torch.randint(0, cfg.vocab_size, (1, 16), device=device)
    with torch.no_grad():  # the last position's logits, and the loss over every position (Llama shifts its labels)
        diff = max((ours(idx)[0] - peer(idx).logits[:, -1:]).abs().max().item(),
                   abs(ours(idx[:, :-1], idx[:, 1:])[1] - peer(input_ids=idx, labels=idx).loss).item())
    if diff > 1e-3:
        raise UserError(f"the peer's logits differ from ours by {diff:.2g}: the two configs do not match")
    return ours, peer


# ----------------------------------------------------------------------------- peak and train

def bench_peak(args, plan):
    return [{"dtype": name, "TFLOP/s": peak_flops(args.device, DTYPES[name]) / 1e12}
            for name in fast_dtypes(args.device)]


def train_step(model, optimizer, x, y, ctx, peer):
    with ctx:
        loss = model(input_ids=x, labels=x).loss if peer else model(x, y)[1]  # Llama shifts its labels itself
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train(args, plan):
    rows = []
    peak = peak_flops(args.device, args.amp)
    for size, batch_size, context in plan.train:
        cfg = replace(MODELS[size], block_size=context)
        ours, peer = build_pair(cfg, args.device)
        batch = torch.randint(0, cfg.vocab_size, (batch_size, context + 1), device=args.device)
        x, y = batch[:, :-1], batch[:, 1:]
        steps = {}
        for name, model in (("ours", ours), ("peer", peer)):
            # the same AdamW for both, built by the same code: decay on matrices, the fused kernel
            opt = configure_optimizer(model, 0.1, 3e-4, (0.9, 0.95), args.device)
            model = torch.compile(model) if args.compile else model
            steps[name] = (lambda m=model, o=opt, p=name == "peer":
                           train_step(m, o, x, y, autocast(args.device, args.amp), p))
        seconds = race(steps, plan.reps, warmup=3 if args.compile else 2, device=args.device)
        tokens = batch_size * context
        flops = ours.flops_per_token(context) * tokens
        for name in ("ours", "peer"):
            rows.append({"size": size, "params (M)": ours.num_params()["total"] / 1e6,
                         "batch x context": f"{batch_size}x{context}", "model": name,
                         "ms/step": seconds[name] * 1e3, "tokens/s": tokens / seconds[name],
                         "MFU %": 100 * flops / seconds[name] / peak,
                         "ours/peer": seconds["peer"] / seconds["ours"] if name == "ours" else None})
        del ours, peer, steps
    return rows


# ----------------------------------------------------------------------------- generate
# Each contender returns the generated ids and the clock at the start and after every token: the first
# token ends the prefill, the rest are decode steps.

def run_cached(model, prompt, n):
    """Forge.generate: the prompt fills the KV cache once, then every step feeds one token."""
    ids, clock = [], [time.perf_counter()]
    for step in model.generate([prompt], n, temperature=0):
        ids.append(step[0])
        clock.append(time.perf_counter())
    return ids, clock


def run_recomputed(model, prompt, n):
    """nanoGPT's sample.py: every step runs the whole sequence again, no cache."""
    idx = torch.tensor([prompt], device=model.device)
    ids, clock = [], [time.perf_counter()]
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx)
            ids.append(int(logits[0, -1].argmax()))
            idx = torch.cat([idx, idx.new_tensor([[ids[-1]]])], dim=1)
            clock.append(time.perf_counter())
    return ids, clock


class Clock:
    """A generate() streamer that notes the time of every new token (its first put is the prompt)."""

    def __init__(self):
        self.ids, self.clock, self.prompt_seen = [], [time.perf_counter()], False

    def put(self, value):
        if self.prompt_seen:
            self.ids.append(int(value.reshape(-1)[0]))
            self.clock.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def run_peer(peer, prompt, n):
    """LlamaForCausalLM.generate, greedy, with its default (dynamic) KV cache."""
    idx = torch.tensor([prompt], device=peer.device)
    clock = Clock()
    with torch.no_grad():
        peer.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False, streamer=clock)
    return clock.ids, clock.clock


def run_llama_cpp(llm, prompt, n):
    """llama.cpp, greedy, driven at the C API (one llama_decode per token, argmax of its logits) so that
    little Python runs between steps: the engine's own speed. It runs in the child process that holds llm, the
    clock too (see run_in_child)."""
    import llama_cpp
    ids, clock = [], [time.perf_counter()]
    llm.reset()
    llm.eval(prompt)
    for i in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        ids.append(int(logits.argmax()))
        clock.append(time.perf_counter())
        if i < n - 1:
            llm.eval(ids[-1:])
    return ids, clock


def run_in_child(child, prompt, n):
    """run_llama_cpp in child -> (ids, clock), or None once llama.cpp has crashed there (bench_generate then
    leaves that contender out)."""
    try:
        return child.call(run_llama_cpp, prompt, n)
    except ChildCrashed:
        return None


def bench_generate(args, plan):
    rows = []
    for size in plan.generate:
        cfg = replace(MODELS[size], block_size=max(MODELS[size].block_size, *plan.lengths))
        ours, peer = build_pair(cfg, args.device)
        # both in the dtype's weights, as sample.py runs (casting once beats autocasting every op)
        ours.eval().to(args.amp or torch.float32), peer.eval().to(args.amp or torch.float32)
        n = plan.new_tokens
        contenders = {"ours, KV cache": (run_cached, ours, n),
                      "ours, recompute": (run_recomputed, ours, max(2, n // 8)),  # a step costs a prefill
                      "peer generate": (run_peer, peer, n)}
        if args.device == "cpu" and args.dtype == "float32":  # llama.cpp's CPU build, with its own dtypes
            for name, child in llama_cpp_contenders(ours, plan.lengths).items():
                contenders[name] = (run_in_child, child, n)
        for length in plan.lengths:
            tokens = torch.randint(cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
            runs = {name: [] for name in contenders}

            def runner(name):  # every contender ends at `length` tokens
                fn, model, steps = contenders[name]
                return lambda: runs[name].append(fn(model, tokens[:length - steps], steps))
            race({name: runner(name) for name in contenders}, plan.gen_reps, 1, args.device)
            for name in [name for name in contenders if None in runs[name]]:  # llama.cpp crashed in its child
                llama_cpp_crashed(name, contenders.pop(name)[1].crash)
            decode = {}
            for name, (_, _, steps) in contenders.items():
                timed = runs[name][1:]  # the first run was the warm-up
                decode[name] = statistics.median((steps - 1) / (c[-1] - c[1]) for _, c in timed)
                rows.append({"size": size, "length": length, "model": name, "new tokens": steps,
                             "prefill tok/s": statistics.median((length - steps) / (c[1] - c[0]) for _, c in timed),
                             "decode tok/s": decode[name]})
            for row in rows[-len(contenders):]:
                row["decode vs peer"] = row["decode tok/s"] / decode["peer generate"]
                row["decode vs recompute"] = row["decode tok/s"] / decode["ours, recompute"]
            # same prompt, same weights, greedy: the same tokens, unless two logits nearly tie
            rows[-len(contenders)]["same ids as peer"] = runs["ours, KV cache"][0][0] == runs["peer generate"][0][0]
            for i, name in enumerate(contenders):
                if name.startswith("llama.cpp"):  # the anchor: ours against the best CPU engine
                    rows[-len(contenders)][f"ours / {name}"] = decode["ours, KV cache"] / decode[name]
                    rows[-len(contenders) + i]["same ids as ours"] = runs[name][0][0] == runs["ours, KV cache"][0][0]
        for _, model, _ in contenders.values():
            if isinstance(model, Child):
                model.close()
        del ours, peer
    return rows


# ----------------------------------------------------------------------------- data

def write_token_files(folder, n_tokens, vocab_size):
    """A train.bin of random tokens and its uint8 loss mask, as prepare.py writes them, opened as load_data does."""
    rng = np.random.default_rng(0)
    paths = os.path.join(folder, "train.bin"), os.path.join(folder, "train_mask.bin")
    rng.integers(0, vocab_size, n_tokens, dtype=np.uint16).tofile(paths[0])
    (rng.random(n_tokens) < 0.5).astype(np.uint8).tofile(paths[1])
    return TokenFile(paths[0], np.uint16), TokenFile(paths[1], np.uint8)


def write_text(path, megabytes, seed=0):
    """English-like text: sentences of common words and numbers, paragraphs (documents) between blank lines."""
    words = ("the of and to in is was that for it with as he on be at by this had not are but from or have an "
             "they which one you were her all she there would their we him been has when who will more no if out "
             "so said what up its about into than them can only other new some could time these two may then do "
             "first any my now such like our over man me even most made after also did many before must through "
             "years where much your way well down should because each just those people how too little state "
             "good very make world still own see men work long get here between both life being under never day "
             "same another know while last might us great old year off come since against go came right used take "
             "three 1 2 3 7 12 42 100 2024 reasoning think answer step therefore").split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        while f.tell() < megabytes * 1e6:
            sentences = (" ".join(rng.choices(words, k=rng.randint(5, 20))).capitalize() + rng.choice(".?!")
                         for _ in range(rng.randint(2, 8)))
            f.write(" ".join(sentences) + "\n\n")
    return os.path.getsize(path)


def tokenize_with_prepare(path, tokenizer, out_dir):
    """`python prepare.py PATH` (read, encode in threads, split, write .bin) -> the tokens/s it reports, which
    leave out the interpreter's start-up and imports."""
    stdout = run_script("prepare.py", path, "--tokenizer", tokenizer, "--out_dir", out_dir)
    rates = re.findall(r"([\d,]+) tokens/s", stdout)
    if not rates:
        raise UserError(f"prepare.py reported no tokens/s: {stdout.strip()[-200:]!r}")
    return float(rates[-1].replace(",", ""))


def bench_data(args, plan, train_rows):
    rows = []
    steps_per_s = {r["size"]: 1e3 / r["ms/step"] for r in train_rows if r["model"] == "ours"}
    with tempfile.TemporaryDirectory() as tmp:
        tokens, mask = write_token_files(tmp, plan.file_tokens, 50304)
        for size, batch_size, context in plan.train or [("nano", 8, 1024)]:
            calls, gen = 50, torch.Generator().manual_seed(0)

            def batches():
                for _ in range(calls):
                    get_batch(tokens, mask, random_starts(tokens, batch_size, context, gen), context)
            rate = calls / race({"get_batch": batches}, plan.reps, 1, "cpu")["get_batch"]
            rows.append({"what": f"data.get_batch, batch {batch_size}x{context}", "per second": rate,
                         "unit": "batches",
                         "vs training step": rate / steps_per_s[size] if size in steps_per_s else None})
        text = os.path.join(tmp, "text.txt")
        nbytes = write_text(text, plan.data_mb)
        # gpt2 only with local ranks: tiktoken's download would fail offline
        for name in ["byte"] + (["gpt2"] if os.environ.get(GPT2_RANKS_ENV) else []):
            rows.append({"what": f"prepare.py, {name} tokenizer, {nbytes / 1e6:.0f} MB of text",
                         "per second": tokenize_with_prepare(text, name, os.path.join(tmp, name)), "unit": "tokens",
                         "vs training step": None})
    return rows


# ----------------------------------------------------------------------------- memory

def write_random_data(folder, n_tokens=1_000_000, doc_tokens=1024):
    """A data folder train.py can train on: documents of doc_tokens random GPT-2 tokens, each after a <|bos|>, in
    prepare.py's files (with the index of where each starts), no loss mask."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    starts = np.arange(0, n_tokens, doc_tokens, dtype=np.uint64)
    for split in ("train", "val"):
        tokens = rng.integers(0, 50257, n_tokens, dtype=np.uint16)
        tokens[starts.astype(np.int64)] = 50257  # <|bos|>
        tokens.tofile(os.path.join(folder, f"{split}.bin"))
        starts.tofile(os.path.join(folder, f"{split}_index.bin"))
    sizes = {"tokens": n_tokens, "documents": len(starts)}
    save_json({"tokenizer": "gpt2", "vocab_size": 50304, "n_vocab": 50257, "dtype": "uint16", "mask": False,
               "train": sizes, "val": sizes, "sources": {"bench.py": "random tokens"}},
              os.path.join(folder, "meta.json"))


def preset_memory(path, device):
    """`python train.py PATH` as a user runs it (its dtype, activation checkpointing and compile setting)
    on random GPT-2 tokens, two iterations at each micro-batch shape it trains at (its curriculum stages
    too, one run each): the second iteration has AdamW's moments alive during forward and backward, the
    steady state. One micro-batch per step (grad_accum=1): accumulation adds no memory. -> ([(batch size,
    context, the peak allocated GiB train.py logs, None off CUDA)], the run's settings, autocast dtype)"""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "out")
        write_random_data(data)

        def run(*overrides):  # -> (peak GiB or None, the settings train.py stored in its checkpoint)
            run_script("train.py", path, f"--data_dir={data}", f"--out_dir={out}", f"--device={device}",
                       "--max_iters=2", "--eval_iters=1", "--log_interval=1", "--grad_accum=1", *overrides)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                peaks = [r["peak_mem_gib"] for r in map(json.loads, f) if r.get("peak_mem_gib") is not None]
            ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", mmap=True, weights_only=True)
            return max(peaks, default=None), ckpt["config"]

        peak, config = run()  # the settings tell the other shapes: each runs as a one-stage curriculum
        settings = SimpleNamespace(**config)
        peaks = {stage_at(settings, 0): peak}
        for context, batch_size in {stage_at(settings, s[0]) for s in config["seq_curriculum"]} - peaks.keys():
            peaks[context, batch_size] = run(f"--seq_curriculum=[(0, {context}, {batch_size})]")[0]
    return [(b, t, peaks[t, b]) for t, b in sorted(peaks)], config, amp_dtype(device, config["dtype"])


def bench_memory(args, plan):
    if args.device != "cuda":
        return {"skipped": f"CUDA only (device is {args.device})"}
    rows = []
    torch.cuda.empty_cache()  # give the runs back what the other sections left in this process's cache
    for preset, card_gib in GPU_PRESETS.items():
        path = os.path.join(ROOT, "config", f"{preset}.py")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: the memory section measures the GPU presets in config/")
        shapes, config, ptdtype = preset_memory(path, "cuda")
        for batch_size, context, allocated in shapes:
            rows.append({"preset": preset, "batch x context": f"{batch_size}x{context}",
                         "dtype": str(ptdtype or torch.float32).removeprefix("torch."),
                         "grad_checkpoint": config["grad_checkpoint"], "peak allocated GiB": allocated,
                         "card GiB": card_gib, "fits": allocated + CUDA_CONTEXT_GIB < card_gib})
    return rows


# ----------------------------------------------------------------------------- GPU check
# `python bench.py --gpu_check`: does this GPU train and decode as the presets expect, in one command of a few
# minutes (docs/performance.md, GPU check). Every check is a row: one that fails (an exception, out of memory, a
# mismatch) says so in its row and the others still run. gpu_check(device, smoke=True) runs the same code at toy
# sizes on any device: the tests' CPU run.

# Dense fp16/bf16 tensor-core TFLOP/s (fp32 accumulation, no sparsity) from NVIDIA's datasheets, by the name torch
# reports, matched whole: a substring would mistake one card for another ("L4" in "L40", "H100" in "H100 NVL").
GPU_PEAKS = {"NVIDIA H200": 989, "NVIDIA H200 NVL": 835, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756,
             "NVIDIA H100 NVL": 835, r"NVIDIA A100[- ].*": 312, "NVIDIA GeForce RTX 4090": 165, "Tesla T4": 65,
             "NVIDIA GeForce RTX 3050 Ti Laptop GPU": 17.4}
# (The 3050 Ti has no datasheet figure: 80 tensor cores x 128 FLOP a clock, the RTX 3080 whitepaper's rate for
# Ampere's GeForce cards, x its top boost clock, 1,695 MHz; a laptop's power limit often holds it lower.)
CHECK_TITLES = {"compile": "torch.compile against eager: train.py's default run, 3 steps from the same weights",
                "precision": "half precision: 5 steps, the first loss against fp32's on the same weights and batch",
                "memory": "memory: train.py's dry-run estimate against the peak allocated over 2 optimizer steps",
                "mfu": "training MFU: Forge-1 Nano, compiled as train.py compiles it",
                "decode": "decoding: batch 1, greedy, model.generate with its KV cache"}


def train_settings():
    """(train.py's settings with their defaults, the settings that shape its model): its module-level assignments of
    plain values, read from its source as configurator.defaults_of takes them from its namespace (bench.py imports
    no script; the tests check the result against train.DEFAULTS)."""
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    literals = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):  # computed from names (DEFAULTS, CHOICES): not settings
                literals[node.targets[0].id] = ast.literal_eval(node.value)
    return configurator.defaults_of(literals), literals["ARCHITECTURE"]


def check_plan(smoke):
    """What the GPU check runs: train.py's settings (its default run, the presets), Nano, the compiler backend and the
    repeats. smoke: the same code with every model one tiny layer, compiled by dynamo's "eager" backend (graph
    capture without Inductor's code generation): seconds on a CPU."""
    defaults, architecture = train_settings()
    toy = dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=0, emb_rank=0, block_size=32)
    return SimpleNamespace(
        defaults=defaults, architecture=architecture, backend="eager" if smoke else "inductor",
        shrink=toy | dict(batch_size=2, seq_curriculum=[], dry_run_vocab=320) if smoke else {},
        nano=ModelConfig(vocab_size=320, **toy) if smoke else MODELS["nano"], nano_batch=2 if smoke else 8,
        reps=1 if smoke else 10, prompt=8 if smoke else 64, new_tokens=8 if smoke else 128)


def check_settings(plan, **overrides):
    """train.py's settings with overrides (a preset's), shrunk in a smoke run."""
    return SimpleNamespace(**plan.defaults | overrides | plan.shrink)


def default_run(plan):
    """train.py's default run: its settings, over the vocabulary of its default data (byte-tokenized)."""
    return check_settings(plan, dry_run_vocab=MODELS["tiny"].vocab_size)


def preset_settings(path, plan):
    """A config file's settings as train.py reads them (configurator: its defaults, then the file), or why train.py
    does not train it from scratch (another script's settings; a fine-tuning's model is its checkpoint's)."""
    try:
        overrides = configurator.read_config_file(path, plan.defaults)
    except UserError as e:
        return f"not a train.py config: {str(e).replace(ROOT + os.sep, '')}"
    if overrides.get("init_from"):
        return f"fine-tunes init_from={overrides['init_from']}: its preset's row measures that model"
    return check_settings(plan, **overrides)


def check_amp(device, dtype):
    """The autocast dtype train.py takes for a dtype setting on this GPU. Off CUDA (a smoke run) the dtype the
    setting names, so that fp16 presets take the GradScaler's path there too, and fp32 for auto: a CPU may emulate
    bf16, a thousand times slower."""
    if device == "cuda":
        return amp_dtype("cuda", dtype)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)


def dtype_name(amp):
    return str(amp or torch.float32).removeprefix("torch.")


def preset_model(plan, cfg, device):
    """The model train.py builds from scratch for settings cfg (model_for_run), over the dry run's vocabulary,
    seeded: the same weights every time. device "meta": shapes only."""
    args = {k: getattr(cfg, k) for k in plan.architecture} | dict(
        vocab_size=cfg.dry_run_vocab, block_size=cfg.block_size, dropout=cfg.dropout,
        grad_checkpoint=cfg.grad_checkpoint)
    torch.manual_seed(cfg.seed)
    return build_model(args, device=device)


def random_batch(vocab_size, batch_size, context, device):
    """(batch_size, context + 1) random token ids: inputs and their next tokens."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch_size, context + 1), generator=generator).to(device)


def trainer(raw, cfg, amp, batch, train_model=None):
    """train.py's optimizer step on one micro-batch (cfg's optimizer, autocast, GradScaler, clipping, the
    non-finite guard) as a function of no arguments -> (loss, update applied); and the GradScaler. train_model:
    raw compiled, where the step runs compiled."""
    device_type = raw.device.type
    optimizer, scaler = make_optimizer(raw, cfg, device_type, amp, None)
    x, y = batch[:, :-1], batch[:, 1:]

    def step():
        with autocast(device_type, amp):
            loss = (raw if train_model is None else train_model)(x, y)[1]
        scaler.scale(loss).backward()
        grad_norm = clip_gradients(raw, optimizer, scaler, cfg.grad_clip)
        loss, grad_norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one host sync
        return loss, optimizer_step(optimizer, scaler, loss, grad_norm)
    return step, scaler


def free_memory(device):
    """Give back to the GPU what the last check left (its tensors, compiled graphs, the allocator's cache) and
    restart the peak count."""
    if device == "cuda":
        gc.collect()
        torch.compiler.reset()  # compiled graphs may hold their model's tensors
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_check(row, device, fn, *args):
    """row, updated with fn(*args)'s results or with why it failed: a check's failure is its row's, not the run's (a
    preset too big for this card, no compiler here). Out of memory where the estimate that fn put in the row first
    exceeds the free memory is this card's size, not a failure. Memory is freed before and after."""
    free_memory(device)
    free = torch.cuda.mem_get_info(device)[0] / 2**30 if device == "cuda" else math.inf
    try:
        row.update(fn(*args))
    except torch.OutOfMemoryError:
        too_big = row.get("estimate GiB", 0) > free
        row.update(ok=None if too_big else False, note=f"out of memory, {free:.1f} GiB free"
                   + (": too big for this card, as estimated" if too_big else ""))
    except Exception as e:  # the toolchain's errors are many (Triton, a C++ compiler, a driver): the row says which
        row.update(ok=False, note=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
    free_memory(device)  # here, where the exception and its frames holding the tensors are gone
    return row


def compare_compiled(plan, device, amp):
    """train.py's default run (its model, Muon, micro-batch) eagerly and compiled as train.py compiles (static
    shapes), three steps each on one batch from the same weights: the losses must agree."""
    cfg = default_run(plan)
    batch = random_batch(cfg.dry_run_vocab, cfg.batch_size, cfg.block_size, device)
    losses, first = {}, {}
    for name in ("eager", "compiled"):
        raw = preset_model(plan, cfg, device)
        step, _ = trainer(raw, cfg, amp, batch, torch.compile(raw, dynamic=False, backend=plan.backend)
                          if name == "compiled" else None)
        sync(device)
        t0 = time.perf_counter()
        losses[name] = [step()[0]]
        first[name] = time.perf_counter() - t0  # compiled: the compilation
        losses[name] += [step()[0] for _ in range(2)]
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    return {"micro-batch": f"{cfg.batch_size}x{cfg.block_size}", "dtype": dtype_name(amp), "backend": plan.backend,
            "first step s, eager": first["eager"], "first step s, compiled": first["compiled"],
            "last loss, eager": losses["eager"][-1], "last loss, compiled": losses["compiled"][-1],
            "max loss difference": diff,
            # half precision: fused kernels round differently; a miscompiled step is off by far more
            "ok": diff <= 1e-2 * losses["eager"][0]}


def precision_steps(plan, cfg, amp, device, row):
    """Five of train.py's steps in autocast dtype amp: finite losses, the first one within 1% of fp32's on the same
    weights and batch, and at least one update applied (a GradScaler skips those that overflow fp16)."""
    row["estimate GiB"] = preset_estimate(plan, cfg, amp)[2] / 2**30
    model = preset_model(plan, cfg, device)
    batch = random_batch(cfg.dry_run_vocab, cfg.batch_size, cfg.block_size, device)
    with torch.no_grad():
        reference = model(batch[:, :-1], batch[:, 1:])[1].item()
    step, scaler = trainer(model, cfg, amp, batch)
    losses, applied = zip(*(step() for _ in range(5)))
    return {"params (M)": model.num_params()["total"] / 1e6, "micro-batch": f"{cfg.batch_size}x{cfg.block_size}",
            "fp32 first loss": reference, "first loss": losses[0], "last loss": losses[-1],
            "updates applied": sum(applied), "grad scale": scaler.get_scale() if scaler.is_enabled() else None,
            "ok": all(map(math.isfinite, losses)) and abs(losses[0] - reference) <= 1e-2 * reference and any(applied)}


def check_precision(plan, device):
    """bf16 autocast on train.py's default run (where the GPU has bf16), and fp16 with a GradScaler as
    config/mini_t4.py trains (its model, micro-batch and settings)."""
    rows = []
    mini = preset_settings(os.path.join(ROOT, "config", "mini_t4.py"), plan)
    default = default_run(plan)
    for what, cfg, amp in (("bf16 autocast, train.py's default", default, torch.bfloat16),
                           ("fp16 + GradScaler, mini_t4", mini, torch.float16)):
        row = {"check": what}
        if isinstance(cfg, str):
            row.update(ok=False, note=cfg)
        elif device == "cuda" and amp == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            row.update(note="skipped: this GPU has no bfloat16")
        else:
            run_check(row, device, precision_steps, plan, cfg, amp, device, row)
        rows.append(row)
    return rows


def preset_estimate(plan, cfg, amp):
    """((batch, context) of cfg's largest micro-batch over its curriculum, parameters, train.py's dry-run estimate
    there in bytes), as train.py's describe() computes it, on a model of shapes only."""
    T, B = max((stage_at(cfg, it) for it in [0] + [s[0] for s in cfg.seq_curriculum]), key=lambda tb: tb[0] * tb[1])
    shapes = preset_model(plan, cfg, "meta")
    return (B, T), shapes.num_params()["total"], sum(shapes.estimate_memory(B, T, 2 if amp else 4).values())


def measure_preset(plan, cfg, device, row):
    """row += the estimate (preset_estimate); then two of train.py's optimizer steps at that micro-batch, eager (what
    the estimate models): the second runs with AdamW's moments alive, the steady state -> the peak allocated above
    what was allocated before (None off CUDA)."""
    amp = check_amp(device, cfg.dtype)
    (B, T), params, estimate = preset_estimate(plan, cfg, amp)
    row |= {"params (M)": params / 1e6, "micro-batch": f"{B}x{T}", "dtype": dtype_name(amp),
            "grad_checkpoint": cfg.grad_checkpoint, "estimate GiB": estimate / 2**30}
    base = torch.cuda.memory_allocated(device) if device == "cuda" else 0
    step, _ = trainer(preset_model(plan, cfg, device), cfg, amp, random_batch(cfg.dry_run_vocab, B, T, device))
    losses = [step()[0] for _ in range(2)]
    if device != "cuda":
        return {"measured GiB": None, "ok": all(map(math.isfinite, losses))}
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {"measured GiB": peak, "measured / estimate": peak / row["estimate GiB"],
            "ok": all(map(math.isfinite, losses))}


def check_memory(plan, device):
    """Every config/*.py that train.py trains from scratch, one at a time from an emptied allocator."""
    rows = []
    for file in sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py")):
        cfg = preset_settings(os.path.join(ROOT, "config", file), plan)
        row = {"preset": file.removesuffix(".py")}
        if isinstance(cfg, str):
            row["note"] = cfg
        else:
            run_check(row, device, measure_preset, plan, cfg, device, row)
        rows.append(row)
    return rows


def gpu_peak(device, amp):
    """(FLOP/s, where it comes from): the datasheet's for a GPU in GPU_PEAKS, else the measured matmul rate."""
    name = torch.cuda.get_device_name(device) if device == "cuda" else device
    for pattern, tflops in GPU_PEAKS.items():
        if re.fullmatch(pattern, name):
            return tflops * 1e12, f"datasheet ({name})"
    return peak_flops(device, amp), f"measured: {name} is not in GPU_PEAKS"


def nano_mfu(plan, device, amp):
    """Forge-1 Nano's training step as train.py runs it on a GPU (compiled, autocast, AdamW), at bench's Nano size
    (8 x 1024, no activation checkpointing; halved until the estimate fits in 90% of the free memory, a margin for
    the compiled step): tokens/s, and MFU: 6N plus attention FLOPs per token (model.flops_per_token, train.py's
    MFU) over the peak, the datasheet's and the measured matmul rate."""
    cfg = check_settings(plan, optimizer="adamw", learning_rate=3e-4)
    model = build_model(asdict(plan.nano), device=device)
    B, T = plan.nano_batch, plan.nano.block_size
    free = torch.cuda.mem_get_info(device)[0] if device == "cuda" else math.inf
    while B > 1 and sum(model.estimate_memory(B, T, 2 if amp else 4).values()) > 0.9 * free:
        B //= 2
    step, _ = trainer(model, cfg, amp, random_batch(plan.nano.vocab_size, B, T, device),
                      torch.compile(model, dynamic=False, backend=plan.backend))
    seconds = race({"nano": step}, plan.reps, warmup=3, device=device)["nano"]
    flops = model.flops_per_token(T) * B * T / seconds
    peak, source = gpu_peak(device, amp)
    measured = peak_flops(device, amp)
    return {"params (M)": model.num_params()["total"] / 1e6, "micro-batch": f"{B}x{T}", "dtype": dtype_name(amp),
            "ms/step": seconds * 1e3, "tokens/s": B * T / seconds, "peak TFLOP/s": peak / 1e12, "peak": source,
            "MFU %": 100 * flops / peak, "measured peak TFLOP/s": measured / 1e12,
            "MFU % of measured": 100 * flops / measured}


def decode_speed(plan, model_args, device):
    """Prefill and decode tokens/s of model.generate, batch 1, greedy, in the weights' dtype sample.py takes
    (inference_dtype): the medians of plan.reps runs after a warm-up."""
    model = build_model(model_args, device=device)
    dtype = inference_dtype(device, "auto", model.num_params()["total"])
    model.eval().to(dtype)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (plan.prompt,), generator=generator).tolist()
    runs = [run_cached(model, prompt, plan.new_tokens)[1] for _ in range(plan.reps + 1)][1:]
    return {"params (M)": model.num_params()["total"] / 1e6, "dtype": dtype_name(dtype),
            "prompt + new tokens": f"{plan.prompt} + {plan.new_tokens}",
            "prefill tok/s": statistics.median(plan.prompt / (c[1] - c[0]) for c in runs),
            "decode tok/s": statistics.median((len(c) - 2) / (c[-1] - c[1]) for c in runs)}


def gpu_check(device, smoke=False):
    """The GPU check -> {check: rows}, each table printed as it completes (CHECK_TITLES says what each one is)."""
    plan, amp = check_plan(smoke), check_amp(device, "auto")
    default = preset_model(plan, default_run(plan), "meta").config
    checks = {
        "compile": lambda: [run_check({"model": "train.py's default"}, device, compare_compiled, plan, device, amp)],
        "precision": lambda: check_precision(plan, device),
        "memory": lambda: check_memory(plan, device),
        "mfu": lambda: [run_check({"model": "nano"}, device, nano_mfu, plan, device, amp)],
        "decode": lambda: [run_check({"model": name}, device, decode_speed, plan, asdict(config), device)
                           for name, config in (("train.py's default", default), ("nano", plan.nano))]}
    results = {}
    for name, check in checks.items():
        results[name] = check()
        print_table(f"gpu check: {CHECK_TITLES[name]}", results[name])
    return results


def failed_checks(results):
    """'table row' (the row's first column) for every row of a GPU check's results that failed."""
    return [f"{name} {next(iter(row.values()))}" for name, rows in results.items() if name in CHECK_TITLES
            for row in rows if row.get("ok") is False]


# ----------------------------------------------------------------------------- output

def fmt(value):
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: ""}[value]
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def print_table(title, rows):
    print(f"\n### {title}\n")
    if isinstance(rows, dict):
        print(rows["skipped"])
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: float32 on CPU and MPS (the targets' setting), the AMP dtype on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile ours and the peer alike (training)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--sizes", default="tiny,nano", help="models for train and generate: tiny, nano")
    p.add_argument("--batch_size", type=int, help="training micro-batch for every size")
    p.add_argument("--block_size", type=int, help="training context for every size")
    p.add_argument("--lengths", help="generation prompt+output lengths, e.g. 256,512,1024")
    p.add_argument("--new_tokens", type=int, help="tokens generated per generation run")
    p.add_argument("--reps", type=int, help="timed repeats per contender (the median is reported)")
    p.add_argument("--data_mb", type=int, help="megabytes of text for the tokenization benchmark")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--gpu_check", action="store_true",
                   help="check this CUDA GPU instead (compile, bf16/fp16, preset memory, MFU, decoding): minutes")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(args.sections) - set(SECTIONS):
        raise UserError(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := set(args.sizes) - set(MODELS):
        raise UserError(f"unknown size(s) {', '.join(sorted(unknown))}: choose from {', '.join(MODELS)}")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        raise UserError(f"--lengths takes comma-separated integers such as 256,512,1024, "
                        f"not {args.lengths!r}") from None
    for flag in ("batch_size", "block_size", "new_tokens", "reps", "data_mb", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.gpu_check:
        if not torch.cuda.is_available():
            raise UserError(f"no CUDA GPU here: --gpu_check measures one (torch {torch.__version__}, "
                            f"{f'CUDA {torch.version.cuda}' if torch.version.cuda else 'a build without CUDA'})")
        args.device = "cuda"  # whatever --device says: the check is the GPU's
    if args.device not in ("auto", "cpu", "cuda", "mps"):  # the sections tell devices apart by these names
        raise UserError(f"unknown device {args.device!r}: choose auto, cpu, cuda or mps")
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "float32" if args.device != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if args.dtype not in fast_dtypes(args.device):
        raise UserError(f"{args.dtype} is not native on this {args.device} (it would be emulated): use --dtype float32")
    args.amp = None if args.dtype == "float32" else DTYPES[args.dtype]  # the autocast dtype, None for plain fp32
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    plan = make_plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"command": " ".join(["python", "bench.py", *argv]), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "load average": round(os.getloadavg()[0], 2), "torch": torch.__version__, "dtype": args.dtype,
           "compile": None if args.gpu_check else args.compile}  # the GPU check compiles where train.py does
    print(", ".join(f"{k}: {v}" for k, v in env.items() if v is not None))
    results, t0 = {"env": env}, time.perf_counter()
    runners = {"peak": bench_peak, "train": bench_train, "generate": bench_generate, "memory": bench_memory,
               "data": lambda a, p: bench_data(a, p, results.get("train", []))}
    if args.gpu_check:
        results |= gpu_check("cuda")
    for section in [] if args.gpu_check else SECTIONS:  # in this order: data compares with train's results
        if section in args.sections:
            results[section] = runners[section](args, plan)
            print_table(TITLES.get(section, section), results[section])
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["load average after"] = round(os.getloadavg()[0], 2)
    print(f"\n{env['seconds']} s, load average {env['load average']} before, {env['load average after']} after")
    if args.json:
        save_json(results, args.json)
    if args.gpu_check and (failed := failed_checks(results)):
        raise UserError(f"gpu check: {len(failed)} failed ({', '.join(failed)}): the tables above say why")


if __name__ == "__main__":
    run_main(main)
