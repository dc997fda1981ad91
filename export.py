"""
Export a checkpoint for use outside this repo.

    python export.py [--ckpt out/best.pt] [--out_dir DIR] [--format pt|safetensors|hf|gguf|all]
                     [--dtype float32|float16|bfloat16|q8_0|q4_0]

  pt           DIR/model.pt           our state dict + model_args + tokenizer, no optimizer state
                                      (checkpoints.load_checkpoint reads it, with weights_only=True)
  safetensors  DIR/model.safetensors  our tensor names; model_args and the tokenizer in the metadata
  hf           DIR/hf/                a Hugging Face LlamaForCausalLM folder: config.json,
                                      generation_config.json, model.safetensors, tokenizer.json and
                                      tokenizer_config.json (with the chat template), and the tiktoken
                                      ranks + special tokens (tokenizer.tiktoken, tiktoken.json) so that
                                      load_tiktoken() rebuilds our exact encoding offline
  gguf         DIR/model.gguf         one file for llama.cpp (and Ollama, LM Studio, llama-cpp-python):
                                      weights, hyperparameters, tokenizer and chat template; --dtype q8_0
                                      quantizes it to 8 bits, q4_0 to 4 (gguf only)

Forge is the Llama architecture (RMSNorm, GQA, rotate-half RoPE, SwiGLU, no biases, tied embeddings),
so the hf export renames tensors and converts no maths; gguf also reorders the q/k rows for llama.cpp's
interleaved RoPE. The one exception: a factorized embedding (emb_rank > 0) is multiplied out to the full
V x d matrix, which Llama expects.
"""
import argparse
import base64
import functools
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoints import build_model, load_checkpoint, save_checkpoint
from common import UserError, load_tokenizer, run_main, save_json
from device import DTYPES
from inference import find_checkpoint
from tokenizer import SPECIAL_TOKENS, pre_tokenizer_name, read_ranks, special_ids


def cast(state_dict, dtype):
    """Float tensors to dtype (no copy when they already are: Forge's tensors share no storage)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- pt and safetensors

def export_pt(model, tokenizer, path, dtype=torch.float32):
    """A checkpoint without optimizer/resume state: the dict load_checkpoint expects, nothing more."""
    save_checkpoint({"model": cast(model.state_dict(), dtype), "model_args": asdict(model.config),
                     "tokenizer": tokenizer}, path)


def export_safetensors(model, tokenizer, path, dtype=torch.float32):
    """Metadata holds strings only: a trained tokenizer's dict goes in as JSON."""
    from safetensors.torch import save_file
    metadata = {"format": "pt", "model_args": json.dumps(asdict(model.config)),
                "tokenizer": json.dumps(tokenizer) if isinstance(tokenizer, dict) else tokenizer or ""}
    save_file(cast(model.state_dict(), dtype), f"{path}.tmp", metadata=metadata)
    os.replace(f"{path}.tmp", path)


def load_safetensors(path, device="cpu"):
    """model.safetensors written by export_safetensors -> (Forge in eval mode, tokenizer spec or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(path, device=device)
    except Exception as e:
        raise UserError(f"cannot read {path} as safetensors ({type(e).__name__}): truncated or another format")
    if "model_args" not in metadata:
        raise UserError(f"{path} was not written by export.py (no model_args in its metadata)")
    model = build_model(json.loads(metadata["model_args"]), state_dict, path)
    tokenizer = metadata.get("tokenizer") or None
    return model.to(device).eval(), json.loads(tokenizer) if tokenizer and tokenizer[0] == "{" else tokenizer


# ----------------------------------------------------------------------------- hf: weights and config

def hf_name(name):
    """Our parameter name -> LlamaForCausalLM's. The two models have the same modules in the same order."""
    if name == "tok_emb.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    layer, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", name).groups()
    rest = {"attn_norm.weight": "input_layernorm.weight",
            "mlp_norm.weight": "post_attention_layernorm.weight"}.get(rest, rest.replace("attn.", "self_attn.", 1))
    return f"model.layers.{layer}.{rest}"


def hf_state_dict(model, dtype=torch.float32):
    """Tensors under Hugging Face names. No lm_head.weight: tie_word_embeddings=true makes Llama reuse
    embed_tokens for the output, as we do."""
    sd = model.state_dict()
    if model.config.emb_rank:  # E = A (V x r) @ B^T (r x d), multiplied in fp32 whatever the weights' dtype
        sd["tok_emb.weight"] = sd["tok_emb.weight"].float() @ sd.pop("emb_proj.weight").float().t()
    return cast({hf_name(k): v for k, v in sd.items()}, dtype)


def hf_config(cfg, enc, dtype_name):
    sp = special_ids(enc)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": sp["<|bos|>"], "eos_token_id": sp["<|eos|>"], "pad_token_id": sp["<|pad|>"],
        "torch_dtype": dtype_name, "use_cache": True,
    }


def hf_generation_config(enc):
    """A chat reply ends at <|/assistant|>, a document at <|eos|>: generation stops at either."""
    sp = special_ids(enc)
    return {"bos_token_id": sp["<|bos|>"], "eos_token_id": [sp["<|eos|>"], sp["<|/assistant|>"]],
            "pad_token_id": sp["<|pad|>"]}


# ----------------------------------------------------------------------------- hf: tokenizer

@functools.cache
def byte_to_unicode():
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the others are shifted to 256 and up (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


def bpe_split(ranks, token, max_rank):
    """Run tiktoken's BPE on token's bytes using only merges ranked below max_rank. For the token of
    rank max_rank this stops at the two parts that were merged to make it: its merge rule."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        pairs = [(rank, i) for rank, i in pairs if rank is not None and rank < max_rank]
        if not pairs:
            return parts
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def token_text(token):
    """A token's bytes in GPT-2's alphabet (byte_to_unicode), as byte-level BPE vocabularies write them."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def bpe_merges(enc):
    """The merge rules of enc's ranks, by rank, as "left right" in GPT-2's alphabet (which has no space)."""
    ranks, merges = enc._mergeable_ranks, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_split(ranks, token, rank)
            if len(parts) != 2:
                raise UserError(f"token {token!r} is not the merge of two tokens: BPE merges cannot express it")
            merges.append(f"{token_text(parts[0])} {token_text(parts[1])}")
    return merges


def hf_tokenizer_json(enc):
    """tokenizer.json for `tokenizers`: byte-level BPE with tiktoken's vocabulary, its merges rebuilt
    from the ranks, tiktoken's pre-tokenizer regex, and our special tokens at our ids."""
    specials = sorted(enc._special_tokens.items(), key=lambda item: item[1])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for tok, i in specials],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,  # add no <|bos|>: our chat template writes it, as render_conversation does
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        # ignore_merges: a piece that is a whole token maps straight to it, as tiktoken does
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {token_text(token): rank for token, rank in enc._mergeable_ranks.items()},
                  "merges": bpe_merges(enc)},
    }


# The chat format of tokenizer.render_conversation / render_prompt in Jinja, for apply_chat_template.
# Every tag trims the whitespace around it, so the template emits exactly the tokens below.
# add_generation_prompt=False renders a finished conversation (ending in <|eos|>); True renders a prompt,
# and the `reasoning` argument ("on", "off", default "auto") plays render_prompt's `reasoning`.
CHAT_TEMPLATE = """
{{- '<|bos|>' -}}
{%- for message in messages -%}
    {%- if message.role == 'system' and loop.first -%}
        {{- '<|system|>' + message.content + '<|/system|>' -}}
    {%- elif message.role == 'user' -%}
        {{- '<|user|>' + message.content + '<|/user|>' -}}
    {%- elif message.role == 'assistant' -%}
        {%- if message.thinking is defined and message.thinking is not none -%}
            {{- '<|think|>' + message.thinking + '<|/think|>' -}}
        {%- else -%}
            {{- '<|no_think|>' -}}
        {%- endif -%}
        {{- '<|assistant|>' + message.content + '<|/assistant|>' -}}
    {%- else -%}
        {{- raise_exception('role must be system (first only), user or assistant') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if reasoning is defined and reasoning == 'on' -%}
        {{- '<|think|>' -}}
    {%- elif reasoning is defined and reasoning == 'off' -%}
        {{- '<|no_think|><|assistant|>' -}}
    {%- endif -%}
{%- else -%}
    {{- '<|eos|>' -}}
{%- endif -%}
""".strip()


def hf_tokenizer_config(enc, block_size):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|eos|>", "<|pad|>")],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tiktoken(enc, folder):
    """tokenizer.tiktoken (tiktoken's ranks format: base64 token, rank) + tiktoken.json (name, regex,
    special tokens): everything tiktoken.Encoding needs, with no download."""
    with open(os.path.join(folder, "tokenizer.tiktoken"), "wb") as f:
        for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    save_json({"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens},
               os.path.join(folder, "tiktoken.json"))


def load_tiktoken(folder):
    """The tiktoken.Encoding saved by save_tiktoken."""
    import tiktoken
    with open(os.path.join(folder, "tiktoken.json")) as f:
        meta = json.load(f)
    ranks = read_ranks(os.path.join(folder, "tokenizer.tiktoken"))
    return tiktoken.Encoding(meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


# ----------------------------------------------------------------------------- hf: the folder

def check_vocab(enc, cfg, what):
    """The tokenizer must fit the model; a factorized embedding is multiplied out (the user is told why the
    export is larger than the checkpoint)."""
    if enc.n_vocab > cfg.vocab_size:
        raise UserError(f"tokenizer {enc.name!r} has {enc.n_vocab} tokens but the model only {cfg.vocab_size}: "
                        f"the checkpoint was trained with another tokenizer")
    if cfg.emb_rank:
        before, after = cfg.vocab_size * cfg.emb_rank + cfg.emb_rank * cfg.n_embd, cfg.vocab_size * cfg.n_embd
        print(f"note: the factorized embedding (emb_rank={cfg.emb_rank}) is multiplied out for Llama: "
              f"{before:,} -> {after:,} embedding parameters, so {what} is larger than the checkpoint")


def export_hf(model, enc, folder, dtype=torch.float32):
    """Write the whole folder under a temporary name, then swap it in: never a half-written export."""
    from safetensors.torch import save_file
    cfg = model.config
    check_vocab(enc, cfg, "the hf export")
    dtype_name = str(dtype).removeprefix("torch.")
    tmp = f"{folder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(hf_state_dict(model, dtype), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_json(hf_config(cfg, enc, dtype_name), os.path.join(tmp, "config.json"))
        save_json(hf_generation_config(enc), os.path.join(tmp, "generation_config.json"))
        save_json(hf_tokenizer_json(enc), os.path.join(tmp, "tokenizer.json"))
        save_json(hf_tokenizer_config(enc, cfg.block_size), os.path.join(tmp, "tokenizer_config.json"))
        save_tiktoken(enc, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(folder):  # rename the old folder away first: os.replace cannot replace a non-empty one
        os.replace(folder, f"{folder}.old")
    os.replace(tmp, folder)
    shutil.rmtree(f"{folder}.old", ignore_errors=True)


# ----------------------------------------------------------------------------- gguf (llama.cpp)

GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0", "q4_0")

# llama.cpp refuses a BPE vocabulary without merges, and the byte tokenizer has none (every token is one byte).
# It gets one rule that can never apply: it joins two special tokens, which BPE never sees as symbols (they
# are split off before it, or spelled byte by byte when they are text), so every byte stays its own token.
NO_MERGE = "<|bos|> <|eos|>"


def gguf_permute(w, n_heads):
    """q/k rows from our rotate-half layout, where a head rotates the pairs (i, i + head_dim/2), to the
    interleaved one of llama.cpp's Llama, which rotates (2i, 2i + 1): row i of each half goes to 2i + half."""
    return w.reshape(n_heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def gguf_vocab(enc, vocab_size):
    """(token texts, token types, merges) for llama.cpp's "gpt2" byte-level BPE, one entry per model id: our
    ranks in GPT-2's alphabet, the special tokens as control tokens, the padding ids as unused."""
    import gguf
    texts, types = [f"[PAD{i}]" for i in range(vocab_size)], [gguf.TokenType.UNUSED] * vocab_size
    for token, rank in enc._mergeable_ranks.items():
        texts[rank], types[rank] = token_text(token), gguf.TokenType.NORMAL
    for token, i in enc._special_tokens.items():
        texts[i], types[i] = token, gguf.TokenType.CONTROL
    return texts, types, bpe_merges(enc) or [NO_MERGE]


def gguf_tensor_type(name, t, qtype):
    """The type tensor t (Hugging Face name) is written in, in a file of type qtype: what llama.cpp's own tools
    choose, where the gguf package can write it."""
    from gguf import GGMLQuantizationType as Q
    if t.dim() == 1:
        return Q.F32  # norm weights, as llama.cpp expects
    if qtype == Q.Q4_0 and name == "model.embed_tokens.weight":
        # It is the output matrix too (tied), where 4 bits cost the most: llama-quantize keeps it at Q6_K, which
        # gguf cannot write, so Q8_0 (llama-quantize's own fallback for Q6_K, where a row is not a multiple of 256)
        qtype = Q.Q8_0
    if qtype in (Q.Q8_0, Q.Q4_0) and t.shape[-1] % 32:
        return Q.F16  # they work in blocks of 32 along a row: another row length stays float16, as llama.cpp's do
    return qtype


def export_gguf(model, enc, path, dtype_name="float32"):
    """One file for llama.cpp: hyperparameters, tokenizer, chat template and weights, written by the gguf
    package (llama.cpp's own writer). Norm weights stay float32, as llama.cpp expects."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    cfg, sp = model.config, special_ids(enc)
    check_vocab(enc, cfg, "the gguf export")
    qtype = {"float32": Q.F32, "float16": Q.F16, "bfloat16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype_name]
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name("nanoforge")
    w.add_file_type({Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
                     Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
                     Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)

    texts, types, merges = gguf_vocab(enc, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre(pre_tokenizer_name(enc))  # llama.cpp has the split regex built in, by this name
    w.add_token_list(texts)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(sp["<|bos|>"])
    w.add_eos_token_id(sp["<|eos|>"])
    w.add_eot_token_id(sp["<|/assistant|>"])  # eos and eot both end generation: a document or a turn
    w.add_pad_token_id(sp["<|pad|>"])
    # Every training document starts with <|bos|>, so a plain prompt gets one; llama.cpp drops the template's own
    # <|bos|> when it adds one, so a chat prompt has exactly one too.
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    # No output.weight: without one llama.cpp reuses token_embd for the output, as our tied embeddings do.
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    for name, t in hf_state_dict(model).items():
        if name.endswith("q_proj.weight"):
            t = gguf_permute(t, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            t = gguf_permute(t, cfg.n_kv_head)
        q = gguf_tensor_type(name, t, qtype)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), gguf.quants.quantize(t.numpy(), q),
                     raw_dtype=q)

    tmp = f"{path}.tmp"
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- command line

def export(ckpt_path, out_dir, formats, dtype_name="float32"):
    if dtype_name not in DTYPES and formats != ["gguf"]:
        raise UserError(f"--dtype {dtype_name} is a GGUF type: use it with --format gguf")
    model, ckpt = load_checkpoint(ckpt_path)
    tokenizer, dtype = ckpt.get("tokenizer"), DTYPES.get(dtype_name)
    if {"hf", "gguf"} & set(formats):  # resolve the tokenizer before writing anything
        if not tokenizer:
            raise UserError(f"{ckpt_path} names no tokenizer: the hf and gguf exports need one to write theirs")
        enc = load_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if "pt" in formats:
        export_pt(model, tokenizer, os.path.join(out_dir, "model.pt"), dtype)
        written.append(os.path.join(out_dir, "model.pt"))
    if "safetensors" in formats:
        export_safetensors(model, tokenizer, os.path.join(out_dir, "model.safetensors"), dtype)
        written.append(os.path.join(out_dir, "model.safetensors"))
    if "hf" in formats:
        export_hf(model, enc, os.path.join(out_dir, "hf"), dtype)
        written.append(os.path.join(out_dir, "hf") + os.sep)
    if "gguf" in formats:
        export_gguf(model, enc, os.path.join(out_dir, "model.gguf"), dtype_name)
        written.append(os.path.join(out_dir, "model.gguf"))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a nanoforge checkpoint (see the top of export.py).")
    p.add_argument("--ckpt", help="checkpoint written by train.py (default: out/best.pt, else out/ckpt.pt)")
    p.add_argument("--out_dir", default=None, help="output folder (default: export/ next to the checkpoint)")
    p.add_argument("--format", default="all", choices=["pt", "safetensors", "hf", "gguf", "all"])
    p.add_argument("--dtype", default="float32", choices=list(dict.fromkeys([*DTYPES, *GGUF_DTYPES])),
                   help="dtype of the exported weights (q8_0, q4_0: gguf only)")
    args = p.parse_args(argv)
    if args.ckpt is None:
        args.ckpt = find_checkpoint("out")
    out_dir = args.out_dir or os.path.join(os.path.dirname(args.ckpt), "export")
    formats = ["pt", "safetensors", "hf", "gguf"] if args.format == "all" else [args.format]
    try:
        written = export(args.ckpt, out_dir, formats, args.dtype)
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from None
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    run_main(main)
