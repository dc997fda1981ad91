"""
Datasets -> token files for train.py.

    python prepare.py                                   # the built-in reasoning dataset -> data/reasoning (offline)
    python prepare.py gsm8k openhermes --max-samples 20000 --tokenizer gpt2
    python prepare.py my_notes.txt qa.jsonl gsm8k=gsm8k-train.parquet

Writes OUT/train.bin and OUT/val.bin (np.uint16 token ids, every document is <|bos|> … <|eos|>), for chat data
OUT/train_mask.bin and OUT/val_mask.bin (np.uint8, 1 = a token the model learns to produce), and OUT/meta.json.
Everything is written under temporary names and renamed at the end; meta.json comes last.
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

from tokenizer import TOKENIZERS, TokenizerError, get_tokenizer, padded_vocab_size, render_conversation, special_ids


class PrepareError(Exception):
    """A user mistake or an unavailable dataset, explained in one line."""


# ============================================================ the built-in reasoning dataset
# Small, exactly checkable problems whose think block is a short, regular, digit-by-digit trace: designed so
# that a model of a few million parameters can learn each small step on a CPU in minutes, while the answer in
# one step (the <|no_think|> examples) stays out of its reach.

@dataclass
class Difficulty:
    digits: int = 3          # add / sub / max: numbers of up to this many digits
    mul_digits: tuple = (2, 1)  # mul: up to A-digit × up to B-digit (B >= 2 adds partial products)
    list_len: int = 5        # sort / max: lists of up to this many numbers


REASONING_EXAMPLES = 50_000  # default size: ~3.6M byte tokens, about what the default train.py run sees
DIRECT_SHARE = 0.25          # examples answered without thinking (<|no_think|>): eval compares both modes
HELDOUT_SHARE = 10           # 1 problem in 10 (by hash) is reserved for heldout_items and never trained on


def add_steps(a, b):
    """Column addition, right to left, one line per column. A line starts with what is left of both numbers
    (and the carry), so the digits to add are the last ones just written; then the column sum and the
    answer so far:  478+256: 8+6=14, 4 / 47+25+1: 7+5+1=13, 34 / 4+2+1: 4+2+1=7, 734"""
    lines, carry, done = [], 0, ""
    while True:
        c = f"+{carry}" if carry else ""
        head, x, y, a, b = f"{a}+{b}{c}", a % 10, b % 10, a // 10, b // 10
        s = x + y + carry
        carry, done = s // 10, f"{s % 10}{done}"
        if a == b == 0:
            return lines + [f"{head}: {x}+{y}{c}={s}, {int(str(carry) + done)}"]
        lines.append(f"{head}: {x}+{y}{c}={s}, {done}")


def sub_steps(a, b):
    """Column subtraction (a >= b) with borrows, written like add_steps; a borrowing column shows the 10
    it borrowed:  532-278: 12-8=4, 4 / 53-27-1: 13-7-1=5, 54 / 5-2-1: 5-2-1=2, 254"""
    lines, borrow, done = [], 0, ""
    while True:
        c = "-1" if borrow else ""
        head, x, y, a, b = f"{a}-{b}{c}", a % 10, b % 10, a // 10, b // 10
        top = x + 10 if x < y + borrow else x  # borrow 10 from the next column when needed
        d = top - y - borrow
        borrow, done = int(top > x), f"{d}{done}"
        if a == b == 0:
            return lines + [f"{head}: {top}-{y}{c}={d}, {int(done)}"]
        lines.append(f"{head}: {top}-{y}{c}={d}, {done}")


def mul_digit_steps(a, d):
    """a × one digit, right to left with carries:  47*6: 7*6=42, 2 / 4*6+4: 4*6+4=28, 282"""
    lines, carry, done = [], 0, ""
    while True:
        c = f"+{carry}" if carry else ""
        head, x, a = f"{a}*{d}{c}", a % 10, a // 10
        p = x * d + carry
        carry, done = p // 10, f"{p % 10}{done}"
        if a == 0:
            return lines + [f"{head}: {x}*{d}{c}={p}, {int(str(carry) + done)}"]
        lines.append(f"{head}: {x}*{d}{c}={p}, {done}")


def mul_steps(a, b):
    """a × b: one partial product per digit of b (right to left), each added to the running total."""
    lines, total = [], 0
    for i, d in enumerate(reversed(str(b))):
        lines += mul_digit_steps(a, int(d))
        partial = a * int(d) * 10 ** i
        if i:
            lines += add_steps(total, partial)
        total += partial
    return lines


def number(rng, digits):
    """A number of 1..digits digits; the digit count is uniform so short and long numbers are equally common."""
    k = rng.randint(1, digits)
    return rng.randint(10 ** (k - 1) if k > 1 else 0, 10 ** k - 1)


def task_add(rng, d):
    a, b = number(rng, d.digits), number(rng, d.digits)
    q = rng.choice(["What is {} + {}?", "{} + {} = ?", "Add {} and {}."]).format(a, b)
    return f"add {a} {b}", q, add_steps(a, b), str(a + b)


def task_sub(rng, d):
    a, b = sorted([number(rng, d.digits), number(rng, d.digits)], reverse=True)
    q = rng.choice(["What is {} - {}?", "{} - {} = ?", "Subtract {1} from {0}."]).format(a, b)
    return f"sub {a} {b}", q, sub_steps(a, b), str(a - b)


def task_mul(rng, d):
    a, b = number(rng, d.mul_digits[0]), number(rng, d.mul_digits[1])
    q = rng.choice(["What is {} * {}?", "{} * {} = ?", "Multiply {} by {}."]).format(a, b)
    return f"mul {a} {b}", q, mul_steps(a, b), str(a * b)


def task_sort(rng, d):
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, d.list_len))]
    rest, steps = list(nums), []
    while rest:  # selection sort: the smallest of what is left, until nothing is
        steps.append(f"{', '.join(map(str, rest))}: min {min(rest)}")
        rest.remove(min(rest))
    q = rng.choice(["Sort these numbers: {}", "Sort from smallest to largest: {}"]).format(", ".join(map(str, nums)))
    return f"sort {nums}", q, steps, ", ".join(map(str, sorted(nums)))


def task_max(rng, d):
    nums = [number(rng, d.digits) for _ in range(rng.randint(2, d.list_len))]
    best, steps = nums[0], []
    for x in nums[1:]:  # a running maximum, one comparison per line
        steps.append(f"{best}, {x} -> {max(best, x)}")
        best = max(best, x)
    listed = ", ".join(map(str, nums))
    q = f"Which is larger, {nums[0]} or {nums[1]}?" if len(nums) == 2 else f"What is the largest of {listed}?"
    return f"max {nums}", q, steps, str(best)


WORDS = """apple banana cherry strawberry orange grape lemon melon peach pear plum mango kiwi papaya coconut
tomato potato carrot pepper onion garlic butter bread cookie pizza pasta rice sugar coffee water bottle
letter paper pencil school teacher student window garden flower forest river mountain valley island ocean
bridge castle rocket planet galaxy comet rabbit kitten puppy turtle parrot giraffe elephant zebra monkey
dolphin penguin spider beetle mirror ladder hammer basket button pillow blanket jacket mitten balloon
summer winter autumn spring morning evening tomorrow yesterday holiday birthday market village cottage
engine wheel bicycle tractor airplane subway harbor lighthouse library museum theater concert guitar violin
trumpet banner ribbon pattern puzzle riddle secret mystery wizard dragon goblin knight princess kingdom
treasure diamond silver copper marble crystal thunder rainbow shadow bubble cinnamon vanilla committee
mississippi assessment bookkeeper address success possess necessary parallel""".split()


def task_count(rng, d):
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n, spelled = 0, []
    for ch in word:  # spell the word, comparing each letter with the one asked for, with a running count:
        n += ch == letter  # the letter is restated at every step so the comparison is local
        spelled.append(f"{ch}{'=' if ch == letter else '≠'}{letter} {n}")
    q = rng.choice(["How many times does the letter {} appear in {}?", "How many {}'s are in {}?"]).format(letter, word)
    return f"count {word} {letter}", q, [", ".join(spelled)], str(n)


NAMES = ["Ana", "Ben", "Mia", "Sam", "Leo", "Zoe", "Max", "Ivy", "Tom", "Eva"]
THINGS = ["apples", "pens", "cards", "stickers", "books", "marbles", "coins", "shells", "cookies", "stamps"]
WORD_PROBLEMS = [  # (template, first operation, second operation): two steps, each one traced like above
    ("{n} has {a} {t}. {n} gets {b} more and gives away {c}. How many {t} does {n} have now?", "+", "-"),
    ("{n} had {a} {t}, lost {b} and then found {c}. How many {t} does {n} have now?", "-", "+"),
    ("{n} buys {b} bags of {a} {t} and already had {c}. How many {t} does {n} have?", "*", "+"),
]
STEPS = {"+": add_steps, "-": sub_steps, "*": mul_steps}
APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def task_word(rng, d):
    i = rng.randrange(len(WORD_PROBLEMS))
    template, op1, op2 = WORD_PROBLEMS[i]
    a, b, c = rng.randint(10, 99), rng.randint(2, 9 if op1 == "*" else 99), rng.randint(1, 99)
    if op1 == "-":
        a, b = max(a, b), min(a, b)
    first = APPLY[op1](a, b)
    if op2 == "-":
        c = min(c, first)
    q = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, c=c)
    steps = [f"{a}{op1}{b}{op2}{c}"] + STEPS[op1](a, b) + STEPS[op2](first, c)
    return f"word {i} {a} {b} {c}", q, steps, str(APPLY[op2](first, c))


TASK_MAKERS = {"add": task_add, "sub": task_sub, "mul": task_mul, "sort": task_sort, "count": task_count,
               "max": task_max, "word": task_word}
TASKS = list(TASK_MAKERS)
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


def is_heldout(key):
    """Whether a problem is reserved for evaluation: decided by a hash, so train and held-out never share one."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % HELDOUT_SHARE == 0


def sample_problem(task, rng, difficulty, heldout):
    """(question, thinking, answer) for a problem on the requested side of the held-out line."""
    while True:
        key, question, steps, answer = TASK_MAKERS[task](rng, difficulty)
        if is_heldout(key) == heldout:
            return question, "\n".join(steps), answer


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


def heldout_items(n, seed=20240601, difficulty=None):
    """n evaluation items (task, messages ending with the user turn, answer), cycling through TASKS.
    They come from the reserved share of problems, so none of them is ever in the training data."""
    rng, difficulty = random.Random(seed), difficulty or Difficulty()
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        question, _, answer = sample_problem(task, rng, difficulty, heldout=True)
        yield task, [{"role": "user", "content": question}], answer


def check_answer(task, text, answer):
    """Exact match of the model's answer text, ignoring whitespace, case and a final period."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: known tasks are {', '.join(TASKS)}")
    def norm(s):
        return re.sub(r"\s+", "", s).rstrip(".").lower()
    return norm(text) == norm(answer)


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
        raise PrepareError(f"cannot load {name} ({path}) from the Hugging Face Hub ({type(e).__name__}: {why}); "
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
            raise PrepareError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from None
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # "Extra data": a .json file that is really JSON lines
                    raise PrepareError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
                f.seek(0)
            else:
                yield from data if isinstance(data, list) else [data]
                return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None


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
        raise PrepareError(f"unknown recipe {recipe!r} in {spec!r}: known recipes are {', '.join(RECIPES)}")
    if not path.endswith(LOCAL_FILES):
        raise PrepareError(f"unknown dataset {spec!r}: use reasoning, {', '.join(RECIPES)}, a local "
                           f"{'/'.join(LOCAL_FILES)} file, or RECIPE=FILE")
    if not os.path.isfile(path):
        raise PrepareError(f"no such file: {path}")
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
    """Appends documents to OUT/{split}.bin and OUT/{split}_mask.bin under temporary names, one shard of
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
    with ThreadPoolExecutor(args.num_proc) as pool:
        for src in sources:
            stats = all_stats[src.name] = new_stats()
            for item in encode_in_parallel(documents(src, stats), enc, key, pool, args.num_proc):
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
    enc = get_tokenizer(args.tokenizer)
    if enc.n_vocab > 65536:
        raise PrepareError(f"tokenizer {args.tokenizer} has {enc.n_vocab} tokens: ids above 65535 do not fit uint16")
    out = args.out or os.path.join("data", "+".join(s.name for s in sources))
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
            raise PrepareError("no documents to write (all records were malformed or empty)" if n == 0 else
                               f"only {n} documents: the {'val' if n == totals['train']['documents'] else 'train'} "
                               f"split is empty; use more data or another --val-fraction")
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
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    seconds = time.time() - t0
    tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    print(f"wrote {out}: train {totals['train']['tokens']:,} tokens / {totals['train']['documents']:,} docs, "
          f"val {totals['val']['tokens']:,} tokens / {totals['val']['documents']:,} docs, tokenizer {args.tokenizer} "
          f"(vocab {meta['vocab_size']}), {seconds:.1f}s, {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return meta


# ============================================================ command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise PrepareError(f"{message} (see python prepare.py --help)")


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", default=["reasoning"],
                   help=f"reasoning (default), {', '.join(RECIPES)}, local {'/'.join(LOCAL_FILES)} files, "
                        "or RECIPE=FILE (a recipe applied to that dataset's downloaded file)")
    p.add_argument("--max-samples", type=int, help="records per dataset (hub datasets are then streamed)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="default: byte for reasoning alone, else gpt2")
    p.add_argument("--out", help="output folder (default: data/NAME)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer threads")
    p.add_argument("--seed", type=int, default=1337, help="generator seed (reasoning) and split seed")
    p.add_argument("--digits", type=int, default=Difficulty.digits, help="reasoning: add/sub/max digits")
    p.add_argument("--mul-digits", default="2x1", help="reasoning: AxB, up to A-digit times up to B-digit")
    p.add_argument("--list-len", type=int, default=Difficulty.list_len, help="reasoning: longest list")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max-samples must be at least 1")
    if not 0 < args.val_fraction < 1:
        p.error("--val-fraction must be between 0 and 1")
    if args.num_proc < 1:
        p.error("--num-proc must be at least 1")
    if not re.fullmatch(r"[1-9]x[1-9]", args.mul_digits) or args.digits < 1 or args.list_len < 3:
        p.error("difficulty: --digits >= 1, --mul-digits like 2x1, --list-len >= 3")
    args.difficulty = Difficulty(args.digits, tuple(int(x) for x in args.mul_digits.split("x")), args.list_len)
    args.tokenizer = args.tokenizer or ("byte" if args.datasets == ["reasoning"] else "gpt2")
    args.argv = list(argv)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        prepare(parse_args(argv))
    except (PrepareError, TokenizerError) as e:
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted; nothing was written")


if __name__ == "__main__":
    main()
