"""checkpoints.py and inference.py's choice of checkpoint: a round trip, the one-line errors of files that are
not ours, and the tokenizer a checkpoint names."""
import os

import pytest
import torch

from checkpoints import build_model, load_checkpoint, read_checkpoint
from common import load_tokenizer
from common import UserError
from conftest import tiny_model, write_checkpoint
from inference import find_checkpoint


def test_checkpoint_round_trip_and_one_line_errors(tmp_path):
    model = tiny_model(seed=3)
    path = write_checkpoint(model, tmp_path / "ok.pt", with_optimizer=True)
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training and ckpt["iter_num"] == 7 and ckpt["tokenizer"] == "byte"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not os.path.exists(f"{path}.tmp")  # written under a temporary name, then renamed

    (tmp_path / "truncated.pt").write_bytes(open(path, "rb").read()[:1000])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    bad_args = torch.load(path, weights_only=True) | {"model_args": {**model.config.__dict__, "n_layer": 3}}
    torch.save(bad_args, tmp_path / "mismatch.pt")
    for name, message in [("missing.pt", "no checkpoint at"), ("truncated.pt", "truncated or not a torch file"),
                          ("other.pt", "is not a nanoforge checkpoint"), ("mismatch.pt", "do not fit its model_args")]:
        with pytest.raises(UserError, match=message) as e:
            load_checkpoint(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_find_checkpoint_prefers_best(tmp_path):
    assert find_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "ckpt.pt")
    (tmp_path / "best.pt").write_bytes(b"")
    assert find_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "best.pt")


def test_load_tokenizer_errors_are_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown tokenizer 'llama'"):
        load_tokenizer("llama")


def test_build_model_is_the_one_builder(tmp_path):
    """read_checkpoint builds nothing; build_model gives the same model load_checkpoint does, and names the file
    whose weights do not fit; arguments that make no model are one line."""
    model = tiny_model(seed=4)
    ckpt = read_checkpoint(write_checkpoint(model, tmp_path / "ok.pt"))
    built = build_model(ckpt["model_args"], ckpt["model"], "ok.pt")
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UserError, match=r"^ok.pt: its weights do not fit its model_args"):
        build_model(ckpt["model_args"] | {"n_embd": 32}, ckpt["model"], "ok.pt")
    with pytest.raises(UserError, match=r"^n_embd=65 must be divisible by n_head=4$"):
        build_model(ckpt["model_args"] | {"n_embd": 65})
    assert build_model(ckpt["model_args"], device="meta").tok_emb.weight.is_meta
