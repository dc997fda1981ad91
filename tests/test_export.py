"""export.py against references: the hf export loaded by transformers' LlamaForCausalLM gives our logits
and our greedy tokens, its tokenizer.json gives tiktoken's ids and its chat template our chat format,
and the pt / safetensors exports load back to the very same model."""
import json
import os

import jinja2
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

import export
from common import load_checkpoint
from conftest import BYTE, ROOT, needs_gpt2_ranks, run_script, tiny_model, write_checkpoint
from tokenizer import get_tokenizer, render_conversation, render_prompt

TOKENIZERS = ["byte", pytest.param("gpt2", marks=needs_gpt2_ranks)]

MIXED = ("Hello, World! It's 3.14159 -- we'll SEE what they'RE doing. Ça va? naïve café, Größe, ¿qué? "
         "日本語のテキスト, русский текст 😀👍🏽🦙 x=42; y = x**2  # comment\n\n"
         "\tindented  two   three\n"
         "trailing spaces   \n nbsp\u00a0here, ideographic\u3000space, 1234567890 0.5e-3 $9.99 100%\r\n")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 17 * 3? Answer in digits."},
        {"role": "assistant", "thinking": "17 * 3 = 51, déjà vu 🤔", "content": "51"},
        {"role": "user", "content": "Merci! And 2+2?"},
        {"role": "assistant", "content": "4 ✅"}]


def full_logits(model, idx):
    logits, _ = model(idx, targets=idx)  # with targets, Forge returns every position's logits
    return logits


# ----------------------------------------------------------------------------- hf weights

CONFIGS = {
    "mha": dict(n_head=4, n_kv_head=4),
    "gqa-2-theta": dict(n_head=4, n_kv_head=2, rope_theta=500000.0),
    "mqa-eps": dict(n_head=8, n_kv_head=1, norm_eps=1e-6),
    "gqa-rank16": dict(n_head=4, n_kv_head=2, emb_rank=16),
    "gqa-4-rank8-ffn": dict(n_head=8, n_kv_head=2, emb_rank=8, n_layer=3, ffn_hidden=96),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_export_matches_ours_in_transformers(name, tmp_path):
    model = tiny_model(random_norms=True, **CONFIGS[name])
    export.export_hf(model, BYTE, str(tmp_path / "hf"))
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    hf.eval()

    shape = (3, model.config.block_size)
    idx = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = full_logits(model, idx), hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e} (logit std {ours.std():.2f})")
    assert diff < 1e-4

    prompt = idx[0, :8].tolist()
    greedy = list(model.generate(prompt, 32, temperature=0))
    hf.generation_config.eos_token_id = None  # random weights may emit <|eos|>; ours runs without stop ids here
    hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(greedy) == 32 and hf_greedy == greedy


def test_hf_folder_contents(tmp_path, capsys):
    model = tiny_model(random_norms=True, emb_rank=16)
    folder = tmp_path / "hf"
    export.export_hf(model, BYTE, str(folder), dtype=torch.bfloat16)
    assert "multiplied out" in capsys.readouterr().out  # the user is told the export is larger

    cfg = model.config
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["vocab_size"], config["hidden_size"], config["num_key_value_heads"], config["head_dim"]) == \
           (cfg.vocab_size, cfg.n_embd, cfg.n_kv_head, cfg.head_dim)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    assert config["torch_dtype"] == "bfloat16"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [257, 264]  # <|eos|> and <|/assistant|>
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: Llama reuses embed_tokens
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16 and embedding.shape == (cfg.vocab_size, cfg.n_embd)
    expected = (model.tok_emb.weight @ model.emb_proj.weight.t()).to(torch.bfloat16)
    assert torch.equal(embedding, expected)

    export.export_hf(tiny_model(1, random_norms=True), BYTE, str(folder))  # re-export replaces the folder
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no .tmp or .old left behind
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"


# ----------------------------------------------------------------------------- hf tokenizer

@pytest.fixture(scope="module", params=TOKENIZERS)
def exported_tokenizer(request, tmp_path_factory):
    """(our tiktoken encoding, an hf folder exported with it)."""
    enc = get_tokenizer(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    export.export_hf(tiny_model(random_norms=True, tokenizer=request.param, n_layer=1), enc, str(folder))
    return enc, folder


def test_tokenizer_json_encodes_like_tiktoken(exported_tokenizer):
    enc, folder = exported_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ids = enc.encode_ordinary(MIXED)
    assert tok.encode(MIXED, add_special_tokens=False) == ids
    assert tok.decode(ids) == MIXED

    chat_ids, _ = render_conversation(CHAT, enc)  # special tokens written in text become special ids
    assert tok.encode(enc.decode(chat_ids), add_special_tokens=False) == chat_ids

    # Real prose and code, literal "<|think|>" included: split_special_tokens keeps it plain text, like ours.
    text = ""
    for name in ("CONTRIBUTING.md", "model.py"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text += f.read()
    assert "<|think|>" in text
    assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == enc.encode_ordinary(text)


def test_chat_template_renders_our_format(exported_tokenizer):
    enc, folder = exported_tokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.apply_chat_template(CHAT, tokenize=True, return_dict=False) == render_conversation(CHAT, enc)[0]
    history = CHAT[:4]
    for reasoning in ("auto", "on", "off"):
        ids = tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True, reasoning=reasoning,
                                      return_dict=False)
        assert ids == render_prompt(history, enc, reasoning), reasoning
    assert tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True, return_dict=False) == \
           render_prompt(history, enc)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tuple(
        enc.encode_single_token(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>"))
    with pytest.raises(jinja2.TemplateError, match="role must be"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_tiktoken_files_rebuild_our_encoding(exported_tokenizer):
    enc, folder = exported_tokenizer
    loaded = export.load_tiktoken(str(folder))
    assert loaded.n_vocab == enc.n_vocab and loaded._special_tokens == enc._special_tokens
    assert loaded.encode_ordinary(MIXED) == enc.encode_ordinary(MIXED)
    chat_ids, _ = render_conversation(CHAT, enc)
    assert render_conversation(CHAT, loaded)[0] == chat_ids


def test_transformers_generates_a_chat_reply(exported_tokenizer):
    """The README's five lines: AutoTokenizer + AutoModelForCausalLM on the export, then generate."""
    from transformers import AutoModelForCausalLM
    enc, folder = exported_tokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1] and isinstance(tok.decode(out[0]), str)


# ----------------------------------------------------------------------------- pt and safetensors

def test_pt_and_safetensors_round_trip(tmp_path):
    model = tiny_model(random_norms=True, emb_rank=8)
    ckpt = write_checkpoint(model, tmp_path / "ckpt.pt", with_optimizer=True)
    written = export.export(ckpt, str(tmp_path / "out"), ["pt", "safetensors"])
    assert len(written) == 2
    idx = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = full_logits(model, idx)

        from_pt, ckpt = load_checkpoint(tmp_path / "out" / "model.pt")  # weights_only=True inside
        assert set(ckpt) == {"model", "model_args", "tokenizer"}  # optimizer and resume state dropped
        assert torch.equal(full_logits(from_pt, idx), expected)

        from_st, tokenizer_name = export.load_safetensors(str(tmp_path / "out" / "model.safetensors"))
        assert tokenizer_name == "byte" and from_st.config == model.config
        assert torch.equal(full_logits(from_st, idx), expected)


# ----------------------------------------------------------------------------- command line

def test_cli_writes_every_format(tmp_path):
    ckpt = write_checkpoint(tiny_model(random_norms=True, emb_rank=8), tmp_path / "best.pt", with_optimizer=True)
    rc, stdout, err = run_script("export.py", "--ckpt", ckpt)  # default: --format all into export/ next to it
    assert rc == 0, err
    assert "multiplied out" in stdout
    out = tmp_path / "export"
    assert sorted(os.listdir(out)) == ["hf", "model.pt", "model.safetensors"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.tiktoken", "tiktoken.json"} == set(os.listdir(out / "hf"))


def bad_checkpoints(tmp_path):
    good = write_checkpoint(tiny_model(random_norms=True), tmp_path / "good.pt", with_optimizer=True)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    bad_args = {"model": {}, "model_args": {"n_layers": 2}, "tokenizer": "byte"}  # from another codebase
    torch.save(bad_args, tmp_path / "other_args.pt")
    unknown_tok = torch.load(good, weights_only=True) | {"tokenizer": "llama3"}
    torch.save(unknown_tok, tmp_path / "unknown_tokenizer.pt")
    return ["missing.pt", "truncated.pt", "foreign.pt", "text.pt", "other_args.pt", "unknown_tokenizer.pt"]


def test_cli_bad_checkpoints_give_one_line_errors(tmp_path):
    for name in bad_checkpoints(tmp_path):
        out = tmp_path / f"out_{name}"
        rc, _, err = run_script("export.py", "--ckpt", tmp_path / name, "--out_dir", out, "--format", "hf")
        assert rc != 0, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("export.py: error:"), (name, err)
        assert name in lines[0] or "llama3" in lines[0], lines[0]  # it says which file or what is wrong
        assert not out.exists(), name  # nothing written
