"""
Sample from a trained model: nanoGPT's sample.py with a KV cache, streaming output and top-k/top-p.

    python sample.py                                      # out/best.pt (else out/ckpt.pt), 3 samples
    python sample.py --ckpt out/ckpt.pt --start "Once upon a time" --num_samples 1
    python sample.py --start FILE:prompt.txt --temperature 0   # greedy continuation of a file

The start text is encoded as plain text after <|bos|> (a literal "<|think|>" in it stays text), and
special tokens the model produces are shown as their names: this is the raw view of the model. For
a conversation use chat.py.
"""
import argparse
import sys
import time

from common import UserError, robust_stdio, run_main
from inference import add_model_args, add_sampling_args, load_model, make_generator, sampling_kwargs
from replies import Reply, add_token, thinking_budget
from tokenizer import TextStream, special_ids


def read_start(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the start text from {start[5:]}: {e.strerror}") from None


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
        raise UserError(f"the start text is {len(prompt)} tokens; the model's context holds {model.config.block_size}")
    sp = special_ids(enc)
    stop_ids = {sp["<|eos|>"]}  # the end of a document
    generator = make_generator(model, args.seed)
    budget = sampling.pop("max_thinking_tokens")

    def write(reply, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    n_tokens, t0 = 0, time.perf_counter()
    try:
        for _ in range(args.num_samples):
            reply, stream = Reply(), TextStream(enc, show_special=True)  # the reply tracks thinking for the budget
            sys.stdout.write(start)
            for step in model.generate([prompt], **sampling, stop_ids=stop_ids, generator=generator,
                                       force=thinking_budget([reply], budget, enc)):
                n_tokens += 1
                add_token(reply, stream, step[0], sp, stop_ids, write, None)
            end = stream(reply.ids[-1]) if reply.finish == "stop" else ""  # <|eos|>, by name
            print(end + stream.flush() + "\n---------------", flush=True)
    except KeyboardInterrupt:
        print(flush=True)
    dt = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
