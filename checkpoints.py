"""
Checkpoints: writing them atomically, reading them back safely, and the one way to build a Forge.

A checkpoint is a dict: "model" (state dict), "model_args" (ModelConfig fields), "tokenizer" (a built-in's name or
a trained BPE's dict: tokenizer.get_tokenizer), "config"
(the run's settings), and for resuming: "optimizer", "scaler", "iter_num", "best_val_loss" (rl.py:
"best_accuracy", "pass_rates"), "rng". Everything in it is a tensor or plain Python data, so it loads with
weights_only=True. A LoRA run's checkpoint (train.py lora_rank > 0) stores only its adapters as "model", and "lora":
{rank, alpha, targets, base (the base checkpoint's path), base_sha256}; read_checkpoint returns it with "model" the
base's weights with the adapters merged in, and the adapters as "adapters" (lora.py).
"""
import os

import torch

from common import UserError, load_tokenizer
from device import amp_dtype, autocast, inference_dtype, resolve_device
from lora import add_lora, file_sha256, lora_record, merge_adapters, parse_targets
from model import Forge, ModelConfig


def save_checkpoint(ckpt, path):
    """torch.save to a temporary name, then rename: a kill at any moment leaves the old file intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, checked to be one of ours; no model is built (build_model does that)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one with `python train.py` or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}): truncated or not a torch file")
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise UserError(f"{path} is not a nanoforge checkpoint (it has no model / model_args)")
    if "lora" in ckpt:
        ckpt["adapters"] = ckpt["model"]
        ckpt["model"] = merge_adapters(read_base(path, ckpt["lora"], device)["model"], ckpt["adapters"],
                                       ckpt["lora"]["alpha"] / ckpt["lora"]["rank"])
    return ckpt


def read_base(path, lora, device="cpu"):
    """The base checkpoint of the adapters at path (read_checkpoint: a LoRA base is merged in turn), checked to be
    the very file they were trained on."""
    base = lora["base"]
    if not os.path.isfile(base):
        raise UserError(f"{path} holds LoRA adapters for the base checkpoint {base}, which is missing: put it back "
                        "there (or run from the folder the adapters were trained in)")
    if file_sha256(base) != lora["base_sha256"]:
        raise UserError(f"{path} holds LoRA adapters for {base}, but that file has changed since (its sha256 "
                        "differs): restore the base they were trained on, or train the adapters again")
    return read_checkpoint(base, device)


def build_model(model_args, state_dict=None, source=None, device="cpu"):
    """A Forge from ModelConfig fields, with state_dict's weights when given; every script builds its model here.
    A bad combination is a one-line UserError (prefixed with source, the file the arguments came from). device
    "meta" builds the shapes only (train.py's dry run: no memory, no time)."""
    try:
        with torch.device(device):
            model = Forge(ModelConfig(**model_args))
        if state_dict is not None:
            model.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as e:
        message = str(e).splitlines()[0]
        raise UserError(f"{source}: its weights do not fit its model_args ({message})" if source else message) from None
    return model


def build_run_model(model_args, ckpt, source, cfg, device="cpu"):
    """(model, LoRA record or None) of a training run (train.py, rl.py) that starts from ckpt, read from source, and
    trains LoRA adapters when cfg.lora_rank > 0 (then the record is what its checkpoints say of them, lora.py). A
    resumed LoRA run gets its base's own weights with its adapters on top, unmerged; a new one adapts ckpt's weights
    (a LoRA checkpoint's merged) and pins source as its base."""
    resumed = cfg.resume and "lora" in ckpt
    model = build_model(model_args, read_base(source, ckpt["lora"])["model"] if resumed else ckpt["model"], source,
                        device)
    if not cfg.lora_rank:
        return model, None
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, parse_targets(cfg.lora_targets), cfg.seed)
    if resumed:
        model.load_state_dict(ckpt["adapters"], strict=False)
        return model, ckpt["lora"]
    return model, lora_record(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, source)


def chat_policy(cfg, ckpt, script):
    """What rl.py and dpo.py start from -> (model, LoRA record or None, enc, tokenizer, device, amp, ctx, sample_ctx):
    ckpt's model on cfg.device in train mode, dropout off (the update's log-probabilities must be those of the policy
    that sampled, and at first the reference's), with LoRA adapters when cfg.lora_rank > 0 (build_run_model); its
    tokenizer (a trained one's whole dict, for the script's checkpoints), which must have the chat tokens; the
    autocast dtype and context of the update (train.py's precision) and the context of sampling (sample.py's:
    fp32 for small models on a CPU, where half precision only adds per-op overhead)."""
    device = resolve_device(cfg.device)
    device_type = device.split(":")[0]
    amp = amp_dtype(device_type, cfg.dtype)
    tokenizer = ckpt.get("tokenizer", "byte")
    enc = load_tokenizer(tokenizer)
    if "<|think|>" not in enc.special_tokens_set or ckpt["model_args"]["vocab_size"] < enc.n_vocab:
        raise UserError(f"the checkpoint's tokenizer ({enc.name}, vocab {ckpt['model_args']['vocab_size']}) has no "
                        f"think tokens: {script} needs a model trained on the chat format (prepare.py, train.py)")
    model_args = ckpt["model_args"] | {"dropout": 0.0, "grad_checkpoint": cfg.grad_checkpoint}
    source = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.resume else cfg.init_from
    model, lora = build_run_model(model_args, ckpt, source, cfg)
    model = model.to(device).train()
    sample_dtype = inference_dtype(device_type, cfg.dtype, model.num_params()["total"])
    sample_ctx = autocast(device_type, None if sample_dtype == torch.float32 else sample_dtype)
    return model, lora, enc, tokenizer, device, amp, autocast(device_type, amp), sample_ctx


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by train.py or rl.py -> (model in eval mode on device, the checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    return build_model(ckpt["model_args"], ckpt["model"], path).to(device).eval(), ckpt
