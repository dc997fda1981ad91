"""sample.py: same seed -> same text, greedy output equals a full-recomputation reference, one-line errors for
bad checkpoints (in all three inference scripts), and the weights' inference dtype."""
import pytest
import torch

from checkpoints import load_checkpoint
from common import UserError
from device import inference_dtype
from conftest import BYTE, run_script


def test_same_seed_same_text(tiny_ckpt):
    args = ["--ckpt", tiny_ckpt, "--start", "Once", "--num_samples", 2, "--max_new_tokens", 40, "--device", "cpu"]
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


def test_greedy_stream_matches_recomputation(tiny_ckpt, tmp_path):
    start_file = tmp_path / "start.txt"
    start_file.write_text("Café <|think|> 12+30=", encoding="utf-8")  # a literal special stays text
    rc, out, err = run_script("sample.py", "--ckpt", tiny_ckpt, "--start", f"FILE:{start_file}", "--num_samples", 1,
                              "--max_new_tokens", 60, "--temperature", 0, "--dtype", "float32", "--device", "cpu")
    assert rc == 0, err

    model, _ = load_checkpoint(tiny_ckpt)
    prompt = [BYTE.encode_single_token("<|bos|>")] + BYTE.encode_ordinary("Café <|think|> 12+30=")
    with torch.no_grad():
        new = greedy_reference(model, prompt, 60, BYTE.encode_single_token("<|eos|>"))
    # Reference text: one-shot decoding, special tokens by name, padding ids (never tokens) left out.
    expected = BYTE.decode_bytes([t for t in new if t < BYTE.n_vocab]).decode("utf-8", errors="replace")
    assert out == "Café <|think|> 12+30=" + expected + "\n---------------\n"


def test_unreadable_start_file_is_a_one_line_error(tiny_ckpt, tmp_path):
    rc, _, err = run_script("sample.py", "--ckpt", tiny_ckpt, "--start", f"FILE:{tmp_path / 'nope.txt'}")
    assert rc == 1 and err.startswith("sample.py: error: cannot read the start text from")
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize("script", ["sample.py", "chat.py", "eval.py"])
def test_missing_checkpoint_is_a_one_line_error(script, tmp_path):
    rc, out, err = run_script(script, "--ckpt", tmp_path / "nope.pt")
    assert rc != 0
    assert err.strip().count("\n") == 0 and "no checkpoint at" in err and "Traceback" not in err
    assert err.startswith(f"{script}: error: ")


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


def test_inference_dtype_casts_weights_where_it_pays(tiny_ckpt, monkeypatch):
    """auto: fp32 for small models on a CPU (per-op overhead dominates), the AMP dtype for big ones and GPUs;
    an explicit dtype wins; fp16 on a CPU is refused; sample.py generates with bf16 weights."""
    with pytest.raises(UserError, match="float16 is emulated on CPUs"):
        inference_dtype("cpu", "float16", 3e6)
    # the rest as on a CPU with native bf16, whatever this machine has
    monkeypatch.setattr("device.amp_dtype", lambda device_type, dtype="auto": {
        "auto": torch.bfloat16, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    assert inference_dtype("cpu", "auto", 3e6) == torch.float32
    assert inference_dtype("cpu", "auto", 114e6) == torch.bfloat16
    assert inference_dtype("cuda", "auto", 3e6) == torch.bfloat16
    assert inference_dtype("cpu", "bfloat16", 3e6) == torch.bfloat16
    assert inference_dtype("cpu", "float32", 114e6) == torch.float32
    rc, out, err = run_script("sample.py", "--ckpt", tiny_ckpt, "--dtype", "bfloat16", "--num_samples", "1",
                              "--max_new_tokens", "8", "--seed", "1")
    assert rc == 0 and "tokens/s" in err, err
