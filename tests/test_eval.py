"""eval.py: the answer checkers, GSM8K parsing, the val loss against a naive per-token reference, the
reasoning score with a scripted oracle, and eval.py end to end on a checkpoint trained by train.py."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval import final_number, gsm8k_items, is_correct, reasoning_score, summarize, val_loss
from model import Forge, ModelConfig
from prepare import TASKS, heldout_items
from test_chat import ENC, SP, ScriptedModel, text
from test_sample import run_script


def test_checker_scores_right_answers_1_and_wrong_answers_0():
    assert is_correct("add", "734", "734") and is_correct("sort", " 1, 2, 5, 8, 9. ", "1, 2, 5, 8, 9")
    assert not is_correct("add", "735", "734") and not is_correct("sort", "1, 2, 5, 9, 8", "1, 2, 5, 8, 9")
    assert not is_correct("count", "", "3")
    assert is_correct("gsm8k", "So she has 1,250 dollars.", "1250")
    assert is_correct("gsm8k", "18.00", "18") and is_correct("gsm8k", "-4", "-4")
    assert not is_correct("gsm8k", "72 then 70", "72") and not is_correct("gsm8k", "no idea", "72")
    assert final_number("He ran 2.5 hours at 60 mph: 150 miles") == "150"


def test_gsm8k_file_in_the_real_schema(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    records = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                            "in May. How many clips did Natalia sell altogether in April and May?",
                "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                          "clips altogether in April and May.\n#### 72"},
               {"question": "What is 1000 + 234?", "answer": "#### 1,234"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    items = gsm8k_items(str(path))
    assert [(task, answer) for task, _, answer in items] == [("gsm8k", "72"), ("gsm8k", "1,234")]
    assert items[0][1] == [{"role": "user", "content": records[0]["question"]}]
    assert len(gsm8k_items(str(path), limit=1)) == 1

    path.write_text('{"question": "no answer here"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"gsm8k.jsonl:1 is not a GSM8K record"):
        gsm8k_items(str(path))


def test_val_loss_matches_a_per_token_reference(tmp_path):
    torch.manual_seed(0)
    model = Forge(ModelConfig(vocab_size=320, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)).eval()
    rng = np.random.default_rng(0)
    data, mask = rng.integers(0, 268, 150).astype(np.uint16), rng.integers(0, 2, 150).astype(np.uint8)
    data.tofile(tmp_path / "val.bin")
    mask.tofile(tmp_path / "val_mask.bin")
    loss, n = val_loss(model, str(tmp_path), batch_size=3, max_tokens=10**6)

    losses = []  # reference: every window of 16 tokens, each masked-in target on its own
    with torch.no_grad():
        for start in range(0, 149 - 16 + 1, 16):
            window = torch.tensor(data[start:start + 16].astype(np.int64))[None]
            logits, _ = model(window, torch.zeros_like(window))  # with targets: logits at every position
            logp = F.log_softmax(logits[0].float(), dim=-1)
            losses += [-logp[j, data[start + j + 1]].item() for j in range(16) if mask[start + j + 1]]
    assert n == len(losses)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def oracle(prompt):
    """Answers correctly after thinking, wrongly without: what the reasoning score must reveal."""
    question = ENC.decode(prompt[prompt.index(SP["<|user|>"]) + 1:prompt.index(SP["<|/user|>"])])
    answer = ANSWERS[question]
    if prompt[-1] == SP["<|think|>"]:
        return text("step by step") + [SP["<|/think|>"], SP["<|assistant|>"]] + text(answer) + [SP["<|/assistant|>"]]
    return text(answer + "7") + [SP["<|/assistant|>"]]


ITEMS = list(heldout_items(2 * len(TASKS)))
ANSWERS = {messages[-1]["content"]: answer for _, messages, answer in ITEMS}


def test_reasoning_score_shows_what_thinking_buys():
    greedy = dict(max_new_tokens=50, temperature=0.0, top_k=None, top_p=None)
    tally = reasoning_score(ScriptedModel(oracle), ENC, ITEMS, greedy, None, progress=False)
    summary = summarize(tally)
    assert list(summary) == TASKS + ["all"]
    for task in TASKS:
        assert summary[task]["on"]["n"] == 2 and summary[task]["on"]["accuracy"] == 1.0
        assert summary[task]["off"]["accuracy"] == 0.0
        assert summary[task]["on"]["mean_thinking_tokens"] == len(text("step by step"))
        assert summary[task]["off"]["mean_thinking_tokens"] == 0 and summary[task]["on"]["cut_off"] == 0
    assert summary["all"]["on"]["n"] == 2 * len(TASKS) and summary["all"]["on"]["accuracy"] == 1.0


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """prepare.py and a few seconds of train.py on the built-in data: a real checkpoint to evaluate."""
    root = tmp_path_factory.mktemp("e2e")
    rc, _, err = run_script("prepare.py", "--max-samples", 2000, "--out", root / "data", "--num-proc", 1)
    assert rc == 0, err
    rc, _, err = run_script("train.py", f"--out_dir={root / 'out'}", f"--data_dir={root / 'data'}", "--n_layer=1",
                            "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=64", "--batch_size=8",
                            "--max_iters=10", "--eval_interval=10", "--eval_iters=4", "--compile=False",
                            "--device=cpu", "--dtype=float32", timeout=300)
    assert rc == 0, err
    return root


def test_eval_end_to_end_writes_the_json_report(trained_run, tmp_path):
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2+3=5\n#### 5"}) + "\n", encoding="utf-8")
    report_path = tmp_path / "report.json"
    # No --data: the val set is the one the checkpoint was trained on (its config's data_dir).
    rc, out, err = run_script("eval.py", "--out_dir", trained_run / "out", "--items", 1, "--max_new_tokens", 32,
                              "--gsm8k", gsm8k, "--json", report_path, "--device", "cpu", "--dtype", "float32")
    assert rc == 0, err
    report = json.loads(report_path.read_text(encoding="utf-8"))
    ckpt = torch.load(trained_run / "out" / "best.pt", weights_only=True)
    assert report["checkpoint"].endswith("best.pt") and report["iter_num"] == ckpt["iter_num"]
    assert report["val"]["data"] == str(trained_run / "data")
    # The same model on the same val set: eval.py's full pass agrees with train.py's sampled estimate.
    assert math.isfinite(report["val"]["loss"])
    assert report["val"]["loss"] == pytest.approx(ckpt["best_val_loss"], abs=0.2)
    assert report["val"]["perplexity"] == pytest.approx(math.exp(report["val"]["loss"]))
    tasks = report["reasoning"]["tasks"]
    assert list(tasks) == TASKS + ["all"]
    for modes in tasks.values():
        for mode in ("on", "off"):
            assert 0 <= modes[mode]["accuracy"] <= 1
            assert modes[mode]["n"] == (len(TASKS) if modes is tasks["all"] else 1)
    assert tasks["all"]["on"]["tokens_per_s"] > 0
    # Word problems (~100 tokens) do not fit this model's 64-token context: counted as cut off, not hidden.
    assert tasks["word"]["on"]["cut_off"] == 1 and "cut off by --max_new_tokens or the context" in out
    assert report["gsm8k"]["on"]["n"] == 1 and report["gsm8k"]["file"] == str(gsm8k)
    assert report["showcase"][0]["prompt"] == "What is 15 * 23?"
    assert len(report["showcase"]) == 8 and all({"thought", "thinking", "answer", "tokens", "seconds"} <= s.keys()
                                                 for s in report["showcase"])
    assert "no-think" in out and "val loss" in out and "What is the capital of France?" in out


def test_eval_errors_are_one_line(trained_run, tmp_path):
    rc, _, err = run_script("eval.py", "--out_dir", trained_run / "out", "--data", tmp_path / "nothing")
    assert rc != 0 and "no val.bin" in err and err.strip().count("\n") == 0
