"""
The measurements behind docs/tokenizer.md, reproducible on any machine:

    python docs/tokenizer_bench.py compression --shakespeare input.txt --gsm8k GSM8K_DATA_DIR [--gpt2 gpt2.tiktoken]
    python docs/tokenizer_bench.py trainers FILE [--vocab 16384]      # rustbpe vs HF tokenizers, each run twice
    python docs/tokenizer_bench.py synthetic OUT.txt [--mb 100]        # English-shaped text to train on

compression: tokens per byte of held-out text (tinyshakespeare's last 10% after training on the first 90%; GSM8K's
test split after training on its train split) for 4k-32k tokens and three digit rules, against GPT-2's tokens.
trainers: wall time, peak memory and the hash of the result, each trainer in its own process, twice.
synthetic: real English beyond a few MB cannot be downloaded here, so this writes text with English's shape:
Zipf-distributed words (400,000 made of syllables), sentences, paragraphs, 2% numbers.
"""
import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import GPT2_PATTERN, QWEN2_PATTERN, SPECIAL_TOKENS, read_ranks, train_bpe  # noqa: E402

# The digit rules compared: Qwen2's pattern with one digit per token (ours), up to three (exactly llama.cpp's
# "llama3" pattern) and whole runs (no llama.cpp name), and GPT-2's own pattern (digit runs, other rules too).
PATTERNS = {"1 digit (qwen2, ours)": QWEN2_PATTERN,
            "1-3 digits (llama3)": QWEN2_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|"),
            "digit runs (qwen2 + \\p{N}+)": QWEN2_PATTERN.replace(r"\p{N}|", r"\p{N}+|"),
            "GPT-2's pattern": GPT2_PATTERN}


def paragraphs(path):
    """A text file's paragraphs (split at blank lines), as prepare.py reads a .txt file."""
    with open(path, encoding="utf-8") as f:
        return [p for p in f.read().split("\n\n") if p.strip()]


def rustbpe_ranks(texts, n_vocab, pattern):
    import rustbpe
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_vocab - len(SPECIAL_TOKENS), pattern=pattern)
    return dict(bpe.get_mergeable_ranks())


def compression(args):
    with open(args.shakespeare, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * 0.9)
    gsm8k = {split: ["\n".join((r["question"], r["answer"])) for r in map(json.loads, open(
        os.path.join(args.gsm8k, f"{split}.jsonl"), encoding="utf-8"))] for split in ("train", "test")}
    corpora = {"tinyshakespeare": (text[:cut].split("\n\n"), text[cut:]),
               "GSM8K": (gsm8k["train"], "\n\n".join(gsm8k["test"]))}
    gpt2 = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=read_ranks(args.gpt2),
                             special_tokens={}) if args.gpt2 else None
    sizes = (4096, 8192, 16384, 32768)
    print("| held-out text | digit rule | " + " | ".join(f"{n // 1024}k" for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for corpus, (train, heldout) in corpora.items():
        nbytes = len(heldout.encode("utf-8"))
        reference = len(gpt2.encode_ordinary(heldout)) if gpt2 else None
        if gpt2:
            print(f"| {corpus} ({nbytes:,} bytes) | GPT-2's 50k tokens | {reference / nbytes:.3f} tokens/byte |")
        for rule, pattern in PATTERNS.items():
            cells = []
            for n in sizes:
                enc = tiktoken.Encoding("x", pat_str=pattern, mergeable_ranks=rustbpe_ranks(train, n, pattern),
                                        special_tokens={})
                tokens = len(enc.encode_ordinary(heldout))
                cells.append(f"{tokens / nbytes:.3f}" + (f" ({tokens / reference:.2f}x)" if gpt2 else ""))
            print(f"| {corpus} | {rule} | " + " | ".join(cells) + " |", flush=True)


def train_once(trainer, path, n_vocab):
    """One training run (in a child process) -> {seconds, peak_mb, sha}: the peak is this process's, so the
    text the trainer reads counts too, as it does in prepare.py."""
    texts = paragraphs(path)
    t0 = time.time()
    if trainer == "rustbpe":
        result = train_bpe(texts, n_vocab)["tokens"]
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=n_vocab - len(SPECIAL_TOKENS),
                                show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        result = json.loads(tok.to_str())["model"]["merges"]
    seconds = time.time() - t0
    sha = hashlib.sha256(json.dumps(result).encode()).hexdigest()[:12]
    return {"seconds": round(seconds, 1), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "sha": sha, "size": len(result)}


def trainers(args):
    mb = os.path.getsize(args.file) / 1e6
    print(f"| trainer ({mb:.0f} MB, {args.vocab:,} tokens) | run | seconds | peak RSS | result hash |")
    print("|---|---|---|---|---|")
    for trainer in ("rustbpe", "tokenizers"):
        for run in (1, 2):
            out = subprocess.run([sys.executable, __file__, "_train", trainer, args.file, str(args.vocab)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {trainer} | {run} | {r['seconds']} | {r['peak_mb']} MB | {r['sha']} ({r['size']} entries) |",
                  flush=True)


def synthetic(args, seed=0, n_words=400_000):
    rng = np.random.default_rng(seed)
    syllables = [c + v + e for c in ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "th", "st",
                                     "w", "ch", "br", "tr"]
                 for v in ["a", "e", "i", "o", "u", "ea", "ou", "ai"] for e in ["", "n", "r", "s", "t", "ng", "ll", "ck"]]
    words = ["".join(syllables[j] for j in rng.integers(0, len(syllables), size=k))
             for k in rng.choice([1, 2, 2, 3, 3, 4], size=n_words)]
    p = 1.0 / np.arange(1, n_words + 1) ** 1.07
    p /= p.sum()
    size, target = 0, int(args.mb * 1e6)
    with open(args.out, "w", encoding="utf-8") as f:
        while size < target:
            drawn = [words[i] for i in rng.choice(n_words, size=200_000, p=p)]
            for k in np.nonzero(rng.random(len(drawn)) < 0.02)[0]:
                drawn[k] = str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
            sentences, start = [], 0
            for end in np.cumsum(rng.integers(5, 25, size=len(drawn) // 5)):
                if end > len(drawn):
                    break
                s = drawn[start:end]
                s[0], start = s[0].capitalize(), end
                sentences.append(" ".join(s) + str(rng.choice([".", ".", ".", "?", "!"])))
            text = "\n\n".join(" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)) + "\n\n"
            text = text[:target - size]
            f.write(text)
            size += len(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compression")
    c.add_argument("--shakespeare", required=True, help="tinyshakespeare's input.txt (karpathy/char-rnn)")
    c.add_argument("--gsm8k", required=True, help="the folder of GSM8K's train.jsonl and test.jsonl")
    c.add_argument("--gpt2", help="gpt2.tiktoken, for the ratios to GPT-2's tokens")
    t = sub.add_parser("trainers")
    t.add_argument("file")
    t.add_argument("--vocab", type=int, default=16384)
    s = sub.add_parser("synthetic")
    s.add_argument("out")
    s.add_argument("--mb", type=float, default=100)
    if sys.argv[1:2] == ["_train"]:  # a child of `trainers`
        print(json.dumps(train_once(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    args = p.parse_args()
    {"compression": compression, "trainers": trainers, "synthetic": synthetic}[args.what](args)


if __name__ == "__main__":
    main()
