"""
The prepared data: prepare.py's token bins read on demand, training batches from them, and GSM8K-style files.
"""
import json
import os
import weakref

import numpy as np
import torch

from common import UserError
from tasks import final_number
from tokenizer import TOKENIZERS, read_bpe, tokenizer_name


class TokenFile:
    """One of prepare.py's bins (token ids or a loss mask) on disk: its length, and slices, each read with one
    pread into a new array. Never mapped: a memmap kept open for a run keeps every page it touched resident in
    the process (RssFile) until that is the whole corpus; read like this, the process holds one batch, whatever
    the file's size. The page cache still keeps what was read, but that is the kernel's to reclaim."""

    def __init__(self, path, dtype):
        self.dtype, self.path = np.dtype(dtype), path
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


def load_data(data_dir, splits=("train", "val"), documents=False):
    """meta.json and {split: (tokens, loss mask or None, document index or None)}: prepare.py's files as TokenFiles
    (read on demand); meta["tokenizer"] is a tokenizer spec (tokenizer.get_tokenizer), a trained one read whole.
    The index ({split}_index.bin: where each document's <|bos|> is) is read for documents=True (train.py's
    windows="documents") and required then."""
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
    if "tokenizer_file" in meta:  # a trained BPE: meta["tokenizer"] becomes its dict, which checkpoints keep
        meta["tokenizer"] = read_trained_tokenizer(data_dir, meta, fix)
    bins = {}
    for split in splits:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing: {fix} again")
        tokens = TokenFile(path, np.uint16)
        mask_path, index_path = (os.path.join(data_dir, f"{split}{end}") for end in ("_mask.bin", "_index.bin"))
        mask = TokenFile(mask_path, np.uint8) if os.path.isfile(mask_path) else None
        if mask is not None and len(mask) != len(tokens):
            raise UserError(f"{mask.path} has {len(mask)} entries for {len(tokens)} tokens: {fix} again")
        index = None
        if documents:  # read only when used
            if not os.path.isfile(index_path):
                raise UserError(f"{split}_index.bin is missing in {data_dir} (prepared before prepare.py indexed "
                                f"documents): {fix} again, or use windows=random")
            index = TokenFile(index_path, np.uint64)
            if len(index) != meta.get(split, {}).get("documents", len(index)):
                raise UserError(f"{index.path} has {len(index)} documents, meta.json says otherwise: {fix} again")
        bins[split] = (tokens, mask, index)
    return meta, bins


def read_trained_tokenizer(data_dir, meta, fix):
    try:
        spec = read_bpe(os.path.join(data_dir, meta["tokenizer_file"]))
    except ValueError as e:
        raise UserError(f"{e}; {fix} again") from None
    if spec["name"] != meta["tokenizer"]:
        raise UserError(f"{data_dir}'s data was prepared with {meta['tokenizer']} but its {meta['tokenizer_file']} is "
                        f"{spec['name']}: {fix} again")
    return spec


def check_tokenizer(meta, tokenizer, data_dir):
    """Data and model must share their tokenizer (a trained one's name is the hash of its tokens)."""
    ours, theirs = tokenizer_name(meta["tokenizer"]), tokenizer_name(tokenizer)
    if ours != theirs:
        fix = theirs if theirs in TOKENIZERS else "FOLDER (the data the model was trained on, with its bpe.json)"
        raise UserError(f"{data_dir} holds {ours} tokens but the checkpoint uses the {theirs} tokenizer: prepare "
                        f"the data with --tokenizer {fix}")


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


def random_starts(tokens, batch_size, block_size, generator=None, index=None):
    """batch_size random window starts in tokens, from torch's RNG (or generator). With a document index (load_data's
    third item: train.py's windows="documents"), each window starts at a random document's <|bos|>, among those a
    whole window fits after, and is filled with the documents that follow: no window starts inside a document."""
    if index is None:
        return torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    picks = torch.randint(count_below(index, len(tokens) - block_size), (batch_size,), generator=generator)
    return np.array([index[k:k + 1][0] for k in picks.tolist()], dtype=np.int64)


def count_below(index, limit):
    """How many entries of a sorted index are below limit: a binary search, one read per step."""
    lo, hi = 0, len(index)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if index[mid:mid + 1][0] < limit else (lo, mid)
    return lo


def to_device(batch, device):
    if device.startswith("cuda"):  # pinned host memory lets the copy overlap with compute
        return [t.pin_memory().to(device, non_blocking=True) for t in batch]
    return [t.to(device) for t in batch]


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
