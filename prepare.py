"""
Datasets -> token files for train.py.

    python prepare.py                                   # the built-in reasoning dataset -> data/reasoning (offline)
    python prepare.py gsm8k openhermes --max_samples 20000 --tokenizer gpt2
    python prepare.py my_notes.txt qa.jsonl gsm8k=gsm8k-train.parquet

Writes OUT_DIR/train.bin and OUT_DIR/val.bin (np.uint16 token ids, every document is <|bos|> … <|eos|>), for chat
data OUT_DIR/train_mask.bin and OUT_DIR/val_mask.bin (np.uint8, 1 = a token the model learns to produce), and
OUT_DIR/meta.json. Everything is written under temporary names and renamed at the end; meta.json comes last.
"""
import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shlex
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from common import UserError, load_tokenizer, run_main, save_json
from tasks import Difficulty, sample_problem
from tokenizer import TOKENIZERS, padded_vocab_size, render_conversation, special_ids
from training import StopFlag


# ============================================================ the built-in reasoning dataset
# The problems, their traces and the held-out split are in tasks.py; here is only the mix: how many examples,
# which tasks how often, small talk, and the share answered without thinking.

REASONING_EXAMPLES = 50_000  # default size: ~3.8M byte tokens, about what the default train.py run sees
DIRECT_SHARE = 0.25          # examples answered without thinking (<|no_think|>): eval compares both modes
TASK_WEIGHTS = {"add": 3, "sub": 3, "mul": 3, "sort": 2, "count": 2, "max": 2, "word": 2, "smalltalk": 1}

SMALLTALK = [  # (things a user says, things Forge answers): always answered without thinking
    (["Hi", "Hello", "Hey", "Hi there!", "Hello!", "Good morning", "Hey, how are you?"],
     ["Hello! How can I help you today?", "Hi! Ask me a question and I will think it through.",
      "Hey! What shall we work on?"]),
    (["Who are you?", "What is your name?", "What are you?", "Introduce yourself."],
     ["I am Forge, a small reasoning model trained with nanoforge.",
      "My name is Forge. I think step by step before I answer."]),
    (["What can you do?", "How can you help me?", "What are you good at?"],
     ["I can add, subtract and multiply numbers, sort lists, find the largest number, count letters and "
      "solve short word problems."]),
    (["Thanks!", "Thank you", "Great, thanks.", "thx"], ["You're welcome!", "Happy to help!"]),
    (["Bye", "Goodbye", "See you later"], ["Goodbye!", "Bye! Come back any time."]),
]


def reasoning_documents(n, seed, difficulty):
    """n chat examples of the built-in dataset, deterministic for a seed."""
    rng = random.Random(seed)
    names, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
    for _ in range(n):
        task = rng.choices(names, weights)[0]
        if task == "smalltalk":
            says, answers = rng.choice(SMALLTALK)
            question, thinking, answer = rng.choice(says), None, rng.choice(answers)
        else:
            question, thinking, answer = sample_problem(task, rng, difficulty, heldout=False)
            if rng.random() < DIRECT_SHARE:
                thinking = None
        yield [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "thinking": thinking}]


# ============================================================ recipes: one record of a dataset -> a document
# A document is plain text (str) or a chat (list of {role, content, thinking?}). A malformed record raises
# KeyError / TypeError / ValueError and is skipped and counted.

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def between(text, start, end):
    """The stripped text between two markers (ValueError when they are missing)."""
    i, j = text.index(start) + len(start), text.index(end)
    return text[i:j].strip()


def plain_text(rec):  # roneneldan/TinyStories, HuggingFaceFW/fineweb-edu, local {text}
    if not isinstance(rec["text"], str) or not rec["text"].strip():
        raise ValueError("empty text")
    return rec["text"]


def from_conversations(rec):  # teknium/OpenHermes-2.5, local {conversations: [{from, value}]}
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in rec["conversations"]]


def platypus(rec):  # garage-bAInd/Open-Platypus: instruction, input, output
    question = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": rec["output"]}]


def openthoughts(rec):  # open-thoughts/OpenThoughts-114k: system + conversations with thought/solution markers
    # The dataset's system prompt only explains those markers, which become our think block: it is dropped.
    chat = from_conversations(rec)
    for m in chat:
        if m["role"] == "assistant":
            value = m["content"]
            m["thinking"] = between(value, "<|begin_of_thought|>", "<|end_of_thought|>")
            m["content"] = between(value, "<|begin_of_solution|>", "<|end_of_solution|>")
    return chat


def from_messages(rec):  # open-r1/Mixture-of-Thoughts, local {messages: [{role, content}]}, <think>…</think>
    chat = []
    for m in rec["messages"]:
        role, content, thinking = ROLES[m["role"]], m["content"], m.get("thinking")
        if role == "assistant" and thinking is None and "</think>" in content:
            thinking, content = content.split("</think>", 1)
            thinking, content = thinking.replace("<think>", "", 1).strip(), content.strip()
        chat.append({"role": role, "content": content, "thinking": thinking})
    return chat


def gsm8k(rec):  # openai/gsm8k (main): the worked solution is the thinking, the number after #### the answer
    work, final = rec["answer"].split("####")
    thinking = re.sub(r"<<[^>]*>>", "", work).strip()  # drop the calculator annotations <<48/2=24>>
    return [{"role": "user", "content": rec["question"]},
            {"role": "assistant", "content": final.strip(), "thinking": thinking}]


def question_answer(rec):  # local {question, answer[, thinking]}
    return [{"role": "user", "content": rec["question"]},
            {"role": "assistant", "content": rec["answer"], "thinking": rec.get("thinking")}]


def local_record(rec):
    """A record of a local .json/.jsonl/.parquet file, in whichever supported shape it has."""
    for key, convert in (("messages", from_messages), ("conversations", from_conversations),
                         ("question", question_answer), ("text", plain_text)):
        if key in rec:
            return convert(rec)
    raise KeyError("expected a {question, answer}, {messages}, {conversations} or {text} record")


RECIPES = {  # name: (Hugging Face dataset, config, converter)
    "openhermes": ("teknium/OpenHermes-2.5", None, from_conversations),
    "platypus": ("garage-bAInd/Open-Platypus", None, platypus),
    "openthoughts": ("open-thoughts/OpenThoughts-114k", None, openthoughts),
    "mot": ("open-r1/Mixture-of-Thoughts", "all", from_messages),
    "gsm8k": ("openai/gsm8k", "main", gsm8k),
    "tinystories": ("roneneldan/TinyStories", None, plain_text),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", plain_text),
}
LOCAL_FILES = (".txt", ".json", ".jsonl", ".parquet")


# ============================================================ sources of records

def hub_records(name, max_samples, num_proc):
    """Records of a Hub dataset; streamed when only a sample is wanted, so nothing big is downloaded."""
    path, config, _ = RECIPES[name]
    try:
        import datasets
        if max_samples is None:
            ds = datasets.load_dataset(path, config, split="train", num_proc=num_proc)
        else:
            ds = datasets.load_dataset(path, config, split="train", streaming=True)
        yield from ds
    except Exception as e:  # offline, not found, gated, interrupted stream: one line, with a way out
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"cannot load {name} ({path}) from the Hugging Face Hub ({type(e).__name__}: {why}); "
                           f"check the connection, or download its files and pass them as {name}=FILE") from None


def txt_documents(path, max_chars=1 << 16):
    """Plain text: documents are separated by blank lines (long ones are cut at a line, to bound memory)."""
    lines, size = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in itertools.chain(f, [""]):  # a final blank line ends the last document
            if line.strip():
                lines.append(line)
                size += len(line)
            if lines and (not line.strip() or size > max_chars):
                yield "".join(lines).rstrip("\n")
                lines, size = [], 0


def file_records(path):
    """Records of a local .jsonl / .json / .parquet file; invalid JSON is an error, not a skip."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except Exception as e:
            raise UserError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from None
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # "Extra data": a .json file that is really JSON lines
                    raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
                f.seek(0)
            else:
                yield from data if isinstance(data, list) else [data]
                return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None


@dataclass
class Source:
    name: str
    records: object  # an iterator of records
    convert: object  # record -> document
    total: int = None


def open_source(spec, args):
    """A dataset argument -> Source: 'reasoning', a recipe name, a local file, or RECIPE=FILE."""
    recipe, _, path = spec.partition("=") if "=" in spec else (None, "", spec)
    if spec == "reasoning":
        n = args.max_samples or REASONING_EXAMPLES
        return Source("reasoning", reasoning_documents(n, args.seed, args.difficulty), as_is, n)
    if recipe is None and spec in RECIPES:
        return Source(spec, itertools.islice(hub_records(spec, args.max_samples, args.num_proc), args.max_samples),
                      RECIPES[spec][2], args.max_samples)
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} in {spec!r}: known recipes are {', '.join(RECIPES)}")
    if not path.endswith(LOCAL_FILES):
        raise UserError(f"unknown dataset {spec!r}: use reasoning, {', '.join(RECIPES)}, a local "
                           f"{'/'.join(LOCAL_FILES)} file, or RECIPE=FILE")
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    name = recipe or os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".txt"):
        return Source(name, itertools.islice(txt_documents(path), args.max_samples), as_is, args.max_samples)
    convert = RECIPES[recipe][2] if recipe else local_record
    return Source(name, itertools.islice(file_records(path), args.max_samples), convert, args.max_samples)


def as_is(doc):  # the built-in dataset and .txt files yield documents already
    return doc


# ============================================================ tokenize and write

def encode_chunk(docs, enc, key):
    """Documents -> (ids uint16, mask uint8, goes to val?) or a ValueError for a malformed chat.
    Runs in worker threads: tiktoken releases the GIL while it encodes."""
    sp = special_ids(enc)
    bos, eos = sp["<|bos|>"], sp["<|eos|>"]
    out = []
    for doc in docs:
        try:
            if isinstance(doc, str):
                ids = np.array([bos] + enc.encode_ordinary(doc) + [eos], dtype=np.uint16)
                mask = np.ones(len(ids), dtype=np.uint8)
                mask[0] = 0
            else:
                ids, mask = render_conversation(doc, enc)
                ids, mask = np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8)
        except ValueError as e:
            out.append(e)
            continue
        # the split is a hash of the tokens: identical documents always land on the same side
        h = hashlib.blake2b(ids.tobytes(), digest_size=8, key=key).digest()
        out.append((ids, mask, int.from_bytes(h, "little") / 2 ** 64))
    return out


class BinWriter:
    """Appends documents to OUT_DIR/{split}.bin and OUT_DIR/{split}_mask.bin under temporary names, one shard of
    about a million tokens at a time, so memory stays bounded however large the dataset is."""
    SHARD_TOKENS = 1 << 20

    def __init__(self, out, split):
        self.paths = [os.path.join(out, f"{split}.bin"), os.path.join(out, f"{split}_mask.bin")]
        self.files = [open(p + ".tmp", "wb") for p in self.paths]
        self.ids, self.masks, self.buffered = [], [], 0

    def add(self, ids, mask):
        self.ids.append(ids)
        self.masks.append(mask)
        self.buffered += len(ids)
        if self.buffered >= self.SHARD_TOKENS:
            self.flush()

    def flush(self):
        for f, parts in zip(self.files, (self.ids, self.masks)):
            if parts:
                np.concatenate(parts).tofile(f)
        self.ids, self.masks, self.buffered = [], [], 0

    def close(self):
        self.flush()
        for f in self.files:
            f.close()

    def commit(self, with_mask):
        """Move the finished files into place; a dataset without chat drops its mask (and any stale one)."""
        os.replace(self.paths[0] + ".tmp", self.paths[0])
        if with_mask:
            os.replace(self.paths[1] + ".tmp", self.paths[1])
        else:
            for p in (self.paths[1] + ".tmp", self.paths[1]):
                if os.path.exists(p):
                    os.remove(p)

    def discard(self):
        for f, p in zip(self.files, self.paths):
            f.close()
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")


def new_stats():
    return {"train_tokens": 0, "train_documents": 0, "val_tokens": 0, "val_documents": 0, "skipped": 0, "chat": False}


def skip(stats, error):
    stats["skipped"] += 1
    stats.setdefault("first_skip", f"{type(error).__name__}: {error}"[:200])


def documents(source, stats):
    """The source's documents, skipping (and counting) malformed records."""
    for rec in tqdm(source.records, desc=source.name, total=source.total, unit=" docs", mininterval=1,
                    disable=None):
        try:
            doc = source.convert(rec)
            if not isinstance(doc, str) and not any(m["role"] == "assistant" for m in doc):
                raise ValueError("no assistant turn")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            skip(stats, e)
            continue
        stats["chat"] |= not isinstance(doc, str)
        yield doc


def batched(iterable, n):
    it = iter(iterable)
    return iter(lambda: list(itertools.islice(it, n)), [])


def encode_in_parallel(docs, enc, key, pool, workers):
    """encode_chunk over chunks of documents in worker threads, results in order; a few chunks stay in
    flight so the main thread reads and writes while the workers encode, and memory stays bounded."""
    pending = deque()
    for chunk in batched(docs, 256):
        pending.append(pool.submit(encode_chunk, chunk, enc, key))
        if len(pending) > 2 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def tokenize_all(sources, enc, writers, args):
    """Every source's documents into the train or val writer; returns per-source statistics."""
    key = args.seed.to_bytes(8, "little", signed=True)
    all_stats = {}
    # Ctrl-C (or SIGTERM) is acted on between documents: a KeyboardInterrupt raised inside the pool's own locks
    # (pool.submit) could leave one of them held, and the pool's shutdown would then wait forever.
    stop = StopFlag()
    with ThreadPoolExecutor(args.num_proc) as pool:
        for src in sources:
            stats = all_stats[src.name] = new_stats()
            for item in encode_in_parallel(documents(src, stats), enc, key, pool, args.num_proc):
                if stop.signum:
                    raise KeyboardInterrupt
                if isinstance(item, ValueError):
                    skip(stats, item)
                    continue
                ids, mask, u = item
                split = "val" if u < args.val_fraction else "train"
                writers[split].add(ids, mask)
                stats[f"{split}_tokens"] += len(ids)
                stats[f"{split}_documents"] += 1
            if stats["skipped"]:
                print(f"{src.name}: skipped {stats['skipped']} malformed records (first: {stats['first_skip']})")
    return all_stats


def prepare(args):
    sources = [open_source(spec, args) for spec in args.datasets]
    enc = load_tokenizer(args.tokenizer)
    if enc.n_vocab > 65536:
        raise UserError(f"tokenizer {args.tokenizer} has {enc.n_vocab} tokens: ids above 65535 do not fit uint16")
    out = args.out_dir or os.path.join("data", "+".join(s.name for s in sources))
    new_dir = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    writers = {split: BinWriter(out, split) for split in ("train", "val")}
    try:
        stats = tokenize_all(sources, enc, writers, args)
        for w in writers.values():
            w.close()
        totals = {split: {k: sum(s[f"{split}_{k}"] for s in stats.values()) for k in ("tokens", "documents")}
                  for split in ("train", "val")}
        if not totals["train"]["documents"] or not totals["val"]["documents"]:
            n = totals["train"]["documents"] + totals["val"]["documents"]
            raise UserError("no documents to write (all records were malformed or empty)" if n == 0 else
                            f"only {n} documents: the {'val' if n == totals['train']['documents'] else 'train'} "
                            f"split is empty; use more data or another --val_fraction")
    except BaseException:
        for w in writers.values():
            w.discard()
        if new_dir and not os.listdir(out):
            os.rmdir(out)
        raise
    with_mask = any(s["chat"] for s in stats.values())
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # from here until the new meta.json exists, the folder reads as incomplete
    for w in writers.values():
        w.commit(with_mask)
    meta = {"tokenizer": args.tokenizer, "vocab_size": padded_vocab_size(enc), "n_vocab": enc.n_vocab,
            "special_tokens": special_ids(enc), "dtype": "uint16", "mask": with_mask, **totals,
            "sources": {name: {k: v for k, v in s.items() if k != "chat"} for name, s in stats.items()},
            "val_fraction": args.val_fraction, "seed": args.seed,
            "command": shlex.join(["python", "prepare.py", *args.argv])}
    if "reasoning" in args.datasets:
        meta["difficulty"] = asdict(args.difficulty)
    save_json(meta, meta_path)
    seconds = time.time() - t0
    tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    print(f"wrote {out}: train {totals['train']['tokens']:,} tokens / {totals['train']['documents']:,} docs, "
          f"val {totals['val']['tokens']:,} tokens / {totals['val']['documents']:,} docs, tokenizer {args.tokenizer} "
          f"(vocab {meta['vocab_size']}), {seconds:.1f}s, {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return meta


# ============================================================ command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see python prepare.py --help)")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", default=["reasoning"],
                   help=f"reasoning (default), {', '.join(RECIPES)}, local {'/'.join(LOCAL_FILES)} files, "
                        "or RECIPE=FILE (a recipe applied to that dataset's downloaded file)")
    p.add_argument("--max_samples", type=int, help="records per dataset (hub datasets are then streamed)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="default: byte for reasoning alone, else gpt2")
    p.add_argument("--out_dir", help="output folder (default: data/NAME)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer threads")
    p.add_argument("--seed", type=int, default=1337, help="generator seed (reasoning) and split seed")
    p.add_argument("--digits", type=int, default=Difficulty.digits, help="reasoning: add/sub/max digits")
    p.add_argument("--mul_digits", default="2x1", help="reasoning: AxB, up to A-digit times up to B-digit")
    p.add_argument("--list_len", type=int, default=Difficulty.list_len, help="reasoning: longest list")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be at least 1")
    if not 0 < args.val_fraction < 1:
        p.error("--val_fraction must be between 0 and 1")
    if args.num_proc < 1:
        p.error("--num_proc must be at least 1")
    if not re.fullmatch(r"[1-9]x[1-9]", args.mul_digits) or args.digits < 1 or args.list_len < 3:
        p.error("difficulty: --digits >= 1, --mul_digits like 2x1, --list_len >= 3")
    args.difficulty = Difficulty(args.digits, tuple(int(x) for x in args.mul_digits.split("x")), args.list_len)
    args.tokenizer = args.tokenizer or ("byte" if args.datasets == ["reasoning"] else "gpt2")
    args.argv = list(argv)
    return args


def main(argv=None):
    try:
        prepare(parse_args(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted; nothing was written")


if __name__ == "__main__":
    run_main(main)
