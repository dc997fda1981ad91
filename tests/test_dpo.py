"""dpo.py: the loss against a full recomputation, a few steps raise the preference margin, self-built pairs pair a
right reply with a wrong one that ended its turn and read back as written, bad pairs are one-line errors, and a run
writes checkpoints the other scripts load, resumed after an interruption bit for bit."""
import contextlib
import json
import math
import signal

import pytest
import torch

import dpo
from common import UserError
from conftest import (BYTE, SP, ScriptedModel, StopAfter, all_logits, run_script, text_ids, tiny_model,
                      write_checkpoint)
from checkpoints import load_checkpoint
from tasks import check_answer

THINK_END, ASSISTANT, END = SP["<|/think|>"], SP["<|assistant|>"], SP["<|/assistant|>"]
NO_GRAD_CTX = contextlib.nullcontext()


def record(question, chosen, rejected, **extra):
    """A pairs-file object: replies as (thinking, content), or text (no thinking)."""
    def reply(r):
        return r if isinstance(r, str) else {"thinking": r[0], "content": r[1]}
    return {"messages": [{"role": "user", "content": question}], "chosen": reply(chosen), "rejected": reply(rejected),
            **extra}


RECORDS = [record("What is 2 + 3?", ("2+3: 2+3=5, 5", "5"), ("2+3: 2+3=6, 6", "6")),
           record("Sort: 3, 1, 2", ("1 2 3", "1, 2, 3"), ("3 1 2", "3, 1, 2")),
           record("Hi", "Hello!", "Go away."),                           # no thinking
           record("What is 7 * 8?", ("7*8=56", "56"), "54"),              # thinking against none
           record("Count the r in <|think|>rare", ("r, a, r, e", "2"), ("", "3"))]


def naive_logprob(model, prompt, reply):
    """log p(reply | prompt) from every position's logits, one sequence at a time (no padding, no chunking)."""
    seq = torch.tensor([prompt + reply])
    logp = torch.log_softmax(all_logits(model, seq[:, :-1]).double(), -1)[0]
    return sum(logp[len(prompt) - 1 + i, token].item() for i, token in enumerate(reply))


def test_the_loss_equals_a_hand_computation_from_a_full_recomputation():
    """Reference log-probs (the init model, batched and padded) and policy log-probs (another model) of each reply
    equal per-sequence full recomputations, and the loss is -log sigmoid(beta * (margin of chosen - of rejected))."""
    encoded = [dpo.encode_pair(dpo.parse_pair(r), BYTE) for r in RECORDS]
    reference, policy = tiny_model(seed=1, random_norms=True), tiny_model(seed=2, random_norms=True)
    ref = dpo.reference_logprobs(reference, encoded, 2, NO_GRAD_CTX)
    chosen, rejected = dpo.reply_logprobs(policy, encoded, NO_GRAD_CTX)
    losses, chosen_reward, rejected_reward = dpo.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=0.1)
    for i, (prompt, c, r) in enumerate(encoded):
        ref_c, ref_r = naive_logprob(reference, prompt, c), naive_logprob(reference, prompt, r)
        pi_c, pi_r = naive_logprob(policy, prompt, c), naive_logprob(policy, prompt, r)
        assert ref[i].tolist() == pytest.approx([ref_c, ref_r], rel=1e-4)
        assert [chosen[i].item(), rejected[i].item()] == pytest.approx([pi_c, pi_r], rel=1e-4)
        z = 0.1 * ((pi_c - ref_c) - (pi_r - ref_r))
        assert losses[i].item() == pytest.approx(math.log(1 + math.exp(-z)), rel=1e-3, abs=1e-5)
        assert chosen_reward[i].item() - rejected_reward[i].item() == pytest.approx(z, rel=1e-3, abs=1e-5)
    # a reply is its whole assistant turn: from its <|think|> (or <|no_think|>) through <|/assistant|>
    prompt, c, r = encoded[3]
    assert prompt[-1] == SP["<|/user|>"] and c[0] == SP["<|think|>"] and r[:2] == [SP["<|no_think|>"], ASSISTANT]
    assert c[-1] == r[-1] == END and c[c.index(THINK_END) + 1] == ASSISTANT
    assert SP["<|think|>"] not in encoded[4][0]  # a user's literal <|think|> stays text


def test_the_nll_term_adds_the_chosen_replies_log_likelihood_per_token():
    encoded = [dpo.encode_pair(dpo.parse_pair(r), BYTE) for r in RECORDS[:3]]
    reference, policy = tiny_model(seed=1), tiny_model(seed=2)
    ref = dpo.reference_logprobs(reference, encoded, 3, NO_GRAD_CTX)
    plain = dpo.dpo_step(policy, encoded, ref, [0, 1, 2], 0.1, 3, FakeScaler(), NO_GRAD_CTX)
    with_nll = dpo.dpo_step(policy, encoded, ref, [0, 1, 2], 0.1, 3, FakeScaler(), NO_GRAD_CTX, nll_coef=0.5)
    nll = [-naive_logprob(policy, prompt, c) / len(c) for prompt, c, _ in encoded]
    assert with_nll["chosen_nll"] == pytest.approx(sum(nll) / 3, rel=1e-4)
    assert with_nll["loss"] == pytest.approx(plain["loss"] + 0.5 * sum(nll) / 3, rel=1e-4)


class FakeScaler:
    def scale(self, loss):
        return loss


def test_a_few_steps_raise_the_margin_and_micro_batches_give_the_same_gradient():
    """Starting at the reference, the loss is log 2 and the margin 0; steps of DPO raise the policy's margin
    (chosen minus rejected log-prob, relative to the reference) every time. The gradient does not depend on
    micro_batch."""
    encoded = [dpo.encode_pair(dpo.parse_pair(r), BYTE) for r in RECORDS[:3]]
    grads = []
    for micro in (1, 2, 3):
        model = tiny_model(seed=3).train()
        ref = dpo.reference_logprobs(model, encoded, 3, NO_GRAD_CTX)
        dpo.dpo_step(model, encoded, ref, [0, 1, 2], 0.1, micro, FakeScaler(), NO_GRAD_CTX)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert all(torch.allclose(g, grads[-1], rtol=1e-4, atol=1e-7) for g in grads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.zero_grad(set_to_none=True)
    margins, losses = [], []
    for _ in range(5):
        with torch.no_grad():
            chosen, rejected = dpo.reply_logprobs(model, encoded, NO_GRAD_CTX)
        margins.append(((chosen - ref[:, 0]) - (rejected - ref[:, 1])).tolist())
        losses.append(dpo.dpo_step(model, encoded, ref, [0, 1, 2], 0.1, 2, FakeScaler(), NO_GRAD_CTX)["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and margins[0] == pytest.approx([0, 0, 0], abs=1e-4)
    for before, after in zip(margins, margins[1:]):
        assert all(a > b for a, b in zip(after, before)), margins
    assert losses[-1] < losses[0]


class Scripted(ScriptedModel):
    """A ScriptedModel with the train/eval switches dpo.py calls."""
    def eval(self):
        return self

    train = eval


def test_self_built_pairs_pair_a_right_reply_with_a_wrong_one_that_ended(tmp_path, monkeypatch):
    """Problem i is answered (one reply a row, in turn): i % 3 == 0 always right, 1 always wrong, 2 cut off, right,
    wrong. Only the last kind gives a pair: the right reply chosen, the wrong one that ended its turn rejected (never
    the cut-off one). The training side is drawn; the file reads back exactly as built."""
    drawn, rows = [], iter(range(10 ** 6))

    def problem(task, rng, difficulty, heldout):
        drawn.append(heldout)
        return f"What is {len(drawn) - 1} + 1?", "", str(len(drawn))

    def script(prompt):
        assert prompt[-1] == SP["<|think|>"]  # reasoning "on"
        i = int(bytes(t for t in prompt if t < 256).decode().split("What is ")[-1].split(" ")[0])
        kind = "right" if i % 3 == 0 else "wrong" if i % 3 == 1 else ("cut", "right", "wrong")[next(rows) % 3]
        answer = str(i + 1) if kind == "right" else str(i + 7)
        ids = text_ids(f"{i}+1 <|think|>") + [THINK_END, ASSISTANT] + text_ids(answer)
        return ids if kind == "cut" else ids + [END]

    monkeypatch.setattr(dpo, "sample_problem", problem)
    cfg, _ = dpo.settings([f"--init_from={write_checkpoint(tiny_model(), tmp_path / 'init.pt')}", "--max_prompts=12",
                           "--samples_per_prompt=3", "--max_new_tokens=32"])
    model = Scripted(script)
    records, n = dpo.build_pairs(model, BYTE, cfg, None, NO_GRAD_CTX, dpo.StopFlag())
    assert n == 12 and len(drawn) == 12 and not any(drawn)
    assert [r["answer"] for r in records] == ["3", "6", "9", "12"]
    for r in records:
        assert r["task"] in dpo.TASKS and r["chosen"]["thinking"].endswith("+1 <|think|>")
        assert check_answer(r["task"], r["chosen"]["content"], r["answer"])
        assert not check_answer(r["task"], r["rejected"]["content"], r["answer"])
    dpo.write_pairs(records, tmp_path / "pairs.jsonl")
    read, encoded = dpo.read_pairs(tmp_path / "pairs.jsonl", BYTE, 128)
    assert read == records and encoded == [dpo.encode_pair(r, BYTE) for r in records]
    assert list((tmp_path).glob("*.tmp")) == []


def write_lines(path, *lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}


@pytest.mark.parametrize("lines, message", [
    (None, "cannot read pairs="),
    (["", "  "], "holds no preference pairs"),
    ([GOOD, "{not json"], ":2 is not JSON"),
    ([[GOOD]], ":1: not a JSON object"),
    ([{"prompt": "Q?", "chosen": "a"}], ":1: expected chosen, rejected, and messages or prompt"),
    ([GOOD | {"messages": [{"role": "user", "content": "Q?"}]}], ":1: expected chosen, rejected, and messages or"),
    ([{"chosen": "a", "rejected": "b"}], ":1: expected chosen, rejected, and messages or prompt"),
    ([GOOD | {"chosen": {"content": 2}}], "chosen must be a reply"),
    ([GOOD, GOOD, GOOD | {"rejected": {"content": "2", "thinking": None}}], ":3: chosen and rejected are the same"),
    ([{"messages": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"}], "end with a user"),
    ([GOOD | {"chosen": "x" * 200}], "longer than the model's context (128)"),
])
def test_bad_pairs_are_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "pairs.jsonl" if lines is None else write_lines(tmp_path / "pairs.jsonl", *lines)
    with pytest.raises(UserError) as e:
        dpo.read_pairs(path, BYTE, 128)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


ARGS = ["--max_iters=4", "--eval_interval=2", "--ckpt_interval=2", "--eval_items=1", "--batch_size=3",
        "--micro_batch=2", "--max_new_tokens=8", "--learning_rate=1e-3", "--warmup_iters=1", "--device=cpu",
        "--dtype=float32"]


def test_the_script_says_what_is_wrong_in_one_line(tmp_path):
    init = write_checkpoint(tiny_model(), tmp_path / "init.pt")
    bad = write_lines(tmp_path / "bad.jsonl", GOOD, GOOD | {"rejected": "2"})
    code, _, err = run_script("dpo.py", f"--init_from={init}", f"--pairs={bad}", f"--out_dir={tmp_path}/o", *ARGS)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"dpo.py: error: {bad}:2: chosen and rejected"), err
    # an untrained model never answers right: no pairs to build
    code, _, err = run_script("dpo.py", f"--init_from={init}", f"--out_dir={tmp_path}/o", "--max_prompts=2",
                              "--samples_per_prompt=2", *ARGS)
    assert code == 1 and err.count("\n") == 1, err  # after the progress bar, cleared
    assert err.splitlines()[-1].split("\r")[-1].startswith("dpo.py: error: no pairs: of 2 replies"), err


def test_a_run_resumes_bit_for_bit_and_writes_checkpoints_the_other_scripts_load(tmp_path, monkeypatch):
    init = write_checkpoint(tiny_model(seed=4), tmp_path / "init.pt")
    pairs = write_lines(tmp_path / "prefs.jsonl", *RECORDS)
    args = [f"--init_from={init}", f"--pairs={pairs}", *ARGS]
    dpo.main([*args, f"--out_dir={tmp_path}/straight"])
    monkeypatch.setattr(dpo, "StopFlag", lambda: StopAfter(2))
    with pytest.raises(SystemExit) as e:
        dpo.main([*args, f"--out_dir={tmp_path}/resumed"])
    assert e.value.code == 128 + signal.SIGINT
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["iter_num"] == 2
    (tmp_path / "init.pt").unlink()  # the reference's log-probs are in the checkpoint
    monkeypatch.setattr(dpo, "StopFlag", lambda: StopAfter(10 ** 9))
    dpo.main(["--resume", f"--out_dir={tmp_path}/resumed"])
    straight, resumed = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("straight", "resumed"))
    assert straight["iter_num"] == resumed["iter_num"] == 4
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert torch.equal(straight["ref_logprobs"], resumed["ref_logprobs"])
    metrics = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [m["iter"] for m in metrics if "loss" in m] == [0, 1, 2, 3]
    assert {m["iter"] for m in metrics if "heldout_accuracy" in m} == {0, 2, 4}
    steps = [m for m in metrics if "loss" in m]
    assert steps[-1]["reward_margin"] > 0 and steps[-1]["preference_accuracy"] > 0.5, steps
    records, _ = dpo.read_pairs(tmp_path / "resumed" / "pairs.jsonl", BYTE, 128)
    assert records == [dpo.parse_pair(r) for r in RECORDS]
    code, out, err = run_script("sample.py", "--out_dir", tmp_path / "resumed", "--num_samples", 1,
                                "--max_new_tokens", 4, "--device", "cpu")  # best.pt, as eval.py and chat.py load it
    assert code == 0 and "4 tokens" in err and out.strip(), err
    # the pairs a run trained on are the ones it resumes with
    write_lines(tmp_path / "resumed" / "pairs.jsonl", *RECORDS[:2])
    with pytest.raises(UserError, match="pairs.jsonl changed since the run started"):
        dpo.main(["--resume", f"--out_dir={tmp_path}/resumed"])


def test_a_run_on_self_built_pairs(tmp_path, monkeypatch):
    """pairs="": the run samples its pairs (here "right" is an even number of tokens), writes and trains on them."""
    monkeypatch.setattr(dpo, "is_correct", lambda reply, task, answer: reply.finish == "stop" and len(reply.ids) % 2)
    init = write_checkpoint(tiny_model(seed=5), tmp_path / "init.pt")
    dpo.main([f"--init_from={init}", f"--out_dir={tmp_path}/o", "--max_prompts=14", "--samples_per_prompt=4",
              "--num_pairs=3", *ARGS, "--max_iters=2"])
    records, _ = dpo.read_pairs(tmp_path / "o" / "pairs.jsonl", BYTE, 128)
    assert 1 <= len(records) <= 3
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and ckpt["ref_logprobs"].shape == (len(records), 2)


def test_lora_dpo_trains_adapters_on_a_frozen_base(tmp_path):
    """lora_rank > 0: DPO moves the adapters alone; the checkpoint holds them and their base, and loads merged."""
    init = write_checkpoint(tiny_model(seed=4), tmp_path / "init.pt")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]), encoding="utf-8")
    dpo.main([f"--init_from={init}", f"--out_dir={tmp_path}/o", f"--pairs={pairs}", *ARGS, "--lora_rank=2",
              "--lora_targets=v_proj"])
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["lora"]["base"] == init and {k.rsplit(".", 2)[-2] for k in ckpt["model"]} == {"v_proj"}
    merged, _ = load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    base = torch.load(init, weights_only=True)["model"]
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(k.endswith("v_proj.weight") for k in changed)
