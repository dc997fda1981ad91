"""eval.py: the answer checkers (tasks.check_answer), GSM8K parsing (data.read_gsm8k), the val loss against a
naive per-token reference, the reasoning score with a scripted oracle, and eval.py end to end on a checkpoint
trained by train.py."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_checkpoint
from common import UserError
from conftest import BYTE, SP, ScriptedModel, all_logits, run_script, text_ids, tiny_model
from data import load_data, read_gsm8k
from eval import SHOWCASE, budget_curve, reasoning_score, summarize, val_loss, window_starts
from replies import generate_replies, is_correct
from tasks import TASKS, check_answer, difficulty_of, final_number, heldout_items
from tokenizer import render_prompt


def test_checker_scores_right_answers_1_and_wrong_answers_0():
    assert check_answer("add", "734", "734") and check_answer("sort", " 1, 2, 5, 8, 9. ", "1, 2, 5, 8, 9")
    assert not check_answer("add", "735", "734") and not check_answer("sort", "1, 2, 5, 9, 8", "1, 2, 5, 8, 9")
    assert not check_answer("count", "", "3")
    assert check_answer("gsm8k", "So she has 1,250 dollars.", "1250")
    assert check_answer("gsm8k", "18.00", "18") and check_answer("gsm8k", "-4", "-4")
    assert not check_answer("gsm8k", "72 then 70", "72") and not check_answer("gsm8k", "no idea", "72")
    assert final_number("He ran 2.5 hours at 60 mph: 150 miles") == "150"


def test_gsm8k_file_in_the_real_schema(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    records = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                            "in May. How many clips did Natalia sell altogether in April and May?",
                "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                          "clips altogether in April and May.\n#### 72"},
               {"question": "What is 1000 + 234?", "answer": "#### 1,234"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    items = read_gsm8k(str(path))
    assert [(task, answer) for task, _, answer in items] == [("gsm8k", "72"), ("gsm8k", "1,234")]
    assert items[0][1] == [{"role": "user", "content": records[0]["question"]}]
    assert len(read_gsm8k(str(path), limit=1)) == 1

    path.write_text('{"question": "no answer here"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"gsm8k.jsonl:1 is not a GSM8K record"):
        read_gsm8k(str(path))


def test_val_loss_matches_a_per_token_reference(tmp_path):
    model = tiny_model(block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    rng = np.random.default_rng(0)
    data, mask = rng.integers(0, 268, 150).astype(np.uint16), rng.integers(0, 2, 150).astype(np.uint8)
    data.tofile(tmp_path / "val.bin")
    mask.tofile(tmp_path / "val_mask.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 320}), encoding="utf-8")
    _, bins = load_data(str(tmp_path), splits=("val",))
    loss, n = val_loss(model, *bins["val"][:2], batch_size=3, max_tokens=10**6)

    losses = []  # reference: every window of 16 tokens, each masked-in target on its own
    with torch.no_grad():
        for start in range(0, 149 - 16 + 1, 16):
            window = torch.tensor(data[start:start + 16].astype(np.int64))[None]
            logits = all_logits(model, window)
            logp = F.log_softmax(logits[0].float(), dim=-1)
            losses += [-logp[j, data[start + j + 1]].item() for j in range(16) if mask[start + j + 1]]
    assert n == len(losses)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)



def test_val_windows_start_at_documents(tmp_path):
    """With prepare.py's document index, every val window starts at a document, the first one the window before
    has not reached, and the loss is the per-token reference over exactly those windows."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 30, 40)
    bos = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    n = int(lengths.sum()) - 1
    starts = window_starts(n, 16, bos)
    assert starts[0] == 0 and set(starts) <= set(bos.tolist()) and starts == sorted(starts)
    for a, b in zip(starts, starts[1:]):  # the next window starts at the first document at or after a + 16
        assert b == min(int(s) for s in bos if s >= a + 16)
    assert starts[-1] + 16 <= n and not [s for s in bos if s >= starts[-1] + 16 and s + 16 <= n]
    assert window_starts(n, 16) == list(range(0, n - 15, 16))  # no index: consecutive windows

    model = tiny_model(block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    data, mask = rng.integers(0, 268, n + 1).astype(np.uint16), rng.integers(0, 2, n + 1).astype(np.uint8)
    loss, count = val_loss(model, data, mask, batch_size=3, max_tokens=10**6, index=bos)
    losses = []
    with torch.no_grad():
        for start in starts:
            window = torch.tensor(data[start:start + 16].astype(np.int64))[None]
            logp = F.log_softmax(all_logits(model, window)[0].float(), dim=-1)
            losses += [-logp[j, data[start + j + 1]].item() for j in range(16) if mask[start + j + 1]]
    assert count == len(losses) and loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)

def oracle(prompt):
    """Answers correctly after thinking, wrongly without: what the reasoning score must reveal. Left to choose
    (reasoning auto), it thinks on every task but max."""
    question = BYTE.decode(prompt[prompt.index(SP["<|user|>"]) + 1:prompt.index(SP["<|/user|>"])])
    answer = ANSWERS[question]
    thinking = text_ids("step by step") + [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids(answer)
    if prompt[-1] == SP["<|think|>"]:
        return thinking + [SP["<|/assistant|>"]]
    if prompt[-1] == SP["<|/user|>"] and dict(ITEMS_BY_QUESTION)[question] != "max":
        return [SP["<|think|>"]] + thinking + [SP["<|/assistant|>"]]
    return text_ids(answer + "7") + [SP["<|/assistant|>"]]


ITEMS = list(heldout_items(2 * len(TASKS)))
ANSWERS = {messages[-1]["content"]: answer for _, messages, answer in ITEMS}
ITEMS_BY_QUESTION = [(messages[-1]["content"], task) for task, messages, _ in ITEMS]


def test_reasoning_score_shows_what_thinking_buys():
    greedy = dict(max_new_tokens=50, temperature=0.0, top_k=None, top_p=None)
    tally = reasoning_score(ScriptedModel(oracle), BYTE, ITEMS, greedy, None)
    summary = summarize(tally)
    assert list(summary) == TASKS + ["all"]
    for task in TASKS:
        assert summary[task]["on"]["n"] == 2 and summary[task]["on"]["accuracy"] == 1.0
        assert summary[task]["off"]["accuracy"] == 0.0
        assert summary[task]["on"]["mean_thinking_tokens"] == len(text_ids("step by step"))
        assert summary[task]["off"]["mean_thinking_tokens"] == 0 and summary[task]["on"]["cut_off"] == 0
    assert summary["all"]["on"]["n"] == 2 * len(TASKS) and summary["all"]["on"]["accuracy"] == 1.0
    # auto: what the model chose, and what that got it
    for task in TASKS:
        assert summary[task]["auto"]["thought"] == summary[task]["auto"]["accuracy"] == (task != "max")
        assert summary[task]["auto"]["mean_thinking_tokens"] == (task != "max") * len(text_ids("step by step"))
    assert summary["all"]["auto"]["thought"] == pytest.approx(1 - 1 / len(TASKS))


def test_accuracy_against_the_thinking_budget():
    """A budget under the oracle's 12 thinking tokens cuts its thinking there (the think block closed, the rest of
    its script read as the answer: wrong); 12 or more leaves it whole."""
    greedy = dict(max_new_tokens=50, temperature=0.0, top_k=None, top_p=None)
    curve = budget_curve(ScriptedModel(oracle), BYTE, ITEMS, greedy, None, 64, [0, 3, 12, 100])
    assert [c["max_thinking_tokens"] for c in curve] == [0, 3, 12, 100]
    assert [c["accuracy"] for c in curve] == [0.0, 0.0, 1.0, 1.0]
    assert [c["mean_thinking_tokens"] for c in curve] == [0, 3, 12, 12]
    assert list(curve[0]["tasks"]) == TASKS


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, reasoning_data):
    """A few seconds of train.py on the built-in data: a real checkpoint to evaluate -> (out_dir, data_dir). Random
    windows, the kind eval.py's val loss reads (consecutive ones), so that train.py's val loss estimates it."""
    out = tmp_path_factory.mktemp("e2e") / "out"
    rc, _, err = run_script("train.py", f"--out_dir={out}", f"--data_dir={reasoning_data}", "--windows=random",
                            "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=64",
                            "--batch_size=8",
                            "--max_iters=10", "--eval_interval=10", "--eval_iters=4", "--compile=False",
                            "--device=cpu", "--dtype=float32", timeout=300)
    assert rc == 0, err
    return out, reasoning_data


def test_eval_end_to_end_writes_the_json_report(trained_run, tmp_path):
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2+3=5\n#### 5"}) + "\n", encoding="utf-8")
    report_path = tmp_path / "report.json"
    # No --data: the val set is the one the checkpoint was trained on (its config's data_dir).
    out_dir, data_dir = trained_run
    rc, out, err = run_script("eval.py", "--out_dir", out_dir, "--items", 1, "--max_new_tokens", 32,
                              "--gsm8k", gsm8k, "--json", report_path, "--device", "cpu", "--dtype", "float32")
    assert rc == 0, err
    report = json.loads(report_path.read_text(encoding="utf-8"))
    ckpt = torch.load(out_dir / "best.pt", weights_only=True)
    assert report["checkpoint"].endswith("best.pt") and report["iter_num"] == ckpt["iter_num"]
    assert report["val"]["data"] == data_dir
    # The same model on the same val set: eval.py's full pass agrees with train.py's sampled estimate.
    assert math.isfinite(report["val"]["loss"])
    assert report["val"]["loss"] == pytest.approx(ckpt["best_val_loss"], abs=0.2)
    assert report["val"]["perplexity"] == pytest.approx(math.exp(report["val"]["loss"]))
    tasks = report["reasoning"]["tasks"]
    assert list(tasks) == TASKS + ["all"]
    # The reference: the same checkpoint's greedy replies to the same held-out problems, scored here.
    model, _ = load_checkpoint(out_dir / "best.pt")
    difficulty = difficulty_of(json.load(open(f"{data_dir}/meta.json")))
    items = list(heldout_items(len(TASKS), difficulty=difficulty, easy_share=report["reasoning"]["easy_share"]))
    assert report["reasoning"]["easy_share"] == 0.58  # the default: a third of the items easy
    for mode in ("on", "off"):
        prompts = [render_prompt(messages, BYTE, mode) for _, messages, _ in items]
        replies = generate_replies(model, BYTE, prompts, dict(max_new_tokens=32, temperature=0.0))
        for (task, _, answer), reply in zip(items, replies):
            assert tasks[task][mode]["n"] == 1
            assert tasks[task][mode]["accuracy"] == is_correct(reply, task, answer), (task, mode)
            assert tasks[task][mode]["cut_off"] == (reply.finish != "stop"), (task, mode)
            assert tasks[task][mode]["mean_thinking_tokens"] == reply.thinking_tokens, (task, mode)
        assert tasks["all"][mode]["n"] == len(TASKS)
        assert tasks["all"][mode]["accuracy"] == sum(tasks[t][mode]["accuracy"] for t in TASKS) / len(TASKS)
    assert tasks["all"]["on"]["tokens_per_s"] > 0
    # Word problems (~100 tokens) do not fit this model's 64-token context: counted as cut off, not hidden.
    assert tasks["word"]["on"]["cut_off"] == 1 and "cut off by --max_new_tokens or the context" in out
    assert report["gsm8k"]["on"]["n"] == 1 and report["gsm8k"]["file"] == str(gsm8k)
    assert [s["prompt"] for s in report["showcase"]] == SHOWCASE
    assert all({"thought", "thinking", "answer", "tokens", "seconds"} <= s.keys() for s in report["showcase"])
    assert "no-think" in out and "val loss" in out and "What is the capital of France?" in out


def test_eval_scores_the_tasks_asked_for(trained_run, tmp_path):
    rc, _, err = run_script("eval.py", "--out_dir", trained_run[0], "--items", 2, "--max_new_tokens", 16,
                            "--tasks", "digitsum,max", "--json", tmp_path / "r.json", "--val_tokens", 256)
    assert rc == 0, err
    tasks = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["reasoning"]["tasks"]
    assert list(tasks) == ["digitsum", "max", "all"] and tasks["all"]["on"]["n"] == 4


def test_eval_errors_are_one_line(trained_run, tmp_path):
    rc, _, err = run_script("eval.py", "--out_dir", trained_run[0], "--data", tmp_path / "nothing")
    assert rc != 0 and "no val.bin" in err and err.strip().count("\n") == 0
    assert err.startswith("eval.py: error: ")
    for flag, value in (("--items", -1), ("--gen_batch", 0)):
        rc, _, err = run_script("eval.py", flag, value)
        assert rc == 1 and err.strip() == ("eval.py: error: --items must be >= 0, --val_tokens, --batch_size and "
                                           "--gen_batch >= 1")
    for flag, value, message in (("--easy_share", 2, "--easy_share must be between 0 and 1"),
                                 ("--tasks", "add,nosuch", "--tasks 'add,nosuch': a comma list of add, sub"),
                                 ("--thinking_budgets", "8,x", "--thinking_budgets must be numbers >= 0")):
        rc, _, err = run_script("eval.py", flag, value)
        assert rc == 1 and err.strip().startswith(f"eval.py: error: {message}")
