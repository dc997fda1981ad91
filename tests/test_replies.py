"""replies.py: the one reply builder, batched or streamed, and what counts as a correct reply."""
from conftest import BYTE, SP, ScriptedModel, text_ids, tiny_model
from replies import generate_replies, generate_reply, is_correct
from tokenizer import render_prompt


def test_generate_replies_equal_generate_reply_under_greedy_decoding():
    """Batched replies (prompts grouped by length, several batches) read exactly as one-at-a-time replies:
    ids, finish, thinking, answer and thinking length, whether the prompt forced thinking on, off or neither."""
    model = tiny_model(seed=3, random_norms=True)
    questions = ["What is 1 + 2?", "What is 3 + 4?", "Sort: 5, 2", "Hi", "What is 9 + 9?", "Count the r in rare"]
    prompts = [render_prompt([{"role": "user", "content": q}], BYTE, mode)
               for q in questions for mode in ("on", "off", "auto")]
    sampling = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=None)
    batched = generate_replies(model, BYTE, prompts, sampling, batch_size=2)
    for prompt, reply in zip(prompts, batched):
        one = generate_reply(model, BYTE, prompt, sampling)
        assert (reply.ids, reply.finish, reply.thinking, reply.answer, reply.thinking_tokens) == \
               (one.ids, one.finish, one.thinking, one.answer, one.thinking_tokens)
    assert {r.finish for r in batched} == {"stop", "length"}  # rows left their batches at different steps
    assert any(r.thinking is not None for r in batched[2::3])  # the model chose to think where it could


def test_a_cut_off_reply_is_wrong_whatever_its_text():
    """is_correct, eval.py's score and rl.py's reward: the right answer counts only in a reply that ended its turn;
    cut off by max_new_tokens (finish "length") it scores 0, even when the text so far is the answer."""
    answer = [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids("42")
    prompt = render_prompt([{"role": "user", "content": "What is 40 + 2?"}], BYTE, "on")
    sampling = dict(max_new_tokens=50, temperature=0.0)
    ended = generate_reply(ScriptedModel(text_ids("40+2") + answer + [SP["<|/assistant|>"]]), BYTE, prompt, sampling)
    cut = generate_reply(ScriptedModel(text_ids("40+2") + answer), BYTE, prompt, sampling)  # no end of turn
    assert (ended.finish, ended.answer, cut.finish, cut.answer) == ("stop", "42", "length", "42")
    assert is_correct(ended, "add", "42") and not is_correct(cut, "add", "42")
    assert not is_correct(ended, "add", "43")
    unfinished = generate_reply(ScriptedModel(text_ids("40+2=42")), BYTE, prompt, sampling)  # never left its thinking
    assert unfinished.thinking == "40+2=42" and unfinished.answer == "" and not is_correct(unfinished, "add", "42")


def test_a_thinking_budget_closes_the_think_block_and_the_model_answers():
    """max_thinking_tokens=k: after k thinking tokens <|/think|> is forced in place of the next one (Qwen3's budget),
    per row of a batch; a think block shorter than the budget is left alone."""
    prompt = render_prompt([{"role": "user", "content": "What is 40 + 2?"}], BYTE, "on")
    script = text_ids("40+2=42 done") + [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids("42") + \
        [SP["<|/assistant|>"]]
    sampling = dict(max_new_tokens=40, temperature=0.0)
    whole = generate_reply(ScriptedModel(script), BYTE, prompt, sampling | {"max_thinking_tokens": 12})
    assert whole.thinking == "40+2=42 done" and whole.answer == "42" and whole.thinking_tokens == 12
    cut = generate_reply(ScriptedModel(script), BYTE, prompt, sampling | {"max_thinking_tokens": 4})
    assert cut.ids[:5] == text_ids("40+2") + [SP["<|/think|>"]] and cut.thinking == "40+2"
    assert cut.thinking_tokens == 4 and cut.part == "answer"
    # a batch: each row's budget is its own, and a row under its budget is left alone
    short = text_ids("42") + [SP["<|/think|>"], SP["<|assistant|>"]] + text_ids("43") + [SP["<|/assistant|>"]]
    other = render_prompt([{"role": "user", "content": "What is 41 + 2?"}], BYTE, "on")
    replies = generate_replies(ScriptedModel(lambda p: script if p == prompt else short), BYTE, [prompt, other],
                               sampling | {"max_thinking_tokens": 3})
    assert (replies[0].thinking, replies[0].thinking_tokens) == ("40+", 3)
    assert (replies[1].thinking, replies[1].answer, replies[1].thinking_tokens) == ("42", "43", 2)
    direct = [SP["<|no_think|>"], SP["<|assistant|>"]] + text_ids("42") + [SP["<|/assistant|>"]]
    auto = render_prompt([{"role": "user", "content": "What is 40 + 2?"}], BYTE, "auto")
    chose = generate_reply(ScriptedModel(direct), BYTE, auto, sampling | {"max_thinking_tokens": 0})
    assert chose.thinking is None and chose.answer == "42"  # no think block: nothing to close
