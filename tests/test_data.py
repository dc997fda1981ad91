"""data.py: the prepared-data reader (TokenFile: read, never mapped), batches and their masked targets, and the
one-line errors of a folder prepare.py did not finish."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from common import UserError, save_json
from conftest import ROOT


def write_data(folder, tokens, mask=None, meta=None):
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
        if mask is not None:
            np.asarray(mask, dtype=np.uint8).tofile(os.path.join(folder, f"{split}_mask.bin"))
    save_json(meta or {"tokenizer": "byte", "vocab_size": 320}, os.path.join(folder, "meta.json"))


def test_load_data_and_consecutive_windows(tmp_path):
    tokens, mask = np.arange(100) % 300, (np.arange(100) % 3 != 0)
    write_data(tmp_path, tokens, mask)
    meta, bins = data.load_data(str(tmp_path))
    assert meta["vocab_size"] == 320 and set(bins) == {"train", "val"}
    x, y = data.get_batch(*bins["val"][:2], starts=[0, 10, 20], block_size=10)  # the val loss's consecutive windows
    assert x.dtype == y.dtype == torch.int64 and x.shape == (3, 10)
    assert x.flatten().tolist() == list(range(30))
    expected = [t if t % 3 else -1 for t in range(1, 31)]  # targets whose mask is 0 are ignored (-1)
    assert y.flatten().tolist() == expected


@pytest.mark.parametrize("breakage, message", [
    ("no meta", "meta.json is missing): run `python prepare.py [DATASET ...] --out_dir"),
    ("bad meta", "has no tokenizer / vocab_size"),
    ("no val", "val.bin is missing"),
    ("short mask", "entries for 100 tokens"),
])
def test_load_data_errors_say_what_to_run(tmp_path, breakage, message):
    write_data(tmp_path, np.arange(100), np.ones(100))
    if breakage == "no meta":
        os.remove(tmp_path / "meta.json")
    elif breakage == "bad meta":
        save_json({"tokens": 1}, tmp_path / "meta.json")
    elif breakage == "no val":
        os.remove(tmp_path / "val.bin")
    else:
        np.ones(99, dtype=np.uint8).tofile(tmp_path / "train_mask.bin")
    with pytest.raises(UserError, match=re.escape(message)):
        data.load_data(str(tmp_path))


def test_document_windows_start_at_a_document(reasoning_data):
    """windows="documents": every window starts at a <|bos|> that prepare.py indexed, any document a whole window
    fits after can be drawn, and the same generator draws the same windows."""
    meta, bins = data.load_data(reasoning_data, ("val",), documents=True)
    tokens, mask, index = bins["val"]
    bos, T = meta["special_tokens"]["<|bos|>"], 256
    starts = data.random_starts(tokens, 4000, T, torch.Generator().manual_seed(0), index)
    x, _ = data.get_batch(tokens, mask, starts[:64], T)
    assert (x[:, 0] == bos).all()
    all_starts = index[0:len(index)].astype(np.int64)
    fitting = all_starts[all_starts < len(tokens) - T]
    assert set(starts.tolist()) <= set(fitting.tolist()) and len(set(starts.tolist())) > 0.8 * len(fitting)
    assert np.array_equal(starts, data.random_starts(tokens, 4000, T, torch.Generator().manual_seed(0), index))
    for limit in (0, 1, 257, int(fitting[-1]), int(fitting[-1]) + 1, len(tokens)):
        assert data.count_below(index, limit) == np.searchsorted(all_starts, limit)
    assert data.load_data(reasoning_data, ("val",))[1]["val"][2] is None  # windows=random never reads it


def test_document_windows_need_the_index(tmp_path):
    write_data(tmp_path, np.arange(100))
    with pytest.raises(UserError, match=r"val_index.bin is missing in .* \(prepared before prepare.py indexed "
                                        r"documents\): run .* again, or use windows=random"):
        data.load_data(str(tmp_path), ("val",), documents=True)


def test_token_file_slices_like_an_array(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    f = data.TokenFile(str(tmp_path / "train.bin"), np.uint16)
    assert len(f) == 1000
    for s in (slice(0, 10), slice(990, 1010), slice(-5, None), slice(500, 400), slice(None), slice(2000, 2010)):
        assert np.array_equal(f[s], tokens[s])
    with pytest.raises(TypeError, match="contiguous slices only"):
        f[[1, 2]]
    (tmp_path / "val.bin").write_bytes(b"")  # np.memmap refuses a 0-byte file; here it is an empty split
    empty = data.TokenFile(str(tmp_path / "val.bin"), np.uint16)
    assert len(empty) == 0 and len(empty[0:10]) == 0


def rss_file():
    """Bytes of mapped files resident in this process (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def rss_file_growth(data_dir):
    """{reader: RssFile growth in bytes} while get_batch reads windows that touch every page of data_dir's
    train.bin and train_mask.bin, in random order: through load_data, then through memmaps kept open for the
    whole run (the reader before issue #16). Run in a fresh process (test_batches_keep_no_pages_of_the_bins)."""
    _, bins = data.load_data(data_dir, splits=("train",))
    kept_open = tuple(np.memmap(os.path.join(data_dir, name), dtype, mode="r")
                      for name, dtype in (("train.bin", np.uint16), ("train_mask.bin", np.uint8)))
    T = 2047  # windows of 2048 tokens: a 4 KiB page each, so starts one window apart touch every page
    starts = np.random.default_rng(0).permutation(np.arange(0, len(kept_open[0]) - T, T + 1))
    growth = {}
    for reader, (tokens, mask) in (("load_data", bins["train"][:2]), ("memmap", kept_open)):
        data.get_batch(tokens, mask, starts[:64], T)  # warm up: libraries loaded on first use are not the data
        before = rss_file()
        for i in range(0, len(starts), 64):
            data.get_batch(tokens, mask, starts[i:i + 64], T)
        growth[reader] = rss_file() - before
    return growth


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads RssFile from Linux's /proc/self/status")
def test_batches_keep_no_pages_of_the_bins(tmp_path):
    # Sparse files, written at once: their holes read as zeros, yet a mapped page of a hole is resident
    # (RssFile) like any other, so a reader that keeps its map open grows by the files' size.
    n_tokens = 128 << 20
    for name, size in (("train.bin", 2 * n_tokens), ("train_mask.bin", n_tokens)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    save_json({"tokenizer": "byte", "vocab_size": 320}, tmp_path / "meta.json")
    code = f"import json, test_data; print(json.dumps(test_data.rss_file_growth({str(tmp_path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    for name in ("train.bin", "train_mask.bin"):
        os.remove(tmp_path / name)  # and with them the page cache their zeros took
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.splitlines()[-1])
    # The bound: load_data's reader maps nothing, so anything it gains is a library loaded late, not data. 64 MB
    # is a quarter of train.bin, while the memmap kept open holds nearly all 384 MB of the two files.
    assert growth["memmap"] > 0.75 * 3 * n_tokens, growth
    assert growth["load_data"] < 64 << 20, growth
