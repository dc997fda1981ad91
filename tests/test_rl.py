"""rl.py: the reward (right 1; wrong, cut off or answered only in the thinking 0), the policy-gradient loss
learns a rewarded answer, screening puts the greedy mistakes first, the supervised mix-in learns, resume after
an interruption replays the uninterrupted run bit for bit, Ctrl-C saves and exits 130, and bad inputs get one
line."""
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rl
from conftest import (BYTE, ROOT, SP, ScriptedModel, StopAfter, all_logits, text_ids, tiny_model, tokenizer_spec,
                      write_checkpoint)
from checkpoints import load_checkpoint
from replies import generate_reply
from tokenizer import render_prompt

THINK_END, END = SP["<|/think|>"], SP["<|/assistant|>"]


def reply(thinking, answer, end=True):
    """The ids a model generates after a prompt that forced <|think|>."""
    ids = text_ids(thinking) + [THINK_END, SP["<|assistant|>"]] + text_ids(answer)
    return ids + [END] if end else ids


def reward_of(ids, task, answer):
    """rl.reward of the reply a model writing ids makes to a prompt that forced <|think|>."""
    prompt = render_prompt([{"role": "user", "content": "Q?"}], BYTE, "on")
    return rl.reward(generate_reply(ScriptedModel(ids), BYTE, prompt, dict(max_new_tokens=99)), task, answer)


def test_reward_is_one_only_for_a_verified_answer_after_the_thinking():
    assert reward_of(reply("478+256: 8+6=14, 4 / ...", "734"), "add", "734") == 1.0
    assert reward_of(reply("478+256: ...", "735"), "add", "734") == 0.0                  # wrong
    assert reward_of(reply("478+256: ...", "734", end=False), "add", "734") == 0.0       # cut off
    assert reward_of(text_ids("so the answer is 734"), "add", "734") == 0.0              # only thinking
    assert reward_of(text_ids("734") + [END], "add", "734") == 0.0                        # no <|/think|>
    assert reward_of(reply("16 - 3 - 4 = 9; 9 * 2 = 18", "She makes $18."), "gsm8k", "18") == 1.0
    assert reward_of(reply("9 * 2 = 18", "$19"), "gsm8k", "18") == 0.0


def test_policy_gradient_learns_a_rewarded_answer():
    """A tiny model over an 8-token vocabulary, rewarded for answering with token 3: the mean sampled reward
    rises from below 0.2 to above 0.8 within 60 steps (seeded)."""
    model = tiny_model(seed=0, vocab_size=8, block_size=16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    prompt, group = [0, 1], 16
    rewards = []
    for _ in range(60):
        replies = [[step[row]] for step in model.generate([prompt] * group, 1, temperature=1.0, generator=generator)
                   for row in range(group)]
        r = [float(x[0] == 3) for x in replies]
        rewards.append(sum(r) / group)
        if rewards[-1] > 0.8:
            break
        advantages = [x - sum(r) / group for x in r]
        loss = rl.policy_loss(model, prompt, replies, advantages, group, torch.autocast("cpu", enabled=False))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert rewards[0] < 0.2 and rewards[-1] > 0.8, rewards


def test_policy_loss_scores_only_reply_tokens():
    """The gradient comes from the reply tokens alone, weighted by their advantage: a zero advantage, or
    padding after a shorter reply, contributes nothing."""
    model = tiny_model(seed=1)
    prompt, replies = text_ids("Q?"), [text_ids("ab") + [END], text_ids("abcd") + [END]]
    ctx = torch.autocast("cpu", enabled=False)
    assert rl.policy_loss(model, prompt, replies, [0.0, 0.0], 1.0, ctx).item() == 0.0
    loss = rl.policy_loss(model, prompt, replies, [1.0, 0.0], 1.0, ctx)
    seq = torch.tensor([prompt + replies[0]])
    logits = all_logits(model, seq[:, :-1])
    logp = torch.log_softmax(logits.float(), -1)[0, len(prompt) - 1:].gather(-1, seq[0, len(prompt):, None])
    assert loss.item() == pytest.approx(-logp.sum().item(), rel=1e-5)


def test_micro_batches_give_the_same_gradient(reasoning_data, monkeypatch):
    """The update in micro_batch rows at a time (the memory bound) has the gradient of the whole batch at once:
    the policy loss of a group of replies, and the supervised mix-in's mean over all scored tokens."""
    from data import load_data
    _, bins = load_data(reasoning_data, splits=("train",))
    ctx = torch.autocast("cpu", enabled=False)
    prompt = text_ids("Q?")
    replies = [SimpleNamespace(ids=text_ids("ab" * k) + [END], thinking_tokens=k) for k in range(1, 8)]
    item, group = ("add", [], "2"), (prompt, replies)
    grads = []
    for micro in (1, 3, 100):
        model = tiny_model(seed=3).train()
        monkeypatch.setattr(rl, "reward", lambda reply, task, answer: float(len(reply.ids) % 4 == 1))
        rl.policy_gradient(model, [item], [group], 10.0, FakeScaler(), ctx, micro)
        cfg = SimpleNamespace(sft_batch_size=5, micro_batch=micro, seed=0, sft_coef=0.5)
        sft = rl.supervised_mixin(model, bins, cfg, 0, FakeScaler(), ctx)
        grads.append((torch.cat([p.grad.flatten() for p in model.parameters()]), sft["sft_loss"]))
    for grad, loss in grads[:2]:
        assert torch.allclose(grad, grads[2][0], rtol=1e-4, atol=1e-6) and loss == pytest.approx(grads[2][1])


def test_a_thinking_cost_favours_the_right_reply_that_thought_less(monkeypatch):
    """reward = correct - think_cost * thinking tokens / max_new_tokens: of two right replies the one that answered
    without thinking gets the larger advantage, a wrong one the smallest; pass rates count correctness alone."""
    prompt = text_ids("Q?")
    thought = SimpleNamespace(ids=[1] * 11, thinking_tokens=10, right=True)
    direct = SimpleNamespace(ids=[1] * 2, thinking_tokens=0, right=True)
    wrong = SimpleNamespace(ids=[1] * 2, thinking_tokens=0, right=False)
    monkeypatch.setattr(rl, "reward", lambda reply, task, answer: float(reply.right))
    seen = []
    monkeypatch.setattr(rl, "policy_loss", lambda model, prompt, ids, advantages, constant, ctx:
                        seen.extend(advantages) or torch.zeros((), requires_grad=True))
    task_rewards, _, _ = rl.policy_gradient(None, [("add", [], "2")], [(prompt, [thought, direct, wrong])], 1.0,
                                            FakeScaler(), None, 8, thinking_price=0.01)
    assert task_rewards == {"add": [1.0, 1.0, 0.0]}
    assert seen == pytest.approx([0.9 - 1.9 / 3, 1 - 1.9 / 3, -1.9 / 3])


def test_auto_mode_lets_the_model_choose(tmp_path):
    """reasoning=auto: the replies are sampled (and screened, and evaluated) from prompts that end with the user's
    turn, so the model's first token is its choice; rl.py runs end to end with a thinking cost."""
    init = write_checkpoint(tiny_model(seed=4), tmp_path / "init.pt")
    rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/auto", *ARGS, "--max_iters=1", "--reasoning=auto",
             "--think_cost=0.5", "--screen=2"])
    ckpt = torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["reasoning"] == "auto" and ckpt["config"]["think_cost"] == 0.5
    metrics = [json.loads(line) for line in open(tmp_path / "auto" / "metrics.jsonl")]
    assert all(0 <= m["thought_share"] <= 1 and m["thinking_tokens"] >= 0 for m in metrics if "reward" in m)
    cfg = SimpleNamespace(reasoning="auto", max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, group_size=2)
    model = Scripted(text_ids("42") + [END])
    rl.sample_groups(model, BYTE, [("add", [{"role": "user", "content": "1+1?"}], "2")], cfg,
                     contextlib.nullcontext(), None)
    assert model.prompts[-1][-1] == SP["<|/user|>"]


class FakeScaler:
    def scale(self, loss):
        return loss


class Scripted(ScriptedModel):
    """A ScriptedModel with the train/eval switches rl.py calls."""
    def eval(self):
        return self

    train = eval


def test_screening_keeps_the_problems_answered_wrong_first():
    """Of the candidates, those the model answers wrong greedily come first, then the others in draw order."""
    def script(prompt):  # "What is i + 1?" answered right for even i, wrong for odd i
        i = int(bytes(t for t in prompt if t < 256).decode().split("What is ")[-1].split(" ")[0])
        return reply(f"{i}+1: {i}+1={i + 1}, {i + 1}", str(i + 1 if i % 2 == 0 else i))
    candidates = [("add", [{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1)) for i in range(6)]
    kept, wrong_share = rl.screen_problems(Scripted(script), BYTE, candidates, 4, 64, contextlib.nullcontext(), "on")
    assert [answer for _, _, answer in kept] == ["2", "4", "6", "1"] and wrong_share == 0.5


ARGS = ["--max_iters=4", "--eval_interval=2", "--ckpt_interval=2", "--eval_items=1", "--problems_per_step=2",
        "--group_size=4", "--max_new_tokens=12", "--learning_rate=1e-2", "--warmup_iters=0", "--device=cpu",
        "--dtype=float32", "--screen=1", "--sft_coef=0"]


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, reasoning_data):
    # an untrained model never answers right: reward replies by their length, so every step updates the weights
    monkeypatch.setattr(rl, "reward", lambda reply, task, answer: float(len(reply.ids) % 2))
    init = write_checkpoint(tiny_model(seed=2), tmp_path / "init.pt")
    args = [*ARGS, "--screen=2", "--sft_coef=0.5", "--sft_batch_size=2", f"--data_dir={reasoning_data}"]
    rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/straight", *args])
    monkeypatch.setattr(rl, "StopFlag", lambda: StopAfter(2))
    with pytest.raises(SystemExit) as e:
        rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/resumed", *args])
    assert e.value.code == 128 + signal.SIGINT
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["iter_num"] == 2
    monkeypatch.setattr(rl, "StopFlag", lambda: StopAfter(10 ** 9))
    rl.main(["--resume", f"--out_dir={tmp_path}/resumed"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert straight["iter_num"] == resumed["iter_num"] == 4
    assert straight["pass_rates"] == resumed["pass_rates"]
    changed = False
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
        changed |= not torch.equal(tensor, torch.load(init, weights_only=True)["model"][name])
    assert changed  # the steps did update the weights
    metrics = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    steps = [m["iter"] for m in metrics if "reward" in m]
    assert steps == [0, 1, 2, 3]  # the interrupted run's log continues without gaps or repeats
    assert {m["iter"] for m in metrics if "heldout_accuracy" in m} == {0, 2, 4}
    assert all(0 <= m["zero_variance_share"] <= 1 and m["sampling_tokens_per_s"] > 0 and m["sft_loss"] > 0
               and 0 <= m["greedy_wrong_share"] <= 1 for m in metrics if "reward" in m)


def test_a_trained_tokenizer_stays_whole_in_rl_checkpoints(tmp_path):
    init = write_checkpoint(tiny_model(tokenizer="bpe"), tmp_path / "init.pt", tokenizer_spec("bpe"))
    rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/rl", *ARGS, "--max_iters=1"])
    for name in ("ckpt.pt", "best.pt"):
        assert torch.load(tmp_path / "rl" / name, weights_only=True)["tokenizer"] == tokenizer_spec("bpe")


def test_sft_coef_mixes_in_the_supervised_loss(tmp_path, monkeypatch, reasoning_data):
    """With every reply scored the same there is no policy gradient: the weights move only with sft_coef > 0,
    and then the supervised loss on the prepared data falls (from ln 320 = 5.8 at the start)."""
    monkeypatch.setattr(rl, "reward", lambda reply, task, answer: 0.0)
    init = write_checkpoint(tiny_model(seed=5), tmp_path / "init.pt")
    weights = {}
    for coef in (0, 1):
        rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/{coef}", *ARGS, f"--data_dir={reasoning_data}",
                 f"--sft_coef={coef}", "--sft_batch_size=4", "--max_iters=6", "--eval_interval=6"])
        weights[coef] = torch.load(tmp_path / str(coef) / "ckpt.pt", weights_only=True)["model"]
        metrics = [json.loads(line) for line in open(tmp_path / str(coef) / "metrics.jsonl")]
        losses = [m["sft_loss"] for m in metrics if "sft_loss" in m]
        assert all(m["zero_variance_share"] == 1 for m in metrics if "reward" in m)
    start = torch.load(init, weights_only=True)["model"]
    assert all(torch.equal(start[k], weights[0][k]) for k in start)  # nothing to learn from equal rewards
    assert not all(torch.equal(start[k], weights[1][k]) for k in start)
    assert len(losses) == 6 and losses[-1] < 0.75 * losses[0], losses


def test_ctrl_c_saves_and_exits_130(tmp_path):
    init = write_checkpoint(tiny_model(seed=3), tmp_path / "init.pt")
    proc = subprocess.Popen([sys.executable, "rl.py", f"--init_from={init}", f"--out_dir={tmp_path}",
                             *ARGS, "--max_iters=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"reward"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] >= 1 and "--resume continues" in out.decode()


def run_rl(*args):
    proc = subprocess.run([sys.executable, "rl.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case, message", [
    ("missing", "init_from="),
    ("no think tokens", "has no think tokens: RL needs a model trained on the chat format"),
    ("empty jsonl", "holds no GSM8K records"),
    ("malformed jsonl", ":2 is not a GSM8K record"),
    ("bad setting", "unknown setting 'group_sise'"),
    ("sft without data", "names no data_dir: pass --data_dir=DIR"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, case, message):
    init = write_checkpoint(tiny_model(), tmp_path / "init.pt")
    args = [f"--init_from={init}", f"--out_dir={tmp_path}/out", "--sft_coef=0"]
    if case == "missing":
        args = [f"--init_from={tmp_path}/nothing.pt"]
    elif case == "no think tokens":  # a model of raw bytes: its vocabulary has no room for the chat tokens
        args[0] = "--init_from=" + write_checkpoint(tiny_model(vocab_size=256), tmp_path / "bytes.pt")
    elif case == "empty jsonl":
        (tmp_path / "g.jsonl").write_text("\n")
        args.append(f"--gsm8k={tmp_path}/g.jsonl")
    elif case == "malformed jsonl":
        (tmp_path / "g.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "x"}\n')
        args.append(f"--gsm8k={tmp_path}/g.jsonl")
    elif case == "sft without data":  # the init checkpoint names no data_dir for the supervised mix-in
        args[-1] = "--sft_coef=0.5"
    else:
        args.append("--group_sise=4")
    code, err = run_rl(*args)
    assert code == 1 and err.startswith("rl.py: error:") and err.count("\n") == 1 and message in err, err


def test_gsm8k_mode_without_a_test_file_holds_out_the_last_records(tmp_path):
    records = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    init = write_checkpoint(tiny_model(seed=4), tmp_path / "init.pt")
    cfg, _ = rl.settings(["config/rl_gsm8k_nano.py", f"--init_from={init}", f"--gsm8k={tmp_path}/g.jsonl",
                          "--gsm8k_eval=", "--eval_items=2"])
    problems = rl.Problems(cfg, difficulty=None)
    assert [a for _, _, a in problems.heldout] == ["8", "10"] and len(problems.train) == 4
    drawn = problems.draw(20, rl.random.Random(0), cfg.task_floor)
    assert {t for t, _, _ in drawn} == {"gsm8k"} and {a for _, _, a in drawn} <= {"0", "2", "4", "6"}
    rl.main(["config/rl_gsm8k_nano.py", f"--init_from={init}", f"--gsm8k={tmp_path}/g.jsonl", f"--out_dir={tmp_path}/o",
             "--gsm8k_eval=", "--eval_items=2", "--max_iters=1", "--problems_per_step=2", "--group_size=2",
             "--max_new_tokens=8",
             "--grad_checkpoint=False", "--device=cpu"])
    metrics = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert "heldout_gsm8k" in metrics[0] and "reward_gsm8k" in metrics[1]


def test_gsm8k_presets_hold_out_the_test_split(tmp_path, monkeypatch):
    """What config/sft_chat.py prepares (GSM8K's train split) and what config/rl_gsm8k_nano.py evaluates on and picks
    best.pt by (its gsm8k_eval: the test split) do not overlap. A training record that is also held out is dropped."""
    import datasets
    import prepare
    train = [{"question": f"Tom has {i} apples and buys {i}. How many?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
             for i in range(40)]
    test = [{"question": f"Ann has {i} pears and eats one. How many?", "answer": f"{i}-1={i - 1}\n#### {i - 1}"}
            for i in range(2, 12)]
    splits = {"train": train, "test": test}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config, split, **kw: datasets.Dataset.from_list(
        splits[split]).to_iterable_dataset())
    sft_config = open(os.path.join(ROOT, "config", "sft_chat.py")).read()
    found = re.search(r"python prepare.py ((?:.*\\\n#\s*)*.*)", sft_config).group(1)  # with its continued lines
    command = shlex.split(re.sub(r"\\\n#\s*", " ", found))
    assert "gsm8k" in command
    flags = command[command.index("--max_samples"):]
    prepare.main(["gsm8k", *flags[:flags.index("--out_dir")], "--tokenizer", "byte", "--val_fraction", "0.2",
                  "--out_dir", str(tmp_path / "sft")])
    sft_text = BYTE.decode(np.fromfile(tmp_path / "sft" / "train.bin", np.uint16).tolist() +
                           np.fromfile(tmp_path / "sft" / "val.bin", np.uint16).tolist())
    monkeypatch.chdir(tmp_path)  # the preset's files, written as its comment says, from the splits above
    os.makedirs("data")
    for split, records in splits.items():
        datasets.Dataset.from_list(records).to_json(f"data/gsm8k_{split}.jsonl")
    init = write_checkpoint(tiny_model(), tmp_path / "init.pt")
    cfg, _ = rl.settings([os.path.join(ROOT, "config", "rl_gsm8k_nano.py"), f"--init_from={init}", "--eval_items=10"])
    problems = rl.Problems(cfg, difficulty=None)
    heldout = [messages[0]["content"] for _, messages, _ in problems.heldout]
    assert heldout == [r["question"] for r in test] and train[5]["question"] in sft_text
    assert [q for q in heldout if q in sft_text] == [] and len(problems.train) == len(train)
    datasets.Dataset.from_list(test + train[:1]).to_json("data/gsm8k_test.jsonl")
    problems = rl.Problems(SimpleNamespace(**{**vars(cfg), "eval_items": 11}), difficulty=None)
    assert train[0]["question"] not in [messages[0]["content"] for _, messages, _ in problems.train]
    assert len(problems.train) == len(train) - 1


def test_lora_rl_trains_adapters_only_and_resumes_exactly(tmp_path, monkeypatch):
    """lora_rank > 0: the checkpoints hold the adapters (q_proj and up_proj here) and their base; loaded, the merged
    model differs from the init model in those matrices alone; an interrupted run resumes to the same adapters."""
    monkeypatch.setattr(rl, "reward", lambda reply, task, answer: float(len(reply.ids) % 2))
    init = write_checkpoint(tiny_model(seed=2), tmp_path / "init.pt")
    args = [*ARGS, "--lora_rank=2", "--lora_targets=q_proj,up_proj"]
    rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/straight", *args])
    monkeypatch.setattr(rl, "StopFlag", lambda: StopAfter(2))
    with pytest.raises(SystemExit):
        rl.main([f"--init_from={init}", f"--out_dir={tmp_path}/resumed", *args])
    monkeypatch.setattr(rl, "StopFlag", lambda: StopAfter(10 ** 9))
    rl.main(["--resume", f"--out_dir={tmp_path}/resumed", "--lora_rank=8"])  # the adapters' own shape wins
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert straight["lora"]["base"] == init and straight["model"].keys() == resumed["model"].keys()
    assert {k.rsplit(".", 2)[-2] for k in straight["model"]} == {"q_proj", "up_proj"}
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    merged, _ = load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    base = torch.load(init, weights_only=True)["model"]
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and {k.rsplit(".", 2)[-2] for k in changed} <= {"q_proj", "up_proj"}
