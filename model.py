"""
The Forge transformer: a LLaMA-style decoder in one file, read top to bottom.

    config -> RMSNorm -> rotary embeddings -> grouped-query attention -> SwiGLU MLP
           -> block -> model -> generation (one batched loop, KV cache) -> FLOPs and memory -> sampling

Pre-norm blocks, no biases, input and output embeddings tied. The layout and the maths are those of
Hugging Face's LlamaForCausalLM, so export.py only has to rename tensors.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 50304      # padded to a multiple of 64 for fast matmuls
    block_size: int = 1024       # context length
    n_layer: int = 12
    n_head: int = 12             # query heads
    n_kv_head: int = 4           # key/value heads, shared by n_head // n_kv_head query heads each
    n_embd: int = 768
    ffn_hidden: int = 0          # 0 = 8/3 * n_embd rounded up to a multiple of 64
    emb_rank: int = 0            # 0 = full embedding; r > 0 = factorized E = A (V x r) @ B (r x d)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    grad_checkpoint: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight. F.rms_norm accumulates in fp32 even for half-precision inputs (the mean of
    squares would underflow in fp16), and is one call instead of eight: decoding is bound by op overhead."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(cfg):
    """cos/sin of every position's rotation angles, computed once. Rotate-half (GPT-NeoX / HF Llama)
    layout: the first and second halves of each head form the rotated pairs."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its position's angles; cos/sin are (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated_half * sin


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for one generation. It holds only
    n_kv_head heads per layer: that is grouped-query attention's memory saving."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layer)]  # per-layer views, made once
        self.pos = 0  # number of tokens already cached

    def keep(self, rows):
        """Keep only these batch rows (a LongTensor of indices): finished generations leave the batch."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.layers = [(self.k[i], self.v[i]) for i in range(len(self.layers))]

    def update(self, layer, k, v):
        """Store this step's k, v (B, n_kv_head, T, head_dim); return all keys and values so far."""
        k_all, v_all = self.layers[layer]
        end = self.pos + k.size(2)
        k_all[:, :, self.pos:end] = k
        v_all[:, :, self.pos:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # A prompt (T > 1, empty cache) attends causally; a single new token attends to everything cached.
        # enable_gqa lets each group of query heads read its shared K/V head without copying it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Forge(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        if cfg.emb_rank:  # Yxanul-style factorized embedding: V x r table, then an r -> d projection
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_rank)
            self.emb_proj = nn.Linear(cfg.emb_rank, cfg.n_embd, bias=False)
        else:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.emb_rank:  # std 1/sqrt(r) keeps the product A @ B at the usual 0.02 scale
            nn.init.normal_(self.emb_proj.weight, mean=0.0, std=cfg.emb_rank ** -0.5)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Total parameters (tied weights counted once) and how many of them are the embedding."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.tok_emb.weight.numel()
        if self.config.emb_rank:
            embedding += self.emb_proj.weight.numel()
        return {"total": total, "embedding": embedding}

    def embed(self, idx):
        x = self.tok_emb(idx)
        return self.emb_proj(x) if self.config.emb_rank else x

    def unembed(self, x):
        """Logits through the transposed (tied) embedding: x @ E^T, or x @ B^T @ A^T when factorized."""
        if self.config.emb_rank:
            x = F.linear(x, self.emb_proj.weight.t())
        return F.linear(x, self.tok_emb.weight)

    @property
    def device(self):
        return self.rope_cos.device

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) token ids -> (logits, loss). Without targets only the last position's logits are computed
        (B, 1, V), which is all generation needs. Targets of -1 are ignored: reduction="mean" averages the loss
        over the others, "none" returns each position's loss (B, T), 0 where ignored (rl.py's log-probabilities)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.drop(self.embed(idx))
        for block in self.blocks:
            if self.config.grad_checkpoint and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.unembed(x[:, -1:, :]), None
        logits = self.unembed(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return logits, loss.view(B, T) if reduction == "none" else loss

    @torch.inference_mode()  # no_grad without autograd's version counters: faster small-model decoding
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None):
        """Decode B prompts of equal length together, (B, T) ids (one prompt is a batch of one: [prompt]), and
        yield after every step {row: new token id} for the rows still generating: callers stream it or collect
        it. The prompts run once to fill the KV cache; each later step feeds only the newest tokens. A row stops
        after a token in stop_ids (which is yielded, so the caller sees why it stopped), after max_new_tokens,
        or when the context window (block_size) is full: it stops rather than slides, since sliding would
        re-encode every position (chat.py drops old turns instead). A finished row leaves the batch with its
        cache rows, so later steps compute only the live ones. Rows need no padding: G copies of one prompt (a
        GRPO group), or prompts grouped by length (replies.generate_replies)."""
        idx = torch.as_tensor(prompts, dtype=torch.long, device=self.device)
        B, T = idx.shape
        max_len = min(self.config.block_size, T + max_new_tokens)
        if T >= max_len:
            return
        cache = KVCache(self.config, B, max_len, idx.device, self._activation_dtype(idx.device.type))
        live = list(range(B))  # the row of the caller's batch that each row of the running batch belongs to
        for _ in range(max_len - T):
            logits, _ = self(idx, cache=cache)
            next_ids = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            tokens = next_ids.tolist()  # one device sync per step
            yield dict(zip(live, tokens))
            keep = [i for i, token in enumerate(tokens) if token not in stop_ids]
            if not keep:
                return
            if len(keep) < len(live):
                rows = torch.tensor(keep, device=idx.device)
                cache.keep(rows)
                next_ids, live = next_ids[rows], [live[i] for i in keep]
            idx = next_ids.view(-1, 1)

    def _activation_dtype(self, device_type):
        """The dtype of keys and values: autocast's when it is on, else the weights'."""
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.tok_emb.weight.dtype

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention scores,
        12 * layers * d_model * seq_len (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params()["total"] + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def estimate_mfu(self, tokens_per_iter, seq_len, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s as a fraction of the hardware peak you pass in."""
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    def activation_bytes(self, act_bytes):
        """(saved, transient) activation bytes per token of a training step: what autograd keeps from the
        forward pass for backward, and what backward allocates on top at its peak (the loss gradient over the
        vocabulary and, with checkpointing, the block being recomputed). act_bytes is 2 under autocast, 4 in
        fp32. Counted from this file's forward pass; tests check `saved` against autograd's saved tensors."""
        cfg, s = self.config, act_bytes
        d, f, h, kv, V = cfg.n_embd, cfg.ffn_hidden, cfg.n_head, cfg.n_kv_head * cfg.head_dim, cfg.vocab_size
        # per block: q/k/v/out/MLP tensors in the activation dtype, fp32 copies around the two RMSNorms (none
        # in fp32, where .float() is a no-op), and a few per-row statistics (softmax log-sum-exp per head, rms)
        block = s * (7 * d + 4 * f + 2 * kv) + (16 if s == 2 else 4) * d + 4 * h + 8
        # embedding and final norm, and the loss's fp32 log-softmax over the vocabulary
        ends = (8 + s) * d + 12 + 4 * V
        saved = ends + cfg.n_layer * (4 * d if cfg.grad_checkpoint else block)  # checkpointing: fp32 block inputs
        transient = 8 * V + (block if cfg.grad_checkpoint else 0)  # two fp32 gradients of the log-softmax
        return saved, transient

    def estimate_memory(self, batch_size, block_size, act_bytes):
        """Peak bytes per device of a training step: fp32 weights, gradients and AdamW's two moments,
        autocast's half-precision weight copies, and the activations of batch_size x block_size tokens."""
        n = self.num_params()["total"]
        saved, transient = self.activation_bytes(act_bytes)
        return {"weights": 4 * n, "grads": 4 * n, "optimizer": 8 * n,
                "weight copies": n * act_bytes if act_bytes < 4 else 0,
                "activations": batch_size * block_size * (saved + transient)}


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token id of each row of logits (B, V) -> (B,) ids: greedy at temperature 0, else sample
    from the softmax restricted to the top_k tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # tokens only needed after the mass is reached
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).view(-1)
