"""What the tests share: one tiny-model factory, one checkpoint writer, one way to run a script as a user does,
and a scripted stand-in for a model. Test files import nothing from each other, only from here."""
import dataclasses
import functools
import glob
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from checkpoints import save_checkpoint
from model import Forge, ModelConfig
from tokenizer import GPT2_RANKS_ENV, get_tokenizer, padded_vocab_size, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = get_tokenizer("byte")
SP = {t: BYTE.encode_single_token(t) for t in BYTE.special_tokens_set}  # special token -> id (byte tokenizer)
needs_gpt2_ranks = pytest.mark.skipif(not os.environ.get(GPT2_RANKS_ENV),
                                      reason=f"needs the GPT-2 ranks: set {GPT2_RANKS_ENV} to a gpt2.tiktoken file")


@functools.cache
def trained_bpe():
    """A 2,048-token BPE trained on this repository's own text (docs and code), as prepare.py --tokenizer bpe:N
    trains one (a second of rustbpe)."""
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md"))
                       + glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return train_bpe(texts, 2048)


def tokenizer_spec(name):
    """What get_tokenizer takes for a test's tokenizer name: "bpe" is trained_bpe()."""
    return trained_bpe() if name == "bpe" else name


def tiny_model(seed=0, random_norms=False, tokenizer="byte", **overrides):
    """A small Forge (2 layers, d=64, GQA 4/2) over the tokenizer's padded vocabulary; overrides change any
    ModelConfig field. random_norms also randomizes the norm gains and scales weights up, so that logits are
    well separated (for comparisons against another implementation)."""
    vocab_size = padded_vocab_size(get_tokenizer(tokenizer_spec(tokenizer)))
    args = dict(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64) | overrides
    torch.manual_seed(seed)
    model = Forge(ModelConfig(**args)).eval()
    if random_norms:
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.2)
    return model


def all_logits(model, idx):
    """Every position's logits (B, T, V), the whole batch at once, differentiable: the final norm's output (caught by
    a hook; forward itself computes only the last position's logits, or with targets only the loss) through the
    tied output matrix, as forward does for the last position. The reference the chunked loss is tested against."""
    caught = []
    handle = model.norm.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        model(idx)
    finally:
        handle.remove()
    x = F.linear(caught[0], model.emb_proj.weight.t()) if model.config.emb_rank else caught[0]
    return F.linear(x, model.tok_emb.weight)


def write_checkpoint(model, path, tokenizer="byte", with_optimizer=False, **extra):
    """Save model the way train.py does (optimizer and resume state too, with with_optimizer) -> the path."""
    ckpt = {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "tokenizer": tokenizer,
            "config": {}} | extra
    if with_optimizer:
        ckpt |= {"optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "iter_num": 7,
                 "best_val_loss": 1.5}
    save_checkpoint(ckpt, str(path))
    return str(path)


def run_script(script, *args, stdin=b"", env=None, timeout=300):
    """Run a script of the repo as a user would -> (exit code, stdout, stderr); stdin is bytes, the output text.
    One OpenMP thread: tiny models gain nothing from more, and on a busy 2-core machine competing threads
    make them many times slower."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], input=stdin, cwd=ROOT,
                          capture_output=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def text_ids(s):
    """Plain text -> byte-tokenizer ids (a literal special-token string stays text)."""
    return BYTE.encode_ordinary(s)


class ScriptedModel:
    """Stands in for Forge: generate() replays a fixed list of token ids (or script(prompt)'s) for each prompt
    and, like Forge.generate, yields {row: token} per step, a row ending after a stop id (yielded) or when its
    script runs out; force(rows, tokens) replaces the scripted tokens it changes (the script goes on after them).
    With interrupt_after=k it raises KeyboardInterrupt after k steps (a Ctrl-C)."""
    device = torch.device("cpu")

    def __init__(self, script, block_size=256, interrupt_after=None):
        self.script, self.interrupt_after = script, interrupt_after
        self.config = SimpleNamespace(block_size=block_size)
        self.prompts = []

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), generator=None,
                 force=None):
        scripts = {}
        for row, prompt in enumerate(prompts):
            self.prompts.append(list(prompt))
            scripts[row] = iter(self.script(prompt) if callable(self.script) else self.script)
        for i in range(max_new_tokens):
            if i == self.interrupt_after:
                raise KeyboardInterrupt
            step = {row: token for row, it in scripts.items() if (token := next(it, None)) is not None}
            if not step:
                return
            if force:
                step = dict(zip(step, force(list(step), list(step.values()))))
            yield step
            scripts = {row: it for row, it in scripts.items() if row in step and step[row] not in stop_ids}


class StopAfter:
    """Stands in for common.StopFlag: reads as Ctrl-C from the top of step n on."""

    def __init__(self, n):
        self.checks, self.n = 0, n

    @property
    def signum(self):
        self.checks += 1
        return signal.SIGINT if self.checks > self.n else 0


def greedy_ids(model, prompt, max_new_tokens, **kwargs):
    """The token ids model.generate writes after one prompt, greedy unless kwargs say otherwise."""
    return [step[0] for step in model.generate([prompt], max_new_tokens, **({"temperature": 0} | kwargs))]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny checkpoint in the byte tokenizer, written once for the whole session."""
    return write_checkpoint(tiny_model(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def reasoning_data(tmp_path_factory):
    """The built-in reasoning dataset, small (3,000 documents), prepared once for the whole session."""
    out = tmp_path_factory.mktemp("reasoning")
    rc, _, err = run_script("prepare.py", "--max_samples", 3000, "--out_dir", out)
    assert rc == 0, err
    return str(out)
