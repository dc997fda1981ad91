"""
Tokenizers, the chat format, and text streamed out of token ids.

Three kinds of tiktoken encoding, each extended with the same 12 chat special tokens:
  "gpt2" - GPT-2 BPE (50257 tokens incl. <|endoftext|>) for real text; specials are 50257..50268
  "byte" - one token per byte (256 tokens) for the built-in dataset and fully offline use; specials 256..267
  a BPE trained on your data (train_bpe: prepare.py --tokenizer bpe:N) - N tokens, the specials its last 12; it
         travels as a dict (saved as bpe.json beside the data, and inside every checkpoint)

A conversation is rendered as
  <|bos|> [<|system|>…<|/system|>] <|user|>…<|/user|> <|think|>…<|/think|> <|assistant|>…<|/assistant|> …
  <|eos|>
with <|no_think|> in place of the think block when the assistant answers directly. The loss mask is 1
exactly on what the model must learn to produce: the think block (or <|no_think|>), the assistant turn
and the final <|eos|>. Text from users and datasets is always encoded with encode_ordinary, so a literal
"<|think|>" typed by a user stays ordinary text and can never become a control token.
"""
import base64
import codecs
import functools
import hashlib
import json
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # GPT-2's pre-tokenizer regex

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|/system|>", "<|user|>", "<|/user|>",
                  "<|assistant|>", "<|/assistant|>", "<|think|>", "<|/think|>", "<|no_think|>"]
TOKENIZERS = ("gpt2", "byte")
GPT2_RANKS_ENV = "NANOFORGE_GPT2_RANKS"  # a local gpt2.tiktoken file (e.g. from the openai-whisper sdist)
# Pre-tokenizer regexes by the name llama.cpp knows them by (a GGUF names its pre-tokenizer; llama.cpp has the
# regex built in). A trained BPE uses Qwen2's: GPT-2's rules, but one digit per token (\p{N}, not \p{N}+), so
# the model sees every digit of a number, as arithmetic needs; on GSM8K that costs 1.18x the tokens of a BPE
# that merges digit runs (docs/tokenizer.md).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": GPT2_PATTERN, "qwen2": QWEN2_PATTERN}
BPE_PRE_TOKENIZER = "qwen2"
BPE_FILE = "bpe.json"  # a trained tokenizer beside the data prepared with it
MIN_BPE, MAX_BPE = 512, 65536  # ids must fit prepare.py's uint16 bins


def get_tokenizer(spec):
    """The tiktoken encoding of spec ("byte", "gpt2", or a trained BPE's dict from train_bpe / read_bpe) with the
    chat special tokens appended after its base vocabulary. Problems a user can fix (an unknown name, GPT-2 ranks
    that cannot be loaded, a corrupt trained tokenizer) raise ValueError with a one-line message."""
    if isinstance(spec, dict):
        return _trained(spec)
    if spec == "byte":
        return _with_chat_tokens("byte", {bytes([b]): b for b in range(256)}, {})
    if spec == "gpt2":
        return _with_chat_tokens("gpt2", _gpt2_ranks(), {"<|endoftext|>": 50256})
    raise ValueError(f"unknown tokenizer {spec!r}: choose one of {', '.join(TOKENIZERS)}")


def tokenizer_name(spec):
    """What a tokenizer is called: a built-in's name, or a trained BPE's, e.g. bpe16384-1a2b3c4d (its hash)."""
    return spec["name"] if isinstance(spec, dict) else spec


def _with_chat_tokens(name, ranks, base_specials, pre_tokenizer="gpt-2"):
    """One shared rule for every tokenizer: special token i gets id base_vocab + i. For "byte" (no merges) the
    split pattern only groups bytes before lookup and never changes the ids."""
    base = len(ranks) + len(base_specials)
    specials = {**base_specials, **{tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}}
    return tiktoken.Encoding(name, pat_str=PRE_TOKENIZERS[pre_tokenizer], mergeable_ranks=ranks,
                             special_tokens=specials)


def pre_tokenizer_name(enc):
    """llama.cpp's name for enc's split pattern."""
    return next(name for name, pattern in PRE_TOKENIZERS.items() if pattern == enc._pat_str)


# ---------------------------------------------------------------------------------------------- trained BPE

def train_bpe(texts, n_vocab):
    """A byte-level BPE trained on texts (an iterable of str) by rustbpe: n_vocab tokens in all, the 256 bytes,
    then the merges, then the 12 chat tokens (fewer merges when the text has no more pairs to merge). rustbpe
    beat HF tokenizers here: 9 s vs 22 s and 255 vs 470 MB on 100 MB, both identical run to run (docs/tokenizer.md).
    Returns the dict get_tokenizer takes: {"name", "pre_tokenizer", "tokens": base64 of each token, by rank}."""
    if not MIN_BPE <= n_vocab <= MAX_BPE:
        raise ValueError(f"bpe:{n_vocab}: the vocabulary must be {MIN_BPE} to {MAX_BPE} tokens (uint16 ids)")
    import rustbpe  # only prepare.py trains
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, n_vocab - len(SPECIAL_TOKENS), pattern=PRE_TOKENIZERS[BPE_PRE_TOKENIZER])
    ranked = sorted(bpe.get_mergeable_ranks(), key=lambda item: item[1])
    return _bpe_spec([token for token, _ in ranked], BPE_PRE_TOKENIZER)


def _bpe_spec(tokens, pre_tokenizer):
    encoded = [base64.b64encode(token).decode("ascii") for token in tokens]
    digest = hashlib.sha256(json.dumps([pre_tokenizer, encoded]).encode()).hexdigest()[:8]
    return {"name": f"bpe{len(tokens) + len(SPECIAL_TOKENS)}-{digest}", "pre_tokenizer": pre_tokenizer,
            "tokens": encoded}


def _trained(spec):
    """A trained BPE's encoding, after checking that its dict is whole: the name is the hash of the rest, so a
    tokenizer edited or cut short is refused rather than silently giving other ids."""
    try:
        tokens = [base64.b64decode(t, validate=True) for t in spec["tokens"]]
        valid = (_bpe_spec(tokens, spec["pre_tokenizer"]) == spec and len(set(tokens)) == len(tokens)
                 and tokens[:256] == [bytes([b]) for b in range(256)])
    except (KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
        valid = False
    if not valid:
        raise ValueError(f"tokenizer {spec.get('name', '?') if isinstance(spec, dict) else '?'} is corrupt (its "
                         "tokens do not match its name's hash): prepare the data with --tokenizer bpe:N again")
    return _with_chat_tokens(spec["name"], {t: i for i, t in enumerate(tokens)}, {}, spec["pre_tokenizer"])


def read_bpe(path):
    """A trained tokenizer from its file, or from a data folder holding one (BPE_FILE) -> its dict."""
    if os.path.isdir(path):
        path = os.path.join(path, BPE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no trained tokenizer at {path}: give a {BPE_FILE} or a folder prepared with "
                         "--tokenizer bpe:N") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a trained tokenizer ({type(e).__name__}): prepare with --tokenizer bpe:N "
                         "again") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is not a trained tokenizer: prepare with --tokenizer bpe:N again")
    get_tokenizer(spec)  # checks it whole
    return spec


def _gpt2_ranks():
    """GPT-2's BPE ranks: from the file named by $NANOFORGE_GPT2_RANKS, else tiktoken's (cached) download."""
    path = os.environ.get(GPT2_RANKS_ENV)
    try:
        if path:
            ranks = read_ranks(path)
        else:
            import tiktoken_ext.openai_public
            ranks = tiktoken_ext.openai_public.gpt2()["mergeable_ranks"]
    except Exception as e:  # network errors, a missing or corrupt file: all end the same way for the user
        where = f"from {GPT2_RANKS_ENV}={path}" if path else "(tiktoken downloads them on first use)"
        raise ValueError(f"cannot load the GPT-2 BPE ranks {where}: {type(e).__name__}. Prepare with --tokenizer byte, "
                             f"pre-fill TIKTOKEN_CACHE_DIR, or set {GPT2_RANKS_ENV} to a gpt2.tiktoken file") from None
    if len(ranks) != 50256:
        raise ValueError(f"{path or 'the download'} holds {len(ranks)} ranks, GPT-2 has 50256: "
                             f"point {GPT2_RANKS_ENV} at gpt2.tiktoken")
    return ranks


def read_ranks(path):
    """A tiktoken ranks file (lines of `base64(token) rank`), read directly: tiktoken's own loader keeps a
    cached copy keyed by the path, so a file fixed in place would never be re-read."""
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def padded_vocab_size(enc):
    """The model's vocabulary: enc.n_vocab rounded up to a multiple of 64 (faster matmuls, room to spare)."""
    return (enc.n_vocab + 63) // 64 * 64


@functools.cache  # called for every document prepared: compute once per encoding (do not mutate the result)
def special_ids(enc):
    """{special token: id} for the chat tokens."""
    return {tok: enc.encode_single_token(tok) for tok in SPECIAL_TOKENS}


def all_special_ids(enc):
    """The ids of every special token: never text."""
    return frozenset(special_ids(enc).values())


# ---------------------------------------------------------------------------------------------- chat format

def _render_turns(messages, enc):
    """<|bos|> and every turn, with the loss mask (no final <|eos|>)."""
    sp = special_ids(enc)
    ids, mask = [sp["<|bos|>"]], [0]

    def turn(open_tag, text, close_tag, learn):
        piece = [sp[open_tag]] + enc.encode_ordinary(text) + [sp[close_tag]]  # text never yields a special id
        ids.extend(piece)
        mask.extend([learn] * len(piece))

    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with role and content")
        role, content, thinking = m.get("role"), m.get("content"), m.get("thinking")
        if not isinstance(content, str) or not (thinking is None or isinstance(thinking, str)):
            raise ValueError(f"message {i}: content must be a string, thinking a string or None")
        if role == "system" and i == 0:
            turn("<|system|>", content, "<|/system|>", 0)
        elif role == "user":
            turn("<|user|>", content, "<|/user|>", 0)
        elif role == "assistant":
            if thinking is None:
                ids.append(sp["<|no_think|>"])
                mask.append(1)
            else:
                turn("<|think|>", thinking, "<|/think|>", 1)
            turn("<|assistant|>", content, "<|/assistant|>", 1)
        else:
            raise ValueError(f"message {i}: role must be system (first only), user or assistant, got {role!r}")
    return ids, mask


def render_conversation(messages, enc):
    """A whole conversation as a training document: (ids, mask), mask 1 on the tokens to learn."""
    ids, mask = _render_turns(messages, enc)
    return ids + [special_ids(enc)["<|eos|>"]], mask + [1]


def render_prompt(messages, enc, reasoning="auto"):
    """The history (ending with a user turn) ready for generation of the assistant's reply.
    reasoning: "on" forces a think block, "off" forces a direct answer, "auto" lets the model choose."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("the prompt must end with a user message")
    suffix = {"auto": [], "on": ["<|think|>"], "off": ["<|no_think|>", "<|assistant|>"]}
    if reasoning not in suffix:
        raise ValueError(f"reasoning must be one of {', '.join(suffix)}, got {reasoning!r}")
    ids, _ = _render_turns(messages, enc)
    return ids + [special_ids(enc)[t] for t in suffix[reasoning]]


def split_thinking(ids, enc):
    """Generated ids -> (thinking, answer) as text, special tokens stripped. ids may be the reply alone or
    the prompt followed by the reply as generated, up to its stop token (then what follows the last <|/user|>
    is the reply): pass the prompt too when it forced <|think|>, so thinking cut off before <|/think|> still
    reads as thinking. The reply ends at the first <|/assistant|> or <|eos|>; without <|/think|> it is all
    answer, unless a <|think|> opened."""
    sp = special_ids(enc)
    ids = list(ids)
    if sp["<|/user|>"] in ids:
        ids = ids[len(ids) - ids[::-1].index(sp["<|/user|>"]):]
    for stop in (sp["<|/assistant|>"], sp["<|eos|>"]):
        if stop in ids:
            ids = ids[:ids.index(stop)]
    if sp["<|/think|>"] in ids:
        k = ids.index(sp["<|/think|>"])
        thinking, answer = ids[:k], ids[k + 1:]
    elif sp["<|think|>"] in ids:
        thinking, answer = ids, []
    else:
        thinking, answer = [], ids
    every_special = all_special_ids(enc)

    def text(part):
        # padding ids (n_vocab .. vocab_size) can be sampled by an undertrained model: they are not text
        return enc.decode([t for t in part if t not in every_special and t < enc.n_vocab]).strip()
    return text(thinking), text(answer)


def fit_to_window(messages, enc, reasoning, max_tokens):
    """What the model gets to see of a conversation: the system prompt, then the newest turns whose
    rendered prompt is at most max_tokens long. Whole exchanges are dropped oldest first; a last message
    too long on its own keeps only its end (where the question usually is).
    Returns (messages, dropped_turns, cut_message)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system):])
    dropped = cut = False
    while len(render_prompt(system + turns, enc, reasoning)) > max_tokens and len(turns) > 1:
        turns = turns[1:]
        while turns[0]["role"] != "user":  # an exchange starts with the user
            turns = turns[1:]
        dropped = True
    while (excess := len(render_prompt(system + turns, enc, reasoning)) - max_tokens) > 0:
        ids = enc.encode_ordinary(turns[-1]["content"])
        text = enc.decode_bytes(ids[excess:]).decode("utf-8", errors="ignore")  # drop a half-cut character
        turns[-1] = {"role": "user", "content": text}
        cut = True
    return system + turns, dropped, cut


# ---------------------------------------------------------------------------------------------- streaming

class TextStream:
    """Token ids -> text, one id at a time, for streaming. One character can span several tokens (each
    byte of 'é' is its own token in the byte tokenizer), so bytes pass through an incremental UTF-8
    decoder; invalid bytes come out as U+FFFD. Special tokens are dropped, or shown by name with
    show_special. Ids past the tokenizer (the padding rows of the embedding) are never text."""

    def __init__(self, enc, show_special=False):
        self.enc, self.show_special = enc, show_special
        self.special = all_special_ids(enc)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token_id):
        if token_id in self.special:
            name = self.enc.decode_single_token_bytes(token_id).decode() if self.show_special else ""
            return self.flush() + name
        if token_id >= self.enc.n_vocab:
            return ""
        return self.decoder.decode(self.enc.decode_single_token_bytes(token_id))

    def flush(self):
        """Whatever an unfinished character left behind (as U+FFFD)."""
        return self.decoder.decode(b"", final=True)
