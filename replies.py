"""
Replies: the assistant's turn generated, streamed and read (its thinking, its answer), and whether it is right
(one reply; held-out accuracy, rl.py's and dpo.py's evaluation), and a reply's log-probabilities under a model.
"""
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tasks import check_answer
from tokenizer import TextStream, all_special_ids, render_prompt, special_ids, split_thinking

# The special tokens that may occur inside an assistant reply; any other one (<|/assistant|>, <|eos|>, or
# the model starting a turn of its own such as <|user|>) ends the reply and is never shown.
REPLY_TOKENS = ("<|think|>", "<|/think|>", "<|no_think|>", "<|assistant|>")
VALIDATION_SEED = 7  # rl.py's and dpo.py's held-out items: eval.py draws its own (another seed), not chosen on


def reply_stop_ids(enc):
    return all_special_ids(enc) - {special_ids(enc)[t] for t in REPLY_TOKENS}


@dataclass
class Reply:
    part: str = "answer"        # where the newest text belongs: "thinking" or "answer"
    ids: list = field(default_factory=list)  # generated token ids, the stop token included
    thinking_tokens: int = 0    # ordinary tokens inside the think block
    seconds: float = 0.0
    finish: str = "length"      # "stop" (end of turn), "length" (max_new_tokens or full context), "interrupted"
    thinking: "str | None" = None  # the think block's text, None when the model answered without one
    answer: str = ""


def generate_replies(model, enc, prompts, sampling, generator=None, batch_size=64, on_text=None, should_stop=None,
                     interruptible=False):
    """The assistant's turns for prompts (from render_prompt) -> [Reply]: the one place replies are made. sampling is
    model.generate's keyword arguments plus max_thinking_tokens (thinking_budget). Prompts of equal length share a
    batch of model.generate, up to batch_size rows; a reply's seconds are its batch's
    time shared by its rows. on_text(reply, text) gets printable text as it arrives, reply.part telling thinking
    from answer (chat.py and serve.py stream a batch of one). should_stop(reply), asked after every token, ends
    a reply when it returns a finish reason (serve.py: a stop string, a client that left, the time limit). With
    interruptible, Ctrl-C ends the replies (finish "interrupted") instead of propagating."""
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    replies = [None] * len(prompts)
    for same_length in by_length.values():
        for k in range(0, len(same_length), batch_size):
            rows = same_length[k:k + batch_size]
            batch = reply_batch(model, enc, [prompts[i] for i in rows], sampling, generator, on_text, should_stop,
                                interruptible)
            for i, reply in zip(rows, batch):
                replies[i] = reply
    return replies


def generate_reply(model, enc, prompt, sampling, generator=None, **streaming):
    """The reply to one prompt: generate_replies with a batch of one."""
    return generate_replies(model, enc, [prompt], sampling, generator, **streaming)[0]


def reply_batch(model, enc, prompts, sampling, generator, on_text, should_stop, interruptible):
    """Replies to prompts of equal length, decoded together, each token read as it comes (add_token)."""
    sp, stop_ids = special_ids(enc), reply_stop_ids(enc)
    forced = [forced_reply_start(prompt, enc) for prompt in prompts]
    replies = [Reply(part="thinking" if f[-1:] == [sp["<|think|>"]] else "answer") for f in forced]
    streams = [TextStream(enc) for _ in prompts]
    live = set(range(len(prompts)))
    kwargs = {k: v for k, v in sampling.items() if k != "max_thinking_tokens"}
    force = thinking_budget(replies, sampling.get("max_thinking_tokens"), enc)
    t0 = time.perf_counter()
    try:
        for step in model.generate(prompts, **kwargs, stop_ids=stop_ids, generator=generator, force=force):
            for row, token_id in step.items():
                if row in live and add_token(replies[row], streams[row], token_id, sp, stop_ids, on_text, should_stop):
                    live.discard(row)
            if not live:  # should_stop ended every row still decoding
                break
    except KeyboardInterrupt:
        if not interruptible:
            raise
        for row in live:
            replies[row].finish = "interrupted"
    seconds = (time.perf_counter() - t0) / len(prompts)
    for reply, stream, start in zip(replies, streams, forced):
        if (text := stream.flush()) and on_text:  # the reply ended inside a character
            on_text(reply, text)
        reply.seconds = seconds
        ids = start + (reply.ids[:-1] if reply.finish == "stop" else reply.ids)  # the stop token may be <|/user|>
        thinking, reply.answer = split_thinking(ids, enc)
        reply.thinking = thinking if sp["<|think|>"] in ids else None
    return replies


def add_token(reply, stream, token_id, sp, stop_ids, on_text, should_stop):
    """One generated token into its reply: its text streamed, the part it belongs to and the thinking length
    updated as it streams (chat.py shows that count when the thinking ends) -> whether the reply has ended."""
    reply.ids.append(token_id)
    if token_id in stop_ids:
        reply.finish = "stop"
        return True
    text = stream(token_id)  # a special token flushes a half-decoded character of its part
    if token_id == sp["<|think|>"]:
        reply.part = "thinking"
    elif token_id == sp["<|/think|>"]:
        reply.part = "answer"
    elif reply.part == "thinking" and token_id not in stream.special:
        reply.thinking_tokens += 1
    if text and on_text:
        on_text(reply, text)
    if should_stop and (finish := should_stop(reply)):
        reply.finish = finish
        return True
    return False


def thinking_budget(replies, max_thinking_tokens, enc):
    """model.generate's force for a thinking budget (Qwen3's): a row whose think block holds max_thinking_tokens
    tokens gets <|/think|> next instead of a sampled token, and the model answers. None: no budget."""
    if max_thinking_tokens is None:
        return None
    close = special_ids(enc)["<|/think|>"]

    def force(rows, tokens):
        return [close if replies[row].part == "thinking" and replies[row].thinking_tokens >= max_thinking_tokens
                else token for row, token in zip(rows, tokens)]
    return force


def forced_reply_start(prompt, enc):
    """What the prompt already says about the reply: <|think|> (reasoning on), <|no_think|><|assistant|> (off)
    or nothing (the model chooses): the ids after its last <|/user|>. They are part of the reply."""
    user_end = len(prompt) - 1 - prompt[::-1].index(special_ids(enc)["<|/user|>"])
    return list(prompt[user_end + 1:])


def is_correct(reply, task, answer):
    """Whether a reply solves a problem (eval.py's score, rl.py's reward): it ended its turn, and its answer (the
    text after the thinking) checks out (tasks.check_answer). A reply cut off by max_new_tokens or the context
    is wrong whatever its text says so far: the model never committed to it."""
    return reply.finish == "stop" and check_answer(task, reply.answer, answer)


@torch.no_grad()
def greedy_rewards(model, enc, items, max_new_tokens, ctx, reasoning="on"):
    """Greedy answers to (task, messages, answer) items in a reasoning mode -> (rewards: 1.0 right, 0.0 not;
    replies)."""
    prompts = [render_prompt(messages, enc, reasoning) for _, messages, _ in items]
    model.eval()
    with ctx:
        replies = generate_replies(model, enc, prompts, dict(max_new_tokens=max_new_tokens, temperature=0.0))
    model.train()
    return [float(is_correct(r, task, answer)) for (task, _, answer), r in zip(items, replies)], replies


def evaluate(model, enc, items, max_new_tokens, ctx, reasoning):
    """Greedy answers to held-out items -> ({task: accuracy}, mean thinking tokens)."""
    rewards, replies = greedy_rewards(model, enc, items, max_new_tokens, ctx, reasoning)
    correct, counts = {}, {}
    for (task, _, _), r in zip(items, rewards):
        correct[task] = correct.get(task, 0) + r
        counts[task] = counts.get(task, 0) + 1
    accuracy = {task: correct[task] / counts[task] for task in counts}
    return accuracy, sum(r.thinking_tokens for r in replies) / len(replies)


def report_heldout(log, iter_num, accuracy, thinking):
    """Log (a training.MetricsLog) and print a held-out evaluation -> the overall accuracy."""
    overall = sum(accuracy.values()) / len(accuracy)
    log.write(iter=iter_num, heldout_accuracy=overall, heldout_thinking_tokens=thinking,
              **{f"heldout_{t}": a for t, a in accuracy.items()})
    tqdm.write(f"step {iter_num}: held-out accuracy {overall:.1%} ("
               + ", ".join(f"{t} {a:.0%}" for t, a in accuracy.items()) + f"), thinking {thinking:.0f} tokens")
    return overall


def reply_token_losses(model, prompts, replies, ctx):
    """-log p of each reply token after its prompt (token id lists; row i is prompts[i] + replies[i], stop token
    included) -> (rows, T): position j holds the loss of token j + 1 where that is a reply token, else 0 (the
    prompt, and the right padding of shorter rows, which causal attention keeps from the others). Rows are padded
    to a multiple of 64 tokens: a handful of shapes instead of one per reply length, so the kernels oneDNN builds
    and caches per shape under bf16 autocast stay few (rl.py's peak RSS: docs/rl.md#memory)."""
    longest = max(len(p) + len(r) for p, r in zip(prompts, replies))
    length = max(longest, min(-(-longest // 64) * 64, model.config.block_size + 1))
    idx = torch.zeros(len(replies), length, dtype=torch.long)
    targets = torch.full((len(replies), length), -1, dtype=torch.long)
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        seq = torch.tensor(prompt + reply)
        idx[row, :len(seq)] = seq
        targets[row, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]  # position i predicts token i + 1
    idx, targets = idx[:, :-1].to(model.device), targets[:, :-1].to(model.device)
    with ctx:
        return model(idx, targets, reduction="none")[1]  # -log p(token), 0 on padding
