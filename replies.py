"""
Replies: the assistant's turn generated, streamed and read (its thinking, its answer), and whether it is right.
"""
import time
from dataclasses import dataclass, field

from tasks import check_answer
from tokenizer import TextStream, all_special_ids, special_ids, split_thinking

# The special tokens that may occur inside an assistant reply; any other one (<|/assistant|>, <|eos|>, or
# the model starting a turn of its own such as <|user|>) ends the reply and is never shown.
REPLY_TOKENS = ("<|think|>", "<|/think|>", "<|no_think|>", "<|assistant|>")


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
