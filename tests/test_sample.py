"""sample.py: same seed -> same text, greedy output equals a full-recomputation reference, streaming decode,
one-line errors for bad checkpoints. Also the helpers test_chat.py and test_eval.py share."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from model import Forge, ModelConfig, save_checkpoint
from sample import TextStream, inference_dtype
from tokenizer import get_tokenizer, padded_vocab_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(path, seed=0, block_size=128, tokenizer="byte"):
    """A tiny untrained model saved the way train.py saves one."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=padded_vocab_size(get_tokenizer(tokenizer)), block_size=block_size, n_layer=2,
                      n_head=4, n_kv_head=2, n_embd=64)
    model = Forge(cfg)
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                     "tokenizer": tokenizer, "config": {}}, str(path))
    return str(path)


def run_script(script, *args, stdin=b"", timeout=120):
    """Run a script of the repo as a user would; stdin is bytes, stdout/stderr come back as text."""
    # One thread: batch-1 decoding of a tiny model gains nothing from more, and on a busy 2-core CI machine
    # competing OpenMP threads make it up to 100x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script, *map(str, args)], input=stdin, cwd=ROOT, capture_output=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sample") / "tiny.pt")


def test_same_seed_same_text(ckpt):
    args = ["--ckpt", ckpt, "--start", "Once", "--num_samples", 2, "--max_new_tokens", 40, "--device", "cpu"]
    rc1, out1, err1 = run_script("sample.py", *args, "--seed", 7)
    rc2, out2, _ = run_script("sample.py", *args, "--seed", 7)
    rc3, out3, _ = run_script("sample.py", *args, "--seed", 8)
    assert rc1 == rc2 == rc3 == 0, err1
    assert out1 == out2
    assert out1 != out3
    first, second = out1.split("\n---------------\n")[:2]
    assert first.startswith("Once") and second.startswith("Once") and first != second  # the RNG runs on
    assert "tokens/s" in err1


def greedy_reference(model, prompt, max_new_tokens, stop_id):
    """Greedy decoding by running the whole sequence through the model at every step (no KV cache)."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == stop_id:
            break
    return ids[len(prompt):]


def test_greedy_stream_matches_recomputation(ckpt, tmp_path):
    enc = get_tokenizer("byte")
    start_file = tmp_path / "start.txt"
    start_file.write_text("Café <|think|> 12+30=", encoding="utf-8")  # a literal special stays text
    rc, out, err = run_script("sample.py", "--ckpt", ckpt, "--start", f"FILE:{start_file}", "--num_samples", 1,
                              "--max_new_tokens", 60, "--temperature", 0, "--dtype", "float32", "--device", "cpu")
    assert rc == 0, err

    model = Forge(ModelConfig(**torch.load(ckpt, weights_only=True)["model_args"]))
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    prompt = [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary("Café <|think|> 12+30=")
    with torch.no_grad():
        new = greedy_reference(model.eval(), prompt, 60, enc.encode_single_token("<|eos|>"))
    # Reference text: one-shot decoding, special tokens by name, padding ids (never tokens) left out.
    expected = enc.decode_bytes([t for t in new if t < enc.n_vocab]).decode("utf-8", errors="replace")
    assert out == "Café <|think|> 12+30=" + expected + "\n---------------\n"


def test_text_stream_decodes_characters_split_over_tokens():
    enc = get_tokenizer("byte")
    stream = TextStream(enc)
    e_acute = list("é".encode())  # two byte tokens
    assert [stream(t) for t in [ord("a"), *e_acute, ord("b")]] == ["a", "", "é", "b"]
    assert stream(enc.encode_single_token("<|think|>")) == ""  # specials are never text by default
    assert stream(300) == ""  # a padding id of the 320-row embedding
    assert stream(e_acute[0]) == "" and stream.flush() == "\ufffd"  # a cut-off character is not lost silently
    shown = TextStream(enc, show_special=True)
    assert shown(e_acute[0]) + shown(enc.encode_single_token("<|eos|>")) == "\ufffd<|eos|>"


@pytest.mark.parametrize("script", ["sample.py", "chat.py", "eval.py"])
def test_missing_checkpoint_is_a_one_line_error(script, tmp_path):
    rc, out, err = run_script(script, "--ckpt", tmp_path / "nope.pt")
    assert rc != 0
    assert err.strip().count("\n") == 0 and "no checkpoint at" in err and "Traceback" not in err


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    not_ours = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_ours)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": {}, "model_args": {"n_layer": 1, "n_embd": 64, "n_head": 4}, "tokenizer": "byte"}, mismatched)
    empty_dir = tmp_path / "run"
    empty_dir.mkdir()
    for args, message in [(["--ckpt", garbage], "cannot read"), (["--ckpt", not_ours], "not a nanoforge checkpoint"),
                          (["--ckpt", mismatched], "do not fit"), (["--out_dir", empty_dir], "no checkpoint at")]:
        rc, _, err = run_script("sample.py", *args)
        assert rc != 0 and message in err, err
        assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_inference_dtype_casts_weights_where_it_pays(tmp_path, monkeypatch):
    """auto: fp32 for small models on a CPU (per-op overhead dominates), the AMP dtype for big ones and GPUs;
    an explicit dtype wins; fp16 on a CPU is refused; sample.py generates with bf16 weights."""
    with pytest.raises(SystemExit, match="float16 is emulated on CPUs"):
        inference_dtype("cpu", "float16", 3e6)
    # the rest as on a CPU with native bf16, whatever this machine has
    monkeypatch.setattr("sample.amp_dtype", lambda device_type, dtype="auto": {
        "auto": torch.bfloat16, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    assert inference_dtype("cpu", "auto", 3e6) == torch.float32
    assert inference_dtype("cpu", "auto", 114e6) == torch.bfloat16
    assert inference_dtype("cuda", "auto", 3e6) == torch.bfloat16
    assert inference_dtype("cpu", "bfloat16", 3e6) == torch.bfloat16
    assert inference_dtype("cpu", "float32", 114e6) == torch.float32
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    rc, out, err = run_script("sample.py", "--ckpt", ckpt, "--dtype", "bfloat16", "--num_samples", "1",
                              "--max_new_tokens", "8", "--seed", "1")
    assert rc == 0 and "tokens/s" in err, err
