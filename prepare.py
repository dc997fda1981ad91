"""
Datasets -> token files for train.py.

    python prepare.py                                   # the built-in reasoning dataset -> data/reasoning (offline)
    python prepare.py gsm8k openhermes --max_samples 20000 --tokenizer gpt2
    python prepare.py my_notes.txt qa.jsonl gsm8k=gsm8k-train.parquet tinystories=TinyStories-train.txt
    python prepare.py fineweb-edu --max_doc_tokens 4096 --resume   # go on after an interruption
    python prepare.py tinystories --tokenizer bpe:16384    # train a 16k BPE on (100 MB of) the data, then tokenize
    python prepare.py sft.jsonl --tokenizer data/tinystories   # SFT data with the pretraining data's tokenizer

Writes OUT_DIR/train.bin and OUT_DIR/val.bin (np.uint16 token ids, every document is <|bos|> … <|eos|>),
OUT_DIR/{train,val}_index.bin (np.uint64: where each document starts, for train.py's windows="documents"), for chat
data OUT_DIR/train_mask.bin and OUT_DIR/val_mask.bin (np.uint8, 1 = a token the model learns to produce), and
OUT_DIR/meta.json; a tokenizer trained here (or reused) is OUT_DIR/bpe.json (tokenizer.py). Every source is streamed
(a JSON array too, record by record). Everything is written under temporary names, with OUT_DIR/progress.json
committed after each shard, and renamed at the end; meta.json comes last.
"""
import argparse
import codecs
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

from common import StopFlag, UserError, load_tokenizer, run_main, save_json
from tasks import EASY_TASKS, TASK_MAKERS, Difficulty, sample_problem
from tokenizer import (BPE_FILE, MAX_BPE, MIN_BPE, SPECIAL_TOKENS, TOKENIZERS, padded_vocab_size, read_bpe,
                       render_conversation, special_ids, train_bpe)


# ============================================================ the built-in reasoning dataset
# The problems, their traces and the held-out split are in tasks.py; here is only the mix: how many examples,
# which tasks how often, small talk, and the share answered without thinking.

REASONING_EXAMPLES = 50_000  # default size: ~3.7M byte tokens, about what the default train.py run sees
DIRECT_SHARE = 0.25          # problems answered without thinking (<|no_think|>) whatever they are (--direct easy: the
                             # problems that are not easy), so that eval.py's no-think column has data behind it
EASY_SHARE = 0.3             # --direct easy: the share of EASY_TASKS problems drawn easy (tasks.is_easy) ...
EASY_DIRECT = 0.8            # ... and answered directly this often (else with their trace, so forced thinking has data)
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


def reasoning_documents(n, seed, difficulty, direct="easy", task_weights=None):
    """n chat examples of the built-in dataset, deterministic for a seed. direct: which problems are answered
    without thinking: "easy" (most easy ones, tasks.is_easy, and DIRECT_SHARE of the others: left to choose, the
    model answers an easy problem directly and thinks on the rest) or "random" (DIRECT_SHARE of all, whatever they
    are: the choice means nothing)."""
    rng = random.Random(seed)
    mix = {k: w for k, w in (task_weights or TASK_WEIGHTS).items() if w > 0}  # task_weights: --task_weights's
    names, weights = list(mix), list(mix.values())
    for _ in range(n):
        task = rng.choices(names, weights)[0]
        if task == "smalltalk":
            says, answers = rng.choice(SMALLTALK)
            question, thinking, answer = rng.choice(says), None, rng.choice(answers)
        else:
            easy = (task in EASY_TASKS and rng.random() < EASY_SHARE) if direct == "easy" else None  # None: any
            question, thinking, answer = sample_problem(task, rng, difficulty, heldout=False, easy=easy)
            if rng.random() < (EASY_DIRECT if easy else DIRECT_SHARE):
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


@dataclass(frozen=True)
class Recipe:
    hub: str                # the Hugging Face dataset
    config: str             # its config (None: the default)
    convert: object         # record -> document
    json_array: str = None  # its one file when that is a single JSON array, read here record by record
    separator: str = None   # the line between documents in the dataset's own text dump (.txt)


RECIPES = {
    "openhermes": Recipe("teknium/OpenHermes-2.5", None, from_conversations, json_array="openhermes2_5.json"),
    "platypus": Recipe("garage-bAInd/Open-Platypus", None, platypus),
    "openthoughts": Recipe("open-thoughts/OpenThoughts-114k", None, openthoughts),
    "mot": Recipe("open-r1/Mixture-of-Thoughts", "all", from_messages),
    "gsm8k": Recipe("openai/gsm8k", "main", gsm8k),
    "tinystories": Recipe("roneneldan/TinyStories", None, plain_text, separator="<|endoftext|>"),
    "fineweb-edu": Recipe("HuggingFaceFW/fineweb-edu", "sample-10BT", plain_text),
}
LOCAL_FILES = (".txt", ".json", ".jsonl", ".parquet")


# ============================================================ sources of records
# Every reader yields (position, record): the position is where reading goes on after that record (a byte offset,
# a row, a stream's state), so --resume starts right after the last record written, without reading what came
# before. Readers stream: memory holds a chunk and a record, whatever the dataset's size.

def hub_records(name, at):
    """Records of a Hub dataset, streamed: nothing is downloaded ahead and no Arrow copy is written. A dataset that
    is one JSON array is read record by record here (datasets would parse the whole array first)."""
    recipe = RECIPES[name]
    try:
        if recipe.json_array:
            from huggingface_hub import HfFileSystem
            with HfFileSystem().open(f"datasets/{recipe.hub}/{recipe.json_array}", "rb", block_size=1 << 22) as f:
                yield from json_records(f, f"{recipe.hub}/{recipe.json_array}", at)
            return
        import datasets
        ds = datasets.load_dataset(recipe.hub, recipe.config, split="train", streaming=True)
        if at:
            ds.load_state_dict(at)
        for rec in ds:
            yield ds.state_dict(), rec
    except UserError:
        raise
    except Exception as e:  # offline, not found, gated, interrupted stream: one line, with a way out
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"cannot load {name} ({recipe.hub}) from the Hugging Face Hub ({type(e).__name__}: {why}); "
                        f"check the connection, or download its files and pass them as {name}=FILE") from None


def txt_documents(path, at, separator=None, max_chars=1 << 20):
    """Plain text: documents are separated by blank lines, or by separator lines (a dataset's own, e.g.
    TinyStories' <|endoftext|>). A document over max_chars is cut at a line, to bound memory."""
    lines, size, offset = [], 0, at or 0
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in itertools.chain(f, [b""]):  # b"": the end of the file ends the last document
            offset += len(raw)
            line = raw.decode("utf-8", errors="replace")
            ends = not raw or (line.strip() == separator if separator else not line.strip())
            if not ends:
                lines.append(line)
                size += len(line)
            if ends or size > max_chars:
                doc = "".join(lines).strip("\n")
                if doc.strip():
                    yield offset, doc
                lines, size = [], 0


class JsonText:
    """A JSON file's text read a chunk at a time: the next non-blank character and the next value, with the byte
    offset and line where reading stands (for resuming and for errors)."""
    CHUNK = 1 << 20

    def __init__(self, f, name, offset=0, line=1):
        f.seek(offset)
        self.f, self.name, self.offset, self.line = f, name, offset, line  # offset, line: those of text[i]
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.i, self.eof = "", 0, False

    def read_more(self, size):
        try:
            chunk = self.f.read(size)
            self.eof = not chunk
            self.text = self.text[self.i:] + self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError:
            raise UserError(f"{self.name}: not UTF-8 text after byte {self.offset}") from None
        self.i = 0

    def advance(self, j):
        consumed = self.text[self.i:j]
        self.offset += len(consumed.encode("utf-8"))
        self.line += consumed.count("\n")
        self.i = j

    def error(self, what):
        return UserError(f"{self.name}:{self.line}: invalid JSON at byte {self.offset} ({what})")

    def peek(self):
        """The next non-blank character, '' at the end of the file."""
        while True:
            self.advance(BLANKS.match(self.text, self.i).end())
            if self.i < len(self.text) or self.eof:
                return self.text[self.i:self.i + 1]
            self.read_more(self.CHUNK)

    def value(self):
        """The next JSON value. One the chunk ends inside (or a number it may end inside) reads more."""
        self.peek()
        while True:
            try:
                value, end = JSON.raw_decode(self.text, self.i)
                if end < len(self.text) or self.eof:
                    self.advance(end)
                    return value
            except json.JSONDecodeError as e:
                # where the chunk's end cuts a value, the error is within a few characters of that end, or at the
                # start of a string left open; anywhere else it is the file's
                if self.eof or (e.pos < len(self.text) - 16 and not e.msg.startswith("Unterminated string")):
                    raise self.error(e.msg) from None
            self.read_more(max(self.CHUNK, len(self.text) - self.i))  # doubling: a long record takes few reads


JSON, BLANKS = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")


def json_records(f, name, at=None):
    """Records of a JSON file (binary, seekable): one JSON array, or JSON values one after another (JSON lines),
    read one record at a time, each with where reading goes on after it."""
    text = JsonText(f, name, *((at["offset"], at["line"]) if at else ()))
    in_array = at["in_array"] if at else text.peek() == "["
    if in_array and not at:
        text.advance(text.i + 1)
    first = not at
    while True:
        c = text.peek()
        if (in_array and c == "]") or (not in_array and not c):
            return
        if in_array and not first:
            if c != ",":
                raise text.error("expected ',' or ']'" if c else "the array ends early: a truncated file?")
            text.advance(text.i + 1)
        rec, first = text.value(), False
        yield {"offset": text.offset, "line": text.line, "in_array": in_array}, rec


def file_records(path, at):
    """Records of a local .json (an array or JSON lines) / .jsonl / .parquet file; invalid JSON is an error."""
    if path.endswith(".parquet"):
        yield from parquet_records(path, at)
        return
    with open(path, "rb") as f:
        yield from json_records(f, path, at)


def parquet_records(path, at):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        group, position = 0, 0  # resuming starts at the row group that holds the next record
        while group < pf.num_row_groups and position + pf.metadata.row_group(group).num_rows <= (at or 0):
            position += pf.metadata.row_group(group).num_rows
            group += 1
        for batch in pf.iter_batches(batch_size=1024, row_groups=range(group, pf.num_row_groups)):
            for rec in batch.to_pylist():
                position += 1
                if position > (at or 0):
                    yield position, rec
    except Exception as e:
        raise UserError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from None


def numbered(records, at):
    """Records whose position is their count (the built-in generator: it regenerates and skips what was written)."""
    for n, rec in enumerate(records, 1):
        if n > (at or 0):
            yield n, rec


@dataclass
class Source:
    name: str
    read: object     # position (None: the beginning) -> iterator of (position, record)
    convert: object  # record -> document
    total: int = None


def open_source(spec, args):
    """A dataset argument -> Source: 'reasoning', a recipe name, a local file, or RECIPE=FILE."""
    recipe, _, path = spec.partition("=") if "=" in spec else (None, "", spec)
    if spec == "reasoning":
        n = args.max_samples or REASONING_EXAMPLES
        return Source("reasoning", lambda at: numbered(reasoning_documents(n, args.seed, args.difficulty,
                                                                           args.direct, args.task_weights), at),
                      as_is, n)
    if recipe is None and spec in RECIPES:
        return Source(spec, lambda at: hub_records(spec, at), RECIPES[spec].convert, args.max_samples)
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} in {spec!r}: known recipes are {', '.join(RECIPES)}")
    if not path.endswith(LOCAL_FILES):
        raise UserError(f"unknown dataset {spec!r}: use reasoning, {', '.join(RECIPES)}, a local "
                        f"{'/'.join(LOCAL_FILES)} file, or RECIPE=FILE")
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    name = recipe or os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".txt"):
        separator = RECIPES[recipe].separator if recipe else None
        return Source(name, lambda at: txt_documents(path, at, separator), as_is, args.max_samples)
    return Source(name, lambda at: file_records(path, at), RECIPES[recipe].convert if recipe else local_record,
                  args.max_samples)


def as_is(doc):  # the built-in dataset and .txt files yield documents already
    return doc


# ============================================================ tokenize and write

def encode_chunk(items, enc, key):
    """(position, document or error) items -> (position, (ids uint16, mask uint8, val draw, chat?) or an error).
    Runs in worker threads: tiktoken releases the GIL while it encodes."""
    sp = special_ids(enc)
    bos, eos = sp["<|bos|>"], sp["<|eos|>"]
    out = []
    for position, doc in items:
        try:
            if isinstance(doc, Exception):
                out.append((position, doc))
                continue
            if isinstance(doc, str):
                ids = np.array([bos] + enc.encode_ordinary(doc) + [eos], dtype=np.uint16)
                mask = np.ones(len(ids), dtype=np.uint8)
                mask[0] = 0
            else:
                ids, mask = render_conversation(doc, enc)
                ids, mask = np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8)
        except RECORD_ERRORS as e:
            out.append((position, e))
            continue
        out.append((position, (ids, mask, val_draw(doc, key), not isinstance(doc, str))))
    return out


def val_draw(doc, key):
    """A number in [0, 1) hashed from the document's text: below --val_fraction it is a val document. Identical
    documents always land on the same side, whatever the tokenizer (a BPE learns from train documents only)."""
    # a chat as the text it renders (role, content, thinking of each turn): 4 us a document, json.dumps took 10
    text = doc if isinstance(doc, str) else "\x1e".join(f"{m['role']}\x1f{m['content']}\x1f{m.get('thinking')}"
                                                         for m in doc)
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key).digest()
    return int.from_bytes(h, "little") / 2 ** 64


# ============================================================ the tokenizer: built in, trained here, or reused

def choose_tokenizer(args, sources, out):
    """The tokenizer: a built-in's name, or a trained BPE's dict, saved as OUT_DIR/bpe.json: trained now on the
    train documents (--tokenizer bpe:N), read from --tokenizer PATH, or (--resume) the one the run saved."""
    if args.tokenizer in TOKENIZERS:
        return args.tokenizer
    saved = os.path.join(out, BPE_FILE)
    try:
        if args.bpe_size is None:
            spec = reused_tokenizer(args.tokenizer)
        elif args.resume and os.path.exists(saved):
            spec = read_bpe(saved)
        else:
            spec = train_on_sample(sources, args)
    except ValueError as e:  # tokenizer.py's one-line messages
        raise UserError(str(e)) from None
    if isinstance(spec, dict):
        save_json(spec, saved)
    return spec


def reused_tokenizer(path):
    """--tokenizer PATH: a bpe.json, or a prepared folder, whose tokenizer may be a built-in one."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            name = json.load(f).get("tokenizer")
        if name in TOKENIZERS:
            return name
    except (OSError, ValueError, AttributeError):
        pass  # not a prepared folder: read_bpe says what is wrong
    return read_bpe(path)


def train_on_sample(sources, args):
    t0, sample = time.time(), {"bytes": 0}
    spec = train_bpe(bpe_texts(sources, args, sample), args.bpe_size)
    print(f"trained {spec['name']} on {sample['bytes'] / 1e6:.1f} MB of text in {time.time() - t0:.1f}s")
    if (n := len(spec["tokens"]) + len(SPECIAL_TOKENS)) < args.bpe_size:
        print(f"note: {n} tokens, not {args.bpe_size}: the sample had no more pairs to merge")
    return spec


def bpe_texts(sources, args, sample):
    """The text a BPE learns from: each source's train documents in the order prepare.py reads them (--max_samples
    too), up to an equal share of --bpe_sample_mb per source; a chat gives its messages' text, not its tags."""
    key, share = args.seed.to_bytes(8, "little", signed=True), args.bpe_sample_mb * 1e6 / len(sources)
    for src in sources:
        taken = 0
        for _, doc in documents(src, itertools.islice(src.read(None), args.max_samples)):
            if isinstance(doc, UserError):
                raise doc
            if isinstance(doc, Exception) or val_draw(doc, key) < args.val_fraction:
                continue
            texts = [doc] if isinstance(doc, str) else [m[k] for m in doc for k in ("content", "thinking") if m.get(k)]
            for text in texts:
                taken += len(text.encode("utf-8", "surrogatepass"))
                yield text
            if taken >= share:
                break
        sample["bytes"] += taken


class BinWriter:
    """Appends documents to OUT_DIR/{split}.bin (uint16 ids), {split}_mask.bin (uint8) and {split}_index.bin
    (uint64: where each document's <|bos|> is) under temporary names, about a million tokens at a time, so memory
    stays bounded. With sizes (a resumed run) the files are cut back to what the last commit counted."""
    SHARD_TOKENS = 1 << 20
    FILES = ("{}.bin", "{}_mask.bin", "{}_index.bin")

    def __init__(self, out, split, sizes=None):
        self.paths = [os.path.join(out, name.format(split)) for name in self.FILES]
        self.tokens, self.documents = (sizes["tokens"], sizes["documents"]) if sizes else (0, 0)
        self.ids, self.masks, self.starts, self.buffered = [], [], [], 0
        if not sizes:
            self.files = [open(p + ".tmp", "wb") for p in self.paths]
            return
        try:
            self.files = [open(p + ".tmp", "r+b") for p in self.paths]
        except FileNotFoundError as e:
            raise UserError(f"cannot resume: {e.filename} is missing; run without --resume to start over") from None
        for f, size in zip(self.files, (2 * self.tokens, self.tokens, 8 * self.documents)):
            if os.fstat(f.fileno()).st_size < size:
                raise UserError(f"cannot resume: {f.name} is shorter than its last commit; run without --resume")
            f.truncate(size)  # what a killed run wrote after its last commit
            f.seek(size)

    def add(self, ids, mask):
        self.ids.append(ids)
        self.masks.append(mask)
        self.starts.append(self.tokens)
        self.tokens += len(ids)
        self.buffered += len(ids)
        self.documents += 1

    def full(self):
        return self.buffered >= self.SHARD_TOKENS

    def flush(self):
        if self.ids:
            for f, array in zip(self.files, (np.concatenate(self.ids), np.concatenate(self.masks),
                                             np.array(self.starts, dtype=np.uint64))):
                array.tofile(f)
        for f in self.files:
            f.flush()
        self.ids, self.masks, self.starts, self.buffered = [], [], [], 0

    def sizes(self):
        return {"tokens": self.tokens, "documents": self.documents}

    def close(self):
        for f in self.files:
            f.close()

    def commit(self, with_mask):
        """Move the finished files into place; a dataset without chat drops its mask (and any stale one)."""
        for i, path in enumerate(self.paths):
            if i == 1 and not with_mask:
                for p in (path + ".tmp", path):
                    if os.path.exists(p):
                        os.remove(p)
            else:
                os.replace(path + ".tmp", path)

    def discard(self):
        for path in self.paths:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


RECORD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)  # a malformed record: skipped


def new_stats():
    return {"train_tokens": 0, "train_documents": 0, "val_tokens": 0, "val_documents": 0, "skipped": 0,
            "too_long": 0, "chat": False}


def skip(stats, error):
    stats["skipped"] += 1
    stats.setdefault("first_skip", f"{type(error).__name__}: {error}"[:200])


def documents(source, records):
    """(position, document), or (position, the error) for a malformed record, skipped in order by the writer; a bad
    file (UserError) comes last, so that everything read before it is written first."""
    try:
        for position, rec in records:
            try:
                doc = source.convert(rec)
                if not isinstance(doc, str) and not any(m["role"] == "assistant" for m in doc):
                    raise ValueError("no assistant turn")
            except RECORD_ERRORS as e:
                doc = e
            yield position, doc
    except UserError as e:
        yield None, e


def batched(iterable, n):
    it = iter(iterable)
    return iter(lambda: list(itertools.islice(it, n)), [])


def encode_in_parallel(items, enc, key, pool, workers):
    """encode_chunk over chunks of items in worker threads, results in order; a few chunks stay in flight so the
    main thread reads and writes while the workers encode, and memory stays bounded."""
    pending = deque()
    for chunk in batched(items, 256):
        pending.append(pool.submit(encode_chunk, chunk, enc, key))
        if len(pending) > 2 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def settings_of(args):
    """What decides prepare.py's output, as progress.json keeps it: a resumed run must have the same."""
    keys = ("datasets", "max_samples", "tokenizer", "bpe_sample_mb", "val_fraction", "seed", "max_doc_tokens",
            "direct")
    return json.loads(json.dumps({**{k: getattr(args, k) for k in keys}, "difficulty": asdict(args.difficulty)}))


class Progress:
    """OUT_DIR/progress.json, written after each shard: the bins' committed sizes, the source being read and the
    position after its last record written, and the statistics so far. --resume reads it and goes on from there."""

    def __init__(self, out, args):
        self.path, self.settings = os.path.join(out, "progress.json"), settings_of(args)
        self.source, self.records, self.at, self.stats, self.sizes = 0, 0, None, {}, None
        if not args.resume:
            if os.path.exists(self.path):
                os.remove(self.path)  # a fresh run: a stale progress file must not describe its files
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise UserError(f"nothing to resume in {out} (no progress.json): run without --resume") from None
        except (OSError, ValueError):
            raise UserError(f"{self.path} is unreadable: run without --resume to start over") from None
        if saved.get("settings") != self.settings:
            raise UserError(f"{out} holds an interrupted run of `{saved.get('command')}`: resume that command, or "
                            "run this one without --resume to start over")
        self.__dict__.update({k: saved[k] for k in ("source", "records", "at", "stats", "sizes")})

    def commit(self, writers, command):
        for w in writers.values():
            w.flush()
        save_json({"settings": self.settings, "command": command, "source": self.source, "records": self.records,
                   "at": self.at, "stats": self.stats, "sizes": {s: w.sizes() for s, w in writers.items()}}, self.path)

    def kept(self):
        return os.path.exists(self.path)

    def keep(self, writers, command):
        """Commit what was written before an interruption -> whether anything is kept for --resume."""
        if self.kept() or self.records:
            self.commit(writers, command)
        return self.kept()


def tokenize_all(sources, enc, writers, args, progress):
    """Every source's documents into the train or val writer, committing progress after each shard; returns
    per-source statistics. Ctrl-C, SIGTERM or a bad record commit what was written and stop."""
    key = args.seed.to_bytes(8, "little", signed=True)
    # Ctrl-C (or SIGTERM) is acted on between documents: a KeyboardInterrupt raised inside the pool's own locks
    # (pool.submit) could leave one of them held, and the pool's shutdown would then wait forever.
    stop = StopFlag()
    with ThreadPoolExecutor(args.num_proc) as pool:
        for index, src in enumerate(sources):
            if index < progress.source:
                continue  # finished before the interruption
            if index > progress.source:
                progress.source, progress.records, progress.at = index, 0, None
            stats = progress.stats.setdefault(src.name, new_stats())
            left = args.max_samples - progress.records if args.max_samples else None
            records = tqdm(itertools.islice(src.read(progress.at), left), desc=src.name, total=src.total,
                           initial=progress.records, unit=" docs", mininterval=1, disable=None)
            try:
                for position, item in encode_in_parallel(documents(src, records), enc, key, pool, args.num_proc):
                    if stop.signum:
                        break
                    write(item, stats, writers, args)
                    progress.records, progress.at = progress.records + 1, position
                    if any(w.full() for w in writers.values()):
                        progress.commit(writers, args.command)
            except UserError as e:
                if not progress.keep(writers, args.command):
                    raise
                raise UserError(f"{e}; what came before is kept ({progress.records:,} records of {src.name}): fix "
                                "that, then the same command with --resume goes on from there") from None
            if stop.signum and progress.keep(writers, args.command):
                raise KeyboardInterrupt("interrupted; what was prepared is kept: the same command with --resume goes "
                                        "on from there")
            if stop.signum:
                raise KeyboardInterrupt
            if stats["skipped"]:
                print(f"{src.name}: skipped {stats['skipped']} malformed records (first: {stats['first_skip']})")
    return progress.stats


def write(item, stats, writers, args):
    """One document into its split's writer, or counted as skipped (malformed) or too long."""
    if isinstance(item, UserError):
        raise item
    if isinstance(item, Exception):
        skip(stats, item)
        return
    ids, mask, u, chat = item
    if args.max_doc_tokens and len(ids) > args.max_doc_tokens:
        stats["too_long"] += 1
        return
    split = "val" if u < args.val_fraction else "train"
    writers[split].add(ids, mask)
    stats[f"{split}_tokens"] += len(ids)
    stats[f"{split}_documents"] += 1
    stats["chat"] |= chat


def prepare(args):
    sources = [open_source(spec, args) for spec in args.datasets]
    out = args.out_dir or os.path.join("data", "+".join(s.name for s in sources))
    new_dir = not os.path.exists(out)
    if args.resume and new_dir:
        raise UserError(f"nothing to resume: {out} does not exist; run without --resume")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    try:
        enc = load_tokenizer(choose_tokenizer(args, sources, out))
    except BaseException:
        if new_dir and not os.listdir(out):
            os.rmdir(out)
        raise
    if enc.n_vocab > 65536:
        raise UserError(f"tokenizer {enc.name} has {enc.n_vocab} tokens: ids above 65535 do not fit uint16")
    progress = Progress(out, args)
    writers = {split: BinWriter(out, split, progress.sizes and progress.sizes[split]) for split in ("train", "val")}
    try:
        stats = tokenize_all(sources, enc, writers, args, progress)
        for w in writers.values():
            w.flush()
        totals = {split: {"tokens": w.tokens, "documents": w.documents} for split, w in writers.items()}
        if not totals["train"]["documents"] or not totals["val"]["documents"]:
            n = totals["train"]["documents"] + totals["val"]["documents"]
            if os.path.exists(progress.path):
                os.remove(progress.path)  # nothing to resume either
            raise UserError("no documents to write (all records were malformed, empty or too long)" if n == 0 else
                            f"only {n} documents: the {'val' if n == totals['train']['documents'] else 'train'} "
                            f"split is empty; use more data or another --val_fraction")
    except BaseException:
        for w in writers.values():
            w.close()
            if not progress.kept():  # nothing committed: nothing to resume, nothing left behind
                w.discard()
        if new_dir and not os.listdir(out):
            os.rmdir(out)
        raise
    for w in writers.values():
        w.close()
    meta = finish(out, writers, stats, totals, enc, args, progress)
    seconds = time.time() - t0
    tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    print(f"wrote {out}: train {totals['train']['tokens']:,} tokens / {totals['train']['documents']:,} docs, "
          f"val {totals['val']['tokens']:,} tokens / {totals['val']['documents']:,} docs, tokenizer {enc.name} "
          f"(vocab {padded_vocab_size(enc)}), {seconds:.1f}s, {tokens / max(seconds, 1e-9):,.0f} tokens/s")
    return meta


def finish(out, writers, stats, totals, enc, args, progress):
    """Move the bins into place and write meta.json, last: until it exists, the folder reads as incomplete."""
    with_mask = any(s["chat"] for s in stats.values())
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for w in writers.values():
        w.commit(with_mask)
    if progress.kept():
        os.remove(progress.path)
    meta = {"tokenizer": enc.name, "vocab_size": padded_vocab_size(enc), "n_vocab": enc.n_vocab,
            "special_tokens": special_ids(enc), "dtype": "uint16", "mask": with_mask, "index": "uint64", **totals,
            "sources": {name: {k: v for k, v in s.items() if k != "chat"} for name, s in stats.items()},
            "val_fraction": args.val_fraction, "seed": args.seed, "max_doc_tokens": args.max_doc_tokens,
            "command": args.command}
    if enc.name not in TOKENIZERS:
        meta["tokenizer_file"] = BPE_FILE
    elif os.path.exists(os.path.join(out, BPE_FILE)):
        os.remove(os.path.join(out, BPE_FILE))  # a trained tokenizer of an earlier run: not this data's
    if "reasoning" in args.datasets:
        meta["difficulty"] = asdict(args.difficulty)
        meta["direct"], meta["task_weights"] = args.direct, args.task_weights
    save_json(meta, meta_path)
    return meta
# ============================================================ command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see python prepare.py --help)")


def parse_task_weights(text, parser):
    """--task_weights "digitsum=16,add=0" -> TASK_WEIGHTS changed by those."""
    weights = dict(TASK_WEIGHTS)
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in TASK_MAKERS and name != "smalltalk" or not weight.isdigit():
            parser.error(f"--task_weights {part!r}: expected TASK=W, W a whole number >= 0 and TASK one of "
                         f"{', '.join(TASK_MAKERS)}, smalltalk")
        weights[name] = int(weight)
    if not any(weights.values()):
        parser.error("--task_weights leaves no task with a weight above 0")
    return weights


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="*", default=["reasoning"],
                   help=f"reasoning (default), {', '.join(RECIPES)}, local {'/'.join(LOCAL_FILES)} files, "
                        "or RECIPE=FILE (a recipe applied to that dataset's downloaded file)")
    p.add_argument("--max_samples", type=int, help="records per dataset: only those are read")
    p.add_argument("--tokenizer", help="byte, gpt2, bpe:N (train an N-token BPE on the data), or a trained "
                   f"tokenizer to reuse ({BPE_FILE}, or a folder prepared with one); default: byte for reasoning "
                   "alone, else gpt2")
    p.add_argument("--bpe_sample_mb", type=float, default=100, help="bpe:N learns from this much of the text")
    p.add_argument("--out_dir", help="output folder (default: data/NAME)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer threads")
    p.add_argument("--max_doc_tokens", type=int, help="drop longer documents (counted per source in meta.json)")
    p.add_argument("--resume", action="store_true", help="go on with an interrupted run of the same command")
    p.add_argument("--seed", type=int, default=1337, help="generator seed (reasoning) and split seed")
    p.add_argument("--digits", type=int, default=Difficulty.digits, help="reasoning: add/sub/max digits")
    p.add_argument("--mul_digits", default="2x1", help="reasoning: AxB, up to A-digit times up to B-digit")
    p.add_argument("--list_len", type=int, default=Difficulty.list_len, help="reasoning: longest list")
    p.add_argument("--direct", choices=("easy", "random"), default="easy",
                   help="reasoning: answer most easy problems and a quarter of the rest without thinking, or a "
                        "random quarter of all")
    p.add_argument("--task_weights", default="", metavar="TASK=W,...",
                   help=f"reasoning: change the mix, e.g. digitsum=16 adds a task left out of it (tasks.EXTRA_TASKS), "
                        f"add=0 drops one; the default: {','.join(f'{k}={w}' for k, w in TASK_WEIGHTS.items())}")
    args = p.parse_args(argv)
    args.task_weights = parse_task_weights(args.task_weights, p)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be at least 1")
    if not 0 < args.val_fraction < 1:
        p.error("--val_fraction must be between 0 and 1")
    if args.num_proc < 1:
        p.error("--num_proc must be at least 1")
    if args.max_doc_tokens is not None and args.max_doc_tokens < 3:
        p.error("--max_doc_tokens must be at least 3 (<|bos|>, a token, <|eos|>)")
    if not re.fullmatch(r"[1-9]x[1-9]", args.mul_digits) or args.digits < 1 or args.list_len < 3:
        p.error("difficulty: --digits >= 1, --mul_digits like 2x1, --list_len >= 3")
    args.difficulty = Difficulty(args.digits, tuple(int(x) for x in args.mul_digits.split("x")), args.list_len)
    args.tokenizer = args.tokenizer or ("byte" if args.datasets == ["reasoning"] else "gpt2")
    bpe = re.fullmatch(r"bpe:(\d+)", args.tokenizer)
    args.bpe_size = int(bpe[1]) if bpe else None
    if args.bpe_size is not None and not MIN_BPE <= args.bpe_size <= MAX_BPE:
        p.error(f"--tokenizer {args.tokenizer}: a trained vocabulary has {MIN_BPE} to {MAX_BPE} tokens (uint16 ids)")
    if args.tokenizer not in TOKENIZERS and not bpe and not os.path.exists(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer}: use byte, gpt2, bpe:N, or the path of a {BPE_FILE} or of a folder "
                "prepared with one")
    if args.bpe_sample_mb <= 0:
        p.error("--bpe_sample_mb must be positive")
    args.command = shlex.join(["python", "prepare.py", *(str(a) for a in argv if a != "--resume")])
    return args


def main(argv=None):
    try:
        prepare(parse_args(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as e:
        sys.exit(f"prepare.py: {e.args[0] if e.args else 'interrupted; nothing was written'}")


if __name__ == "__main__":
    run_main(main)
