"""
Sample from a trained model: nanoGPT's sample.py with a KV cache, streaming output and top-k/top-p.

    python sample.py                                      # out/best.pt (else out/ckpt.pt), 3 samples
    python sample.py --ckpt out/ckpt.pt --start "Once upon a time" --num_samples 1
    python sample.py --start FILE:prompt.txt --temperature 0   # greedy continuation of a file

The start text is encoded as plain text after <|bos|> (a literal "<|think|>" in it stays text), and
special tokens the model produces are shown as their names: this is the raw view of the model. For
a conversation use chat.py.

This file also holds what chat.py and eval.py share: the common flags, loading a checkpoint with its
tokenizer, and turning token ids into printable text as they stream.
"""
import argparse
import codecs
import os
import sys
import time

import torch

from model import CheckpointError, amp_dtype, find_checkpoint, load_checkpoint, resolve_device
from tokenizer import TokenizerError, all_special_ids, get_tokenizer

# ----------------------------------------------------------------------------- shared with chat.py, eval.py


def die(message):
    """End the script with a one-line error (exit status 1), never a traceback."""
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: {message}")


def add_model_args(parser):
    """Flags that pick the checkpoint and where it runs."""
    parser.add_argument("--ckpt", help="checkpoint file (default: OUT_DIR/best.pt, else OUT_DIR/ckpt.pt)")
    parser.add_argument("--out_dir", default="out", help="train.py's output directory (default: out)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="precision of the weights; auto: see inference_dtype in sample.py")
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
        die("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        die("--temperature must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        die("--top_k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        die("--top_p must be in (0, 1]")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def checkpoint_path(args):
    """--ckpt, else the best checkpoint of --out_dir, else its latest."""
    return args.ckpt or find_checkpoint(args.out_dir)


def inference_dtype(device_type, dtype, n_params):
    """The dtype the weights are cast to for generation (cast once, not autocast per op: half-precision
    weights halve the bytes read per token). auto: train.py's autocast dtype on GPUs. On a CPU with native
    bf16 only from 50M parameters up: decoding those is bound by reading the weights (Forge-1 Nano here: 71
    vs 42 tokens/s), while small models are bound by per-op overhead, higher in bf16 (the 3M default: 714
    vs 1449 tokens/s)."""
    if dtype == "auto" and device_type == "cpu" and n_params < 50e6:
        return torch.float32
    try:
        return amp_dtype(device_type, dtype) or torch.float32
    except ValueError as e:
        die(e)


def load_model(args):
    """The checkpoint of --ckpt/--out_dir on --device, ready for generation -> (model, enc, ckpt): the model
    in eval mode in its inference dtype, ckpt the checkpoint's dict without the weights (config, iter_num,
    ...). Any problem with it ends the script in one line."""
    path = checkpoint_path(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        die(e)
    try:
        model, ckpt = load_checkpoint(path, device)
        enc = get_tokenizer(ckpt.get("tokenizer", "byte"))
    except (CheckpointError, TokenizerError) as e:
        die(e)
    if model.config.vocab_size < enc.n_vocab:
        die(f"{path} has a {model.config.vocab_size}-token vocabulary, smaller than its tokenizer "
            f"{enc.name!r} ({enc.n_vocab}): the checkpoint is corrupt")
    device_type = torch.device(device).type
    model.to(inference_dtype(device_type, args.dtype, model.num_params()["total"]))
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


class TextStream:
    """Token ids -> text, one id at a time, for streaming. One character can span several tokens (each
    byte of 'é' is its own token in the byte tokenizer), so bytes pass through an incremental UTF-8
    decoder; invalid bytes come out as U+FFFD. Special tokens are dropped, or shown by name with
    show_special. Ids past the tokenizer (the padding rows of the embedding) are never text."""

    def __init__(self, enc, show_special=False):
        self.enc, self.show_special = enc, show_special
        self.special = all_special_ids(enc)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token_id):
        if token_id in self.special:
            name = self.enc.decode_single_token_bytes(token_id).decode() if self.show_special else ""
            return self.flush() + name
        if token_id >= self.enc.n_vocab:
            return ""
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def flush(self):
        """Whatever an unfinished character left behind (as U+FFFD)."""
        return self.decoder.decode(b"", final=True)


# ----------------------------------------------------------------------------- sample.py itself


def read_start(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        die(f"cannot read the start text from {start[5:]}: {e.strerror}")


def main():
    parser = argparse.ArgumentParser(description="Sample text from a trained nanoforge checkpoint.")
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=500, temperature=0.8)
    parser.add_argument("--start", default="", help='the text to continue, or "FILE:path" to read it from a file')
    parser.add_argument("--num_samples", type=int, default=3)
    args = parser.parse_args()
    robust_stdio()
    sampling = sampling_kwargs(args)
    model, enc, _ = load_model(args)

    start = read_start(args.start)
    prompt = [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary(start)
    if len(prompt) >= model.config.block_size:
        die(f"the start text is {len(prompt)} tokens; the model's context holds {model.config.block_size}")
    stop_ids = {enc.encode_single_token("<|eos|>")}  # the end of a document
    generator = make_generator(model, args.seed)

    n_tokens, t0 = 0, time.perf_counter()
    try:
        for _ in range(args.num_samples):
            stream = TextStream(enc, show_special=True)
            sys.stdout.write(start)
            for token_id in model.generate(prompt, **sampling, stop_ids=stop_ids, generator=generator):
                n_tokens += 1
                sys.stdout.write(stream(token_id))
                sys.stdout.flush()
            print(stream.flush() + "\n---------------", flush=True)
    except KeyboardInterrupt:
        print(flush=True)
    dt = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
