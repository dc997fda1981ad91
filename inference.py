"""
Loading a checkpoint to generate with, and the flags of the scripts that do (sample, chat, serve, eval).
"""
import os

import torch

from checkpoints import load_checkpoint
from common import UserError, load_tokenizer
from device import DTYPES, inference_dtype, resolve_device


def find_checkpoint(out_dir):
    """The checkpoint a script uses by default: out_dir/best.pt (lowest val loss), else out_dir/ckpt.pt."""
    best = os.path.join(out_dir, "best.pt")
    return best if os.path.isfile(best) else os.path.join(out_dir, "ckpt.pt")


def add_model_args(parser):
    """Flags that pick the checkpoint and where it runs."""
    parser.add_argument("--ckpt", help="checkpoint file (default: OUT_DIR/best.pt, else OUT_DIR/ckpt.pt)")
    parser.add_argument("--out_dir", default="out", help="train.py's output directory (default: out)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="precision of the weights; auto: see inference_dtype in device.py")
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text")


def add_sampling_args(parser, max_new_tokens, temperature):
    """Flags for model.generate, and the thinking budget; the defaults differ per script (eval.py is greedy)."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling: only the smallest set of tokens holding p of the probability")
    parser.add_argument("--max_thinking_tokens", type=int, default=None,
                        help="thinking budget: after this many thinking tokens the think block is closed and the "
                             "model answers (default: no limit but max_new_tokens)")


def sampling_kwargs(args):
    """The generate() keyword arguments and max_thinking_tokens (replies.thinking_budget) from the flags, checked
    (argparse cannot check ranges)."""
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top_k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top_p must be in (0, 1]")
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise UserError("--max_thinking_tokens must be >= 0")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                max_thinking_tokens=args.max_thinking_tokens)


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


def prompt_budget(block_size, max_new_tokens):
    """How many tokens of the context a chat prompt may take: what the reply may need (max_new_tokens), at most
    half the context, is kept free (chat.py and serve.py fit the conversation into the rest)."""
    return block_size - min(max_new_tokens, block_size // 2)


def make_generator(model, seed):
    """A seeded RNG on the model's device, so that a seed reproduces the same tokens."""
    return torch.Generator(device=model.device).manual_seed(seed)
