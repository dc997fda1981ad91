"""prepare.py: the built-in dataset as written (masks, splits, the mix of tasks, nothing held out), round trips
through the .bin files, every recipe on a local fixture in its dataset's real schema, local files, and the command
line's errors and interruptions. The tasks themselves (answers, traces, held-out split) are tests/test_tasks.py's."""
import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from common import UserError
from conftest import BYTE, ROOT, needs_gpt2_ranks, run_script
from prepare import REASONING_EXAMPLES, main, reasoning_documents
from tasks import EASY_TASKS, TASKS, Difficulty, heldout_items, sample_problem
from data import load_data
from tokenizer import GPT2_RANKS_ENV, get_tokenizer, read_bpe, render_conversation, train_bpe

BOS, EOS, THINK, NO_THINK, CLOSE_ASSISTANT = 256, 257, 265, 267, 264


# ---------------------------------------------------------------------------------- helpers

def read_split(out, split, enc=BYTE):
    """The documents of a split as (ids, mask) lists, cut at <|eos|>."""
    eos = enc.encode_single_token("<|eos|>")
    ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16).tolist()
    mask_path = os.path.join(out, f"{split}_mask.bin")
    mask = np.fromfile(mask_path, dtype=np.uint8).tolist() if os.path.exists(mask_path) else [None] * len(ids)
    assert len(mask) == len(ids)
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eos:
            docs.append((ids[start:i + 1], mask[start:i + 1]))
            start = i + 1
    assert start == len(ids), "the bin must end with a complete document"
    return docs


def expected_mask(ids):
    """Independent statement of the mask: 1 from <|think|>/<|no_think|> through <|/assistant|>, and <|eos|>."""
    mask, learning = [], False
    for t in ids:
        if t in (THINK, NO_THINK):
            learning = True
        mask.append(int(learning or t == EOS))
        if t == CLOSE_ASSISTANT:
            learning = False
    return mask


def chat_of(ids):
    """(question, thinking or None, answer) from a rendered single-turn byte document."""
    text = BYTE.decode(ids)
    m = re.fullmatch(r"<\|bos\|><\|user\|>(.*)<\|/user\|>(?:<\|think\|>(.*)<\|/think\|>|<\|no_think\|>)"
                     r"<\|assistant\|>(.*)<\|/assistant\|><\|eos\|>", text, re.S)
    assert m, text
    return m.groups()


# ---------------------------------------------------------------------------------- the built-in dataset

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python prepare.py` with no arguments, from a fresh folder, offline."""
    cwd = tmp_path_factory.mktemp("fresh")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py")], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return cwd / "data" / "reasoning", proc


def test_default_run_is_offline_and_complete(default_run):
    out, proc = default_run
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train_index.bin", "train_mask.bin", "val.bin",
                                       "val_index.bin", "val_mask.bin"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 320 and meta["mask"] is True
    assert meta["special_tokens"]["<|think|>"] == THINK
    for split in ("train", "val"):
        assert meta[split]["tokens"] == os.path.getsize(out / f"{split}.bin") // 2 > 0
        assert meta[split]["tokens"] == meta["sources"]["reasoning"][f"{split}_tokens"]
        assert meta[split]["documents"] == len(read_split(out, split))
    assert 2_000_000 < meta["train"]["tokens"] + meta["val"]["tokens"] < 8_000_000  # "a few MB of tokens"
    assert meta["command"] == "python prepare.py" and meta["difficulty"] == {"digits": 3, "mul_digits": [2, 1],
                                                                              "list_len": 5}
    assert "wrote" in proc.stdout and "tokens/s" in proc.stdout


def test_round_trip_masks_and_splits(default_run):
    out, _ = default_run
    documents = {}
    for split in ("train", "val"):
        documents[split] = {tuple(ids) for ids, _ in read_split(out, split)}
        for ids, mask in read_split(out, split):
            assert mask == expected_mask(ids)
            assert len(ids) <= 256  # fits the default context
            chat_of(ids)  # one user turn, then one assistant turn with or without a think block
    assert not documents["train"] & documents["val"], "a document is in both splits"


def test_the_mix_of_tasks(default_run, monkeypatch):
    """What the default data is made of (--direct easy): every task with and without thinking, most easy problems
    answered directly and a quarter of the others. Which task asked a question, and whether it was drawn easy, is
    noted while the same documents are generated again (answers and traces are checked in tests/test_tasks.py)."""
    task_of = {}

    def recording(task, rng, difficulty, heldout=False, easy=None):  # tasks.sample_problem, noting who asked what
        assert not heldout  # nothing held out is ever trained on
        problem = sample_problem(task, rng, difficulty, heldout, easy)
        task_of[problem[0]] = task, bool(easy)
        return problem
    monkeypatch.setattr(prepare, "sample_problem", recording)
    collections.deque(reasoning_documents(REASONING_EXAMPLES, 1337, Difficulty()), maxlen=0)
    out, _ = default_run
    counts = collections.Counter()
    for ids, _ in read_split(out, "train") + read_split(out, "val"):
        question, thinking, _ = chat_of(ids)
        if question in task_of:
            counts[(*task_of[question], thinking is None)] += 1
        else:  # small talk never thinks
            assert thinking is None
            counts["smalltalk"] += 1

    def direct_share(task, easy):
        return counts[task, easy, True] / (counts[task, easy, True] + counts[task, easy, False])
    for task in TASKS:  # every task's harder problems appear both with thinking and without
        assert counts[task, False, False] > 3 * counts[task, False, True] / 2 > 100
        assert 0.2 < direct_share(task, False) < 0.3
    for task in EASY_TASKS:  # and its easy ones mostly without, so that a model left to choose skips thinking there
        assert 0.75 < direct_share(task, True) < 0.85 and counts[task, True, False] > 50
    assert counts["smalltalk"] > 500


def test_direct_random_answers_a_quarter_of_all_problems_without_thinking(tmp_path):
    """--direct random: whatever the problem, a quarter without thinking; easy ones (one-digit operands, or two
    numbers to compare, judged from the text alone) are no more likely to skip it than the rest."""
    def easy(question):
        nums = [int(n) for n in re.findall(r"\d+", question)]
        if question.startswith("Sort") or "letter" in question or "'s are in" in question:
            return False
        return len(nums) == 2 and ("larg" in question or max(nums) < 10)
    smalltalk = {say for says, _ in prepare.SMALLTALK for say in says}
    main(["--max_samples", "3000", "--direct", "random", "--out_dir", str(tmp_path)])
    assert json.loads((tmp_path / "meta.json").read_text())["direct"] == "random"
    counts = collections.Counter()
    for ids, _ in read_split(tmp_path, "train") + read_split(tmp_path, "val"):
        question, thinking, _ = chat_of(ids)
        if question not in smalltalk:
            counts[easy(question), thinking is None] += 1
    for is_easy in (True, False):
        assert 0.15 < counts[is_easy, True] / (counts[is_easy, True] + counts[is_easy, False]) < 0.35


def test_task_weights_change_the_mix(tmp_path):
    """--task_weights digitsum=16,word=0: a task left out of the default mix comes in (about half the documents),
    one is dropped, and meta.json records the mix."""
    main(["--max_samples", "2000", "--task_weights", "digitsum=16,word=0", "--out_dir", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["task_weights"] == {**prepare.TASK_WEIGHTS, "digitsum": 16, "word": 0}
    questions = [chat_of(ids)[0] for ids, _ in read_split(tmp_path, "train") + read_split(tmp_path, "val")]
    digitsum = sum("digits of" in q for q in questions) / len(questions)
    assert 0.4 < digitsum < 0.6 and not any("How many" in q and "have" in q for q in questions)
    for bad in ("digitsum", "nosuch=3", "add=-1", "add=0,sub=0,mul=0,sort=0,count=0,max=0,word=0,smalltalk=0"):
        line = one_line_error(run_script("prepare.py", "--task_weights", bad, "--out_dir", tmp_path / "x"))
        assert "--task_weights" in line


def test_bins_reproduce_the_rendered_documents(tmp_path):
    main(["reasoning", "--max_samples", "3000", "--seed", "7", "--out_dir", str(tmp_path)])
    rendered = [tuple(render_conversation(d, BYTE)[0]) for d in reasoning_documents(3000, 7, Difficulty())]
    train, val = ([tuple(ids) for ids, _ in read_split(tmp_path, split)] for split in ("train", "val"))
    assert collections.Counter(train + val) == collections.Counter(rendered)
    assert train == [d for d in rendered if d not in set(val)]  # written in order, split by document


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        main(["--max_samples", "2000", "--seed", "5", "--out_dir", str(tmp_path / name)])
    main(["--max_samples", "2000", "--seed", "6", "--out_dir", str(tmp_path / "c"), "--num_proc", "1"])
    for f in ("train.bin", "val.bin", "train_mask.bin", "val_mask.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "train.bin").read_bytes() != (tmp_path / "c" / "train.bin").read_bytes()


def test_heldout_questions_are_never_in_the_data(default_run):
    out, _ = default_run
    trained = {chat_of(ids)[0] for split in ("train", "val") for ids, _ in read_split(out, split)}
    assert not trained & {messages[0]["content"] for _, messages, _ in heldout_items(700)}


def test_difficulty_flags_reach_the_generator(tmp_path):
    main(["--max_samples", "1500", "--digits", "5", "--mul_digits", "3x2", "--list_len", "7", "--out_dir",
          str(tmp_path)])
    documents = reasoning_documents(1500, 1337, Difficulty(digits=5, mul_digits=(3, 2), list_len=7))
    rendered = [tuple(render_conversation(d, BYTE)[0]) for d in documents]
    written = [tuple(ids) for split in ("train", "val") for ids, _ in read_split(tmp_path, split)]
    assert collections.Counter(written) == collections.Counter(rendered)
    assert json.loads((tmp_path / "meta.json").read_text())["difficulty"]["mul_digits"] == [3, 2]


# ---------------------------------------------------------------------------------- recipes and local files
# One or two records per Hub dataset, in that dataset's real schema, with what each must become.

OT_ANSWER = ("<|begin_of_thought|>\n\nSo 2 apples plus 3.\n\n<|end_of_thought|>\n\n"
             "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>")
FIXTURES = {
    "openhermes": (
        [{"conversations": [{"from": "system", "value": "You are helpful.", "weight": None},
                            {"from": "human", "value": "Name a color.", "weight": None},
                            {"from": "gpt", "value": "Blue.", "weight": 1.0}],
          "source": "airoboros2.2", "category": "general"}],
        [[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a color."},
          {"role": "assistant", "content": "Blue."}]]),
    "platypus": (
        [{"input": "", "output": "Paris.", "instruction": "Capital of France?", "data_source": "scienceqa"},
         {"input": "3, 1, 2", "output": "1, 2, 3", "instruction": "Sort the list.", "data_source": "airoboros"}],
        [[{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
         [{"role": "user", "content": "Sort the list.\n\n3, 1, 2"}, {"role": "assistant", "content": "1, 2, 3"}]]),
    "openthoughts": (
        [{"system": "Your role as an assistant involves thoroughly exploring questions ...",
          "conversations": [{"from": "user", "value": "What is 2 apples plus 3 apples?"},
                            {"from": "assistant", "value": OT_ANSWER}]}],
        [[{"role": "user", "content": "What is 2 apples plus 3 apples?"},
          {"role": "assistant", "content": "\\boxed{5}", "thinking": "So 2 apples plus 3."}]]),
    "mot": (
        [{"messages": [{"content": "What is 6*7?", "role": "user"},
                       {"content": "<think>\n6*7 is 42.\n</think>\n\nThe answer is 42.", "role": "assistant"}],
          "num_tokens": 20, "source": "open-r1/OpenR1-Math-220k"}],
        [[{"role": "user", "content": "What is 6*7?"},
          {"role": "assistant", "content": "The answer is 42.", "thinking": "6*7 is 42."}]]),
    "gsm8k": (
        [{"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
          "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"}],
        [[{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in total?"},
          {"role": "assistant", "content": "72",
           "thinking": "In May she sold 48/2 = 24 clips.\nIn total 48+24 = 72."}]]),
    "tinystories": (
        [{"text": "Once upon a time, there was a little red ball."}, {"text": "Tom liked to run.\n\nHe ran fast."}],
        ["Once upon a time, there was a little red ball.", "Tom liked to run.\n\nHe ran fast."]),
    "fineweb-edu": (
        [{"text": "Photosynthesis turns light into sugar.", "id": "<urn:uuid:1>", "dump": "CC-MAIN-2024-10",
          "url": "https://example.org/a", "file_path": "s3://x", "language": "en", "language_score": 0.97,
          "token_count": 7, "score": 3.1, "int_score": 3}],
        ["Photosynthesis turns light into sugar."]),
}


def write_parquet(path, records):
    columns = {k: [r.get(k) for r in records] for r in records for k in r}  # every row's keys, not the first's
    pq.write_table(pa.Table.from_pydict(columns), path)
    return str(path)


def docs_of(spec, tmp_args=()):
    """The documents a dataset argument yields, and how many of its records were skipped as malformed."""
    args = prepare.parse_args([spec, *tmp_args])
    source = prepare.open_source(spec, args)
    items = [doc for _, doc in prepare.documents(source, itertools.islice(source.read(None), args.max_samples))]
    return [d for d in items if not isinstance(d, Exception)], {"skipped": sum(isinstance(d, Exception) for d in items)}


def normalized(doc):
    if isinstance(doc, str):
        return doc
    return [{k: v for k, v in m.items() if not (k == "thinking" and v is None)} for m in doc]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_recipe_on_local_file_in_real_schema(tmp_path, name):
    records, expected = FIXTURES[name]
    docs, stats = docs_of(f"{name}={write_parquet(tmp_path / 'train-00000-of-00001.parquet', records)}")
    assert [normalized(d) for d in docs] == expected and stats["skipped"] == 0


@pytest.mark.parametrize("name", ["gsm8k", "fineweb-edu"])
def test_recipe_from_the_hub_always_streams(monkeypatch, name):
    """Sampled or not, a Hub dataset is streamed: no download ahead, no Arrow copy of it on disk."""
    import datasets
    calls = []

    def fake_load_dataset(path, config=None, **kwargs):  # stands in for the Hub: same records, same call
        calls.append((path, config, kwargs))
        return datasets.Dataset.from_list(FIXTURES[name][0] * 5).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs, _ = docs_of(name, ["--max_samples", "3"])
    assert [normalized(d) for d in docs] == (FIXTURES[name][1] * 3)[:3]
    recipe = prepare.RECIPES[name]
    assert calls == [(recipe.hub, recipe.config, {"split": "train", "streaming": True})]
    assert len(docs_of(name)[0]) == len(FIXTURES[name][1] * 5) and calls[1] == calls[0]


def test_hub_stream_resumes_from_its_own_state(monkeypatch):
    import datasets
    records = [{"text": f"Document number {i}."} for i in range(50)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(records)
                        .to_iterable_dataset(num_shards=4))
    read = list(prepare.hub_records("fineweb-edu", None))
    assert [rec for _, rec in read] == records
    for k in (0, 11, 12, 49):
        position = json.loads(json.dumps(read[k][0]))  # as progress.json keeps it
        assert [rec for _, rec in prepare.hub_records("fineweb-edu", position)] == records[k + 1:]


def test_hub_json_array_is_read_from_its_file_record_by_record(monkeypatch, tmp_path):
    """OpenHermes-2.5 is one JSON array: datasets would parse all 1.94 GB before the first record. It is read
    from the Hub's file instead, only as far as --max_samples needs (what follows here is not even JSON)."""
    import huggingface_hub
    rows = [{"conversations": [{"from": "human", "value": f"Question {i} é"}, {"from": "gpt", "value": f"A{i}"}]}
            for i in range(5)]
    path = tmp_path / "openhermes2_5.json"
    path.write_text(json.dumps(rows)[:-1] + ", this is not JSON")
    opened = []

    class FakeHubFiles:  # HfFileSystem's open: a seekable binary file
        def open(self, name, mode, block_size=None):
            opened.append(name)
            return open(path, mode)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeHubFiles)
    docs, _ = docs_of("openhermes", ["--max_samples", "4"])
    assert [d[0]["content"] for d in docs] == [f"Question {i} é" for i in range(4)]
    assert opened == ["datasets/teknium/OpenHermes-2.5/openhermes2_5.json"]


def test_all_recipes_mixed_into_one_output(tmp_path):
    specs, expected = [], collections.Counter()
    for name, (records, docs) in FIXTURES.items():
        specs.append(f"{name}={write_parquet(tmp_path / f'{name}.parquet', records)}")
        for doc in docs:
            if isinstance(doc, str):
                expected[tuple([BOS] + BYTE.encode_ordinary(doc) + [EOS])] += 1
            else:
                expected[tuple(render_conversation(doc, BYTE)[0])] += 1
    out = tmp_path / "mixed"
    main([*specs, "--tokenizer", "byte", "--val_fraction", "0.3", "--out_dir", str(out)])
    meta = json.loads((out / "meta.json").read_text())
    got = read_split(out, "train") + read_split(out, "val")
    assert collections.Counter(tuple(ids) for ids, _ in got) == expected
    for ids, mask in got:
        is_chat = ids[1] in (259, 261)  # <|system|> or <|user|>
        assert mask == (expected_mask(ids) if is_chat else [0] + [1] * (len(ids) - 1))
    assert set(meta["sources"]) == set(FIXTURES)
    assert all(s["train_documents"] + s["val_documents"] == len(FIXTURES[n][1]) for n, s in meta["sources"].items())


def test_local_files_of_every_shape(tmp_path):
    (tmp_path / "notes.txt").write_text("First paragraph,\ntwo lines.\n\n\n Second one.\n\nThird <|eos|> one.\n")
    rows = [{"question": "Q1 <|think|>", "answer": "A1"},
            {"question": "Q2", "answer": "A2", "thinking": "because"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hm</think>Yo"}]},
            {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hello"}]},
            {"text": "Plain text record."}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    write_parquet(tmp_path / "qa.parquet", rows[:2])
    assert docs_of(str(tmp_path / "notes.txt"))[0] == ["First paragraph,\ntwo lines.", " Second one.",
                                                       "Third <|eos|> one."]
    want = [[{"role": "user", "content": "Q1 <|think|>"}, {"role": "assistant", "content": "A1"}],
            [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "thinking": "because"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "thinking": "hm"}],
            [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hello"}],
            "Plain text record."]
    for name in ("qa.jsonl", "qa.json"):
        assert [normalized(d) for d in docs_of(str(tmp_path / name))[0]] == want
    assert [normalized(d) for d in docs_of(str(tmp_path / "qa.parquet"))[0]] == want[:2]
    # through the bins: the literal "<|think|>" in the question stays text
    main([str(tmp_path / "qa.jsonl"), str(tmp_path / "notes.txt"), "--tokenizer", "byte", "--val_fraction", "0.4",
          "--out_dir", str(tmp_path / "out")])
    docs = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    q1 = [ids for ids, _ in docs if BYTE.decode(ids).startswith("<|bos|><|user|>Q1")]
    assert len(docs) == 8 and len(q1) == 1 and q1[0].count(THINK) == 0 and q1[0].count(NO_THINK) == 1


def test_malformed_records_are_skipped_and_counted(tmp_path, capsys):
    good = [{"question": f"What is {i}?", "answer": str(i)} for i in range(30)]
    bad = [{"question": "no answer"}, {"messages": [{"role": "wizard", "content": "x"}]}, [1, 2], "str",
           {"messages": [{"role": "user", "content": "only a question"}]}]
    (tmp_path / "mix.jsonl").write_text("\n".join(json.dumps(r) for r in good[:15] + bad + good[15:]))
    main([str(tmp_path / "mix.jsonl"), "--tokenizer", "byte", "--out_dir", str(tmp_path / "o"), "--val_fraction",
          "0.2"])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["sources"]["mix"]["skipped"] == 5
    assert meta["train"]["documents"] + meta["val"]["documents"] == 30
    assert "mix: skipped 5 malformed records" in capsys.readouterr().out


def test_text_only_output_has_no_mask_and_drops_a_stale_one(tmp_path):
    out = tmp_path / "o"
    main(["--max_samples", "300", "--out_dir", str(out)])
    assert (out / "train_mask.bin").exists()
    (tmp_path / "story.txt").write_text("\n\n".join(f"Story number {i} about a cat." for i in range(200)))
    main([str(tmp_path / "story.txt"), "--tokenizer", "byte", "--out_dir", str(out)])
    assert not (out / "train_mask.bin").exists() and not (out / "val_mask.bin").exists()
    assert json.loads((out / "meta.json").read_text())["mask"] is False
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_num_proc_does_not_change_the_output(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7 + 1)
                       for i in range(3000))
    (tmp_path / "t.txt").write_text(text)
    for p in ("1", "2"):
        main([str(tmp_path / "t.txt"), "--tokenizer", "byte", "--num_proc", p, "--out_dir", str(tmp_path / p)])
    assert (tmp_path / "1" / "train.bin").read_bytes() == (tmp_path / "2" / "train.bin").read_bytes()
    assert (tmp_path / "1" / "val.bin").read_bytes() == (tmp_path / "2" / "val.bin").read_bytes()


def test_vocabulary_over_uint16_is_refused(monkeypatch, tmp_path, capsys):
    import tiktoken
    big = tiktoken.Encoding("big", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={"<|huge|>": 70000})
    monkeypatch.setattr(prepare, "load_tokenizer", lambda name: big)
    with pytest.raises(UserError) as e:
        main(["--max_samples", "10", "--out_dir", str(tmp_path / "o")])
    assert "65535" in str(e.value) and not (tmp_path / "o" / "train.bin").exists()


@needs_gpt2_ranks
def test_gpt2_bins(tmp_path):
    main(["--max_samples", "400", "--tokenizer", "gpt2", "--out_dir", str(tmp_path)])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50304 and meta["special_tokens"]["<|bos|>"] == 50257
    enc = get_tokenizer("gpt2")
    docs = read_split(tmp_path, "train", enc) + read_split(tmp_path, "val", enc)
    assert len(docs) == 400
    for ids, mask in docs[:50]:
        assert ids[0] == 50257 and ids[-1] == 50258 and max(ids) <= 50268
        text = enc.decode(ids)
        assert text.startswith("<|bos|><|user|>") and text.endswith("<|/assistant|><|eos|>")
        msgs = [{"role": "user", "content": text.split("<|user|>")[1].split("<|/user|>")[0]}]
        answer = text.split("<|assistant|>")[1].split("<|/assistant|>")[0]
        thinking = text.split("<|think|>")[1].split("<|/think|>")[0] if "<|think|>" in text else None
        assert render_conversation(msgs + [{"role": "assistant", "content": answer, "thinking": thinking}], enc) \
            == (ids, mask)


# ---------------------------------------------------------------------------------- the command line

def one_line_error(result):
    """The last line of stderr of a failed run_script, which must not be a traceback."""
    returncode, _, stderr = result
    assert returncode != 0 and "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_unknown_dataset_lists_the_known_ones():
    line = one_line_error(run_script("prepare.py", "nosuchset"))
    assert line.startswith("prepare.py: error: unknown dataset 'nosuchset'")
    assert all(name in line for name in ["reasoning", *prepare.RECIPES, ".jsonl"])


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n')
    (tmp_path / "junk.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    out = ["--out_dir", tmp_path / "o"]
    line = one_line_error(run_script("prepare.py", tmp_path / "broken.jsonl", "--tokenizer", "byte", *out))
    assert "broken.jsonl:2: invalid JSON" in line
    line = one_line_error(run_script("prepare.py", tmp_path / "junk.jsonl", *out, "--tokenizer", "byte"))
    assert "no documents" in line
    assert "no such file" in one_line_error(run_script("prepare.py", tmp_path / "missing.jsonl"))
    assert "--val_fraction" in one_line_error(run_script("prepare.py", "--val_fraction", "1.5"))
    assert "unknown recipe" in one_line_error(run_script("prepare.py", "alpaca=x.jsonl"))
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_hub_or_gpt2_ranks_unreachable_is_one_line(tmp_path):
    line = one_line_error(run_script("prepare.py", "gsm8k", "--max_samples", 5, "--tokenizer", "byte",
                                     "--out_dir", tmp_path / "o"))
    assert line.startswith("prepare.py: error: cannot load gsm8k (openai/gsm8k) from the Hugging Face Hub")
    assert "gsm8k=FILE" in line and not (tmp_path / "o").exists()
    line = one_line_error(run_script("prepare.py", "--tokenizer", "gpt2",
                                     env={GPT2_RANKS_ENV: str(tmp_path / "none.tiktoken")}))
    assert line.startswith("prepare.py: error: cannot load the GPT-2 BPE ranks") and "--tokenizer byte" in line


# ---------------------------------------------------------------------------------- streaming, resuming, documents

def outputs(out):
    """Every file of a finished output folder -> its bytes; meta.json's content but the command (its --out_dir)."""
    files = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    files["meta.json"] = {k: v for k, v in json.loads(files["meta.json"]).items() if k != "command"}
    return files


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, sig):
    """Ctrl-C or kill -9 halfway, then --resume: every file is byte-identical to an uninterrupted run's, and the
    resumed run started after what was committed (it did not tokenize it again)."""
    text = "\n\n".join(f"Paragraph {i}: " + "a story about a fox and a dog " * (i % 9 + 1) for i in range(40000))
    (tmp_path / "big.txt").write_text(text)  # ~6M byte tokens: six commits
    command = [sys.executable, os.path.join(ROOT, "prepare.py"), str(tmp_path / "big.txt"), "--tokenizer", "byte"]
    subprocess.run(command + ["--out_dir", str(tmp_path / "whole")], check=True, capture_output=True)
    out = tmp_path / "o"
    proc = subprocess.Popen(command + ["--out_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "progress.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not (out / "train.bin").exists() and not (out / "meta.json").exists()
    if sig == signal.SIGINT:
        assert err.strip() == ("prepare.py: interrupted; what was prepared is kept: the same command with --resume "
                               "goes on from there")
    done = json.loads((out / "progress.json").read_text())["records"]
    assert 0 < done < 40000
    returncode, stdout, stderr = run_script("prepare.py", *command[2:], "--out_dir", out, "--resume")
    assert returncode == 0, stderr
    assert outputs(out) == outputs(tmp_path / "whole")


def test_resume_needs_the_same_settings_and_something_to_resume(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n')
    out = ["--out_dir", tmp_path / "o"]
    line = one_line_error(run_script("prepare.py", tmp_path / "a.jsonl", "--tokenizer", "byte", *out))
    assert "a.jsonl:2: invalid JSON at byte 33 (Expecting value); what came before is kept (1 records of a)" in line
    line = one_line_error(run_script("prepare.py", tmp_path / "a.jsonl", "--tokenizer", "byte", "--seed", 1, *out,
                                     "--resume"))
    assert "o holds an interrupted run of `python prepare.py" in line and "without --resume" in line
    line = one_line_error(run_script("prepare.py", "--out_dir", tmp_path / "new", "--resume"))
    assert "nothing to resume" in line and not (tmp_path / "new").exists()


def test_truncated_json_array_names_the_byte_and_keeps_what_came_before(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"A{i}."}]}
            for i in range(3000)]
    whole = json.dumps(rows)
    cut = whole.index('{"conversations"', len(whole) // 2) + 30  # inside a record halfway
    (tmp_path / "oh.json").write_text(whole[:cut])
    spec = f"openhermes={tmp_path / 'oh.json'}"
    line = one_line_error(run_script("prepare.py", spec, "--tokenizer", "byte", "--out_dir", tmp_path / "o"))
    start = whole.rindex('{"conversations"', 0, cut)
    assert f"oh.json:1: invalid JSON at byte {start} (" in line
    kept = json.loads((tmp_path / "o" / "progress.json").read_text())["records"]
    assert kept == whole[:start].count('{"conversations"')
    (tmp_path / "oh.json").write_text(whole)  # the download finished
    main([spec, "--tokenizer", "byte", "--out_dir", str(tmp_path / "o"), "--resume"])
    main([spec, "--tokenizer", "byte", "--out_dir", str(tmp_path / "whole")])
    assert outputs(tmp_path / "o") == outputs(tmp_path / "whole")


def test_json_records_across_chunk_boundaries(monkeypatch, tmp_path):
    """A JSON file is read a few bytes at a time (values, numbers and UTF-8 characters cut anywhere); resuming
    from any record's position gives the records after it, in JSON and in parquet."""
    monkeypatch.setattr(prepare.JsonText, "CHUNK", 7)
    rows = [{"text": "naïve café ✅ " * (i % 3), "n": 12345.678 * i, "ok": i % 2 == 0, "none": None, "l": [i, -i]}
            for i in range(40)]
    for name, body in (("array.json", json.dumps(rows, indent=1)), ("lines.json", "\n".join(map(json.dumps, rows))),
                       ("lines.jsonl", "\n\n".join(map(json.dumps, rows)) + "\n")):
        (tmp_path / name).write_text(body, encoding="utf-8")
        read = list(prepare.file_records(str(tmp_path / name), None))
        assert [rec for _, rec in read] == rows, name
        for k in (0, 17, 39):
            assert [rec for _, rec in prepare.file_records(str(tmp_path / name), read[k][0])] == rows[k + 1:]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=6)
    read = list(prepare.file_records(str(tmp_path / "rows.parquet"), None))
    assert [rec for _, rec in read] == rows
    for k in (0, 5, 6, 17, 39):  # within a row group, and at its end
        assert [rec for _, rec in prepare.file_records(str(tmp_path / "rows.parquet"), read[k][0])] == rows[k + 1:]
    (tmp_path / "bad.json").write_text(json.dumps(rows[:3])[:-1] + ", {\"text\": 1,, }]")
    with pytest.raises(UserError, match=r"bad\.json:1: invalid JSON at byte \d+ \(Expecting property name"):
        list(prepare.file_records(str(tmp_path / "bad.json"), None))


def test_reading_a_json_array_holds_a_chunk_not_the_file(tmp_path):
    """Memory while reading a 24 MB array, a full pass: a chunk and a record (json.load held ~10x the file)."""
    record = json.dumps({"conversations": [{"from": "human", "value": "Why? " * 100}, {"from": "gpt", "value": "x"}]})
    (tmp_path / "big.json").write_text("[" + ",\n".join([record] * 40000) + "]")
    tracemalloc.start()
    n = sum(1 for _ in prepare.file_records(str(tmp_path / "big.json"), None))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 40000 and peak < 8 << 20, peak


def test_max_samples_reads_only_what_it_needs(tmp_path):
    """--max_samples N stops reading after N records: the rest of the file is never parsed."""
    rows = [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
            for i in range(10)]
    path = tmp_path / "oh.json"
    path.write_text(json.dumps(rows)[:-1] + ", and then something that is not JSON at all")
    for spec in (str(path), f"openhermes={path}"):  # a plain file, and the recipe on the Hub's file
        docs, stats = docs_of(spec, ["--max_samples", "10"])
        assert [d[1]["content"] for d in docs] == [f"A{i}" for i in range(10)] and stats["skipped"] == 0
    main([str(path), "--max_samples", "10", "--tokenizer", "byte", "--val_fraction", "0.3", "--out_dir",
          str(tmp_path / "o")])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 10


def test_document_index_and_max_doc_tokens(tmp_path):
    rows = [{"question": "Q" * (i % 50), "answer": f"A{i}"} for i in range(400)]
    (tmp_path / "qa.jsonl").write_text("\n".join(map(json.dumps, rows)))
    main([str(tmp_path / "qa.jsonl"), "--tokenizer", "byte", "--max_doc_tokens", "40", "--out_dir",
          str(tmp_path / "o")])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    lengths = [len(render_conversation([{"role": "user", "content": r["question"]},
                                        {"role": "assistant", "content": r["answer"]}], BYTE)[0]) for r in rows]
    assert meta["sources"]["qa"]["too_long"] == sum(n > 40 for n in lengths) > 0 and meta["max_doc_tokens"] == 40
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "o" / f"{split}.bin", np.uint16)
        index = np.fromfile(tmp_path / "o" / f"{split}_index.bin", np.uint64).astype(np.int64)
        docs = read_split(tmp_path / "o", split)
        assert len(index) == len(docs) == meta[split]["documents"]
        assert index.tolist() == np.cumsum([0] + [len(d) for d, _ in docs[:-1]]).tolist()
        assert (ids[index] == BOS).all() and all(len(d) <= 40 for d, _ in docs)


def test_text_dump_of_a_recipe_splits_on_its_separator(tmp_path):
    """TinyStories-train.txt separates stories with <|endoftext|> lines; a story keeps its blank lines."""
    (tmp_path / "TinyStories-train.txt").write_text("Once upon a time.\n\nThe end.\n<|endoftext|>\nTom ran.\n"
                                                     "<|endoftext|>\n\n<|endoftext|>\nLily sang.\n")
    docs, _ = docs_of(f"tinystories={tmp_path / 'TinyStories-train.txt'}")
    assert docs == ["Once upon a time.\n\nThe end.", "Tom ran.", "Lily sang."]
    assert docs_of(str(tmp_path / "TinyStories-train.txt"))[0][0] == "Once upon a time."  # plain .txt: paragraphs


# ---------------------------------------------------------------------------------- a tokenizer trained here

def paragraphs(n, seed=0):
    """n paragraphs of made-up prose with numbers, each unique."""
    rng = np.random.default_rng(seed)
    syllables = ("ka", "lo", "mire", "ne", "rust", "sa", "ti", "vo", "gran", "pel")
    words = [a + b + c for a in syllables for b in syllables for c in ("", "s", "ing", "ed", "ly", "tion", "er")]
    return [f"{i}. " + " ".join(rng.choice(words, size=int(rng.integers(20, 60)))).capitalize() + f", {i * 37} more."
            for i in range(n)]


def test_bpe_learns_from_the_train_documents_then_tokenizes_them(tmp_path):
    text = paragraphs(2000)
    (tmp_path / "prose.txt").write_text("\n\n".join(text))
    main([str(tmp_path / "prose.txt"), "--tokenizer", "bpe:1024", "--out_dir", str(tmp_path / "out")])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"].startswith("bpe1024-") and meta["tokenizer_file"] == "bpe.json"
    assert meta["vocab_size"] == meta["n_vocab"] == 1024 and meta["special_tokens"]["<|bos|>"] == 1012
    enc = get_tokenizer(read_bpe(str(tmp_path / "out")))
    docs = read_split(tmp_path / "out", "train", enc) + read_split(tmp_path / "out", "val", enc)
    assert sorted(enc.decode(ids[1:-1]) for ids, _ in docs) == sorted(text)
    assert sum(len(ids) for ids, _ in docs) < 0.3 * sum(len(t) for t in text)  # it learned the words
    # what it learned from: every train document and no val document
    args = prepare.parse_args([str(tmp_path / "prose.txt"), "--tokenizer", "bpe:1024"])
    sample = list(prepare.bpe_texts([prepare.open_source(d, args) for d in args.datasets], args, {"bytes": 0}))
    val = {enc.decode(ids[1:-1]) for ids, _ in read_split(tmp_path / "out", "val", enc)}
    assert val and not val & set(sample) and len(sample) == len(text) - len(val)
    args = prepare.parse_args([str(tmp_path / "prose.txt"), "--tokenizer", "bpe:1024", "--bpe_sample_mb", "0.01"])
    small = list(prepare.bpe_texts([prepare.open_source(d, args) for d in args.datasets], args, {"bytes": 0}))
    assert small == sample[:len(small)] and 10_000 <= sum(map(len, small)) < 10_000 + max(map(len, text))


def test_a_trained_tokenizer_is_reused_for_other_data_and_checked(tmp_path):
    (tmp_path / "prose.txt").write_text("\n\n".join(paragraphs(600)))
    chats = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(200)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in chats))
    main([str(tmp_path / "prose.txt"), "--tokenizer", "bpe:600", "--out_dir", str(tmp_path / "pre")])
    main([str(tmp_path / "qa.jsonl"), "--tokenizer", str(tmp_path / "pre"), "--out_dir", str(tmp_path / "sft")])
    assert (tmp_path / "sft" / "bpe.json").read_bytes() == (tmp_path / "pre" / "bpe.json").read_bytes()
    meta, _ = load_data(str(tmp_path / "sft"), splits=())
    assert meta["tokenizer"] == read_bpe(str(tmp_path / "pre"))  # the whole tokenizer, for the checkpoint
    enc = get_tokenizer(meta["tokenizer"])
    docs = read_split(tmp_path / "sft", "train", enc) + read_split(tmp_path / "sft", "val", enc)
    assert sorted(enc.decode(ids) for ids, _ in docs) == sorted(
        enc.decode(render_conversation([{"role": "user", "content": r["question"]},
                                        {"role": "assistant", "content": r["answer"]}], enc)[0]) for r in chats)
    # a folder prepared with a built-in tokenizer passes that on
    main([str(tmp_path / "qa.jsonl"), "--tokenizer", "byte", "--out_dir", str(tmp_path / "bytes")])
    main([str(tmp_path / "prose.txt"), "--tokenizer", str(tmp_path / "bytes"), "--out_dir", str(tmp_path / "more")])
    assert load_data(str(tmp_path / "more"), splits=())[0]["tokenizer"] == "byte"
    assert not (tmp_path / "more" / "bpe.json").exists()
    main([str(tmp_path / "prose.txt"), "--tokenizer", "byte", "--out_dir", str(tmp_path / "pre")])  # prepared again
    assert not (tmp_path / "pre" / "bpe.json").exists()  # the earlier run's tokenizer is not this data's
    # a folder whose bpe.json is not the tokenizer its bins were made with
    (tmp_path / "sft" / "bpe.json").write_text(json.dumps(train_bpe(paragraphs(50, seed=1), 600)))
    with pytest.raises(UserError, match="prepared with bpe600-.* but its bpe.json is bpe"):
        load_data(str(tmp_path / "sft"), splits=())


def test_tokenizer_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "prose.txt").write_text("\n\n".join(paragraphs(100)))
    spec = train_bpe(paragraphs(100), 600)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "bpe.json").write_text(json.dumps(spec)[:-50])
    (tmp_path / "edited.json").write_text(json.dumps(dict(spec, tokens=spec["tokens"][::-1])))
    for tokenizer, message in [("bpe:100", "512 to 65536 tokens"), ("bpe:70000", "512 to 65536 tokens"),
                               ("bpe:lots", "use byte, gpt2, bpe:N"), (tmp_path / "nowhere", "use byte, gpt2, bpe:N"),
                               (tmp_path, "no trained tokenizer at"), (tmp_path / "cut", "is not a trained tokenizer"),
                               (tmp_path / "edited.json", "is corrupt")]:
        line = one_line_error(run_script("prepare.py", tmp_path / "prose.txt", "--tokenizer", tokenizer,
                                         "--out_dir", tmp_path / "o"))
        assert line.startswith("prepare.py: error: ") and message in line, (tokenizer, line)
        assert not (tmp_path / "o").exists()
