"""
LoRA: low-rank adapters on a frozen model's block matrices (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

Each adapted matrix W (out x in) gains a trainable update scale * B @ A, A (rank x in) random, B (out x rank) zero,
so training starts from exactly the base model; scale = alpha / rank. Only A and B are trained: gradients and
optimizer state exist for them alone. A LoRA checkpoint holds the adapters, not the base: "model" is the adapters'
state dict and "lora" says how they were made and which base they belong to (its path and the sha256 of its file);
checkpoints.read_checkpoint merges them into the base's weights, so every script that loads a checkpoint runs a
LoRA one unchanged.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every block matrix


class LoRALinear(nn.Module):
    """A bias-free linear layer whose weight is frozen, plus the trainable low-rank update. It keeps the layer's own
    weight Parameter under the same name, so the base's state dict loads into the adapted model unchanged."""

    def __init__(self, base, rank, alpha, generator):
        super().__init__()
        self.weight = base.weight.requires_grad_(False)
        a = nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a.to(self.weight.device))  # nn.Linear's own init, as the LoRA paper's code
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=self.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def parse_targets(targets):
    """lora_targets ("all" or a comma list of TARGETS) -> the matrix names; a UserError naming what matches none."""
    names = list(TARGETS) if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise UserError(f"lora_targets={targets!r}: {', '.join(unknown) or 'nothing'} matches no block matrix; "
                         f"use all or a comma list of {', '.join(TARGETS)}")
    return names


def add_lora(model, rank, alpha, targets, seed=0):
    """Freeze model and put adapters of rank `rank` on the matrices of every block named in targets (parse_targets's
    names) -> the number of trainable parameters. The A matrices are drawn from seed alone."""
    if rank < 1:
        raise UserError(f"lora_rank={rank}: the adapters' rank must be at least 1")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for part in (block.attn, block.mlp):
            for name in targets:
                if hasattr(part, name):
                    setattr(part, name, LoRALinear(getattr(part, name), rank, alpha, generator))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model):
    """The adapters' tensors of an adapted model's state dict: what a LoRA checkpoint stores as its "model"."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merge_adapters(weights, adapters, scale):
    """A base state dict with adapters merged in: W + scale * B @ A for every adapted matrix (a new dict; the base's
    tensors are not changed). The merged model computes what the adapted one does, with no extra work."""
    merged = dict(weights)
    for key in (k for k in adapters if k.endswith(".lora_a")):
        prefix = key.removesuffix(".lora_a")
        a, b = adapters[key].float(), adapters[f"{prefix}.lora_b"].float()
        w = weights[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
    return merged


def file_sha256(path):
    """The sha256 of a file's bytes, read in 1 MiB pieces: ties adapters to the exact base they were trained on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def lora_record(rank, alpha, targets, base):
    """What a LoRA run's checkpoints say about their adapters (checkpoints.py reads it): their shape, and the base
    checkpoint they adapt, pinned by its sha256."""
    return dict(rank=rank, alpha=alpha, targets=parse_targets(targets), base=base, base_sha256=file_sha256(base))
