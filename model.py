"""MiniGLM's decoder-only transformer (GPT-2 style) with a masked loss and KV-cache generation
(one prompt, or a left-padded batch of prompts).

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=256))        # 6 layers, 512 wide, 8 heads: about 45M params
    logits, loss = model(x, y, loss_mask)         # x, y, loss_mask: (B, T); loss: mean over counted targets
    for token in model.generate(prompt_ids, max_new_tokens=256, eot_id=tok.eot_id): ...   # tok: the data's tokenizer
    for step in model.generate_batch([ids_a, ids_b], 128, eot_id=tok.eot_id): ...  # [(row, token)] a step

No I/O here: no paths, no tokenizer, no argparse. Attention is torch's scaled_dot_product_attention
(flash/memory-efficient kernels where the device has them).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def select_device(device: str = "", dtype: str = "") -> tuple[str, str]:
    """The one place device and dtype are chosen. device "": cuda, then mps, then cpu.
    dtype "": bfloat16 on a CUDA GPU that supports it, float16 on older GPUs (train with a
    GradScaler), float32 on mps and cpu."""
    if not device:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if not dtype:
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    return device, dtype


# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40": 181e12,
              "4090": 165e12, "A6000": 155e12, "3090": 71e12, "A10": 125e12, "L4": 121e12,
              "V100": 125e12, "T4": 65e12, "2080": 43e12}


def peak_flops(dev: str) -> float | None:
    """The device's dense bf16/fp16 peak FLOP/s (for MFU), or None: not CUDA, or a GPU not in PEAK_FLOPS."""
    if not dev.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def autocast_context(device: str, dtype: str):
    """Mixed precision on CUDA; plain float32 elsewhere (CPU autocast is slower here)."""
    if device.startswith("cuda") and dtype != "float32":
        return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))
    return nullcontext()


@dataclass
class GPTConfig:
    block_size: int = 256      # the longest context the model attends over
    vocab_size: int = 50304    # embedding rows; train.py sets the data tokenizer's model_vocab_size (gpt2: this)
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = False         # biases in Linear and LayerNorm (GPT-2 had them; slightly slower)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1 on all paths)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer, allocated once per layer for `size` tokens as
    (B, n_head, size, head_dim) (the dtype and device of the first k, v it is given) and written
    in place; the first `length` columns are filled. GPT.forward advances length after the
    last layer, so every layer of one call writes at the same columns."""

    def __init__(self, n_layer: int, size: int):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.size, self.length = size, 0

    def update(self, layer: int, k, v):
        """Write k, v (B, n_head, T, head_dim) after the filled columns; the filled keys and values."""
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_empty(B, H, self.size, D)
            self.v[layer] = v.new_empty(B, H, self.size, D)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep(self, rows):
        """Keep only these batch rows (a (B',) index tensor), e.g. when the others have finished:
        new buffers, with only the filled columns copied."""
        for buffers in (self.k, self.v):
            for layer, t in enumerate(buffers):
                if t is not None:
                    buffers[layer] = t.new_empty(len(rows), *t.shape[1:])
                    buffers[layer][:, :, :self.length] = t[:, :, :self.length].index_select(0, rows)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, past: int = 0, mask=None):
        """past: how many tokens the cache held before this call (the same for every layer). mask:
        (B, 1, T, past + T) bool, True where a query may see a key (GPT.forward's, for padded
        batches); None: causal."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None and past > 0 and T > 1:
            # new queries sit at positions past..past+T-1 and may see keys 0..past+i (all, if T == 1)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None and past == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, past=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, past, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_dropout(self, p: float) -> None:
        """Every dropout of the model to p (a run's --dropout over the checkpoint's): the nn.Dropout
        layers and the attention's dropout_p, which is a float, not a layer."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied embedding counts once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, loss_mask=None, cache: KVCache | None = None, return_logits=True,
                reduction: str = "mean", pad=None):
        """idx, targets, loss_mask: (B, T). Returns (logits, loss).

        With targets: logits (B, T, vocab) and loss = sum(ce * mask) / sum(mask), the mean
        cross-entropy over counted targets (all of them when loss_mask is None); 0 when the
        mask counts nothing. reduction="sum" returns sum(ce * mask) instead (float32), for a
        caller that divides by the targets counted over several batches (gradient accumulation,
        DDP, evaluation). return_logits=False (training) skips the vocabulary projection of
        positions the mask does not count and returns logits None: for SFT blocks, mostly
        question and padding, that is most of the work. Without targets: logits of the last
        position only, (B, 1, vocab), and loss None. With a cache, idx continues the cached tokens.
        pad (B,) (generation of a left-padded batch): the columns before pad[b] are padding, never
        attended to, and row b's first real token has position 0."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: expected mean or sum")
        B, T = idx.size()
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        attn_mask = None
        if pad is not None:
            # (B, 1, T, past + T): query column i sees key column j <= i from pad[b] on; a padding
            # query sees itself only, so no row of the softmax is all -inf (that would give nan)
            keys = torch.arange(past + T, device=idx.device)
            attn_mask = ((keys <= pos[:, None]) & ((keys >= pad[:, None, None]) | (keys == pos[:, None])))[:, None]
            pos = (pos - pad[:, None]).clamp(min=0)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, past, attn_mask)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        targets = targets.reshape(-1)
        mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask.reshape(-1).bool()
        if return_logits:
            logits = self.lm_head(x)
            ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets, reduction="none")
            nll, count = (ce * mask).sum(), mask.sum().clamp(min=1)
        else:
            keep = mask.nonzero().squeeze(1)  # (N,) counted positions
            h = x.view(-1, x.size(-1)).index_select(0, keep)
            logits, count = None, max(1, keep.numel())
            nll = F.cross_entropy(self.lm_head(h).float(), targets.index_select(0, keep), reduction="sum")
        return logits, nll if reduction == "sum" else nll / count

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; 2-D weights (matmuls, embeddings) decay, biases and norms do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops(self, positions: int, counted: int) -> float:
        """Training FLOPs (PaLM appendix B: 6 per weight per token, + 12 L H Q T for attention) of
        `positions` positions of which `counted` reach the output layer: forward(return_logits=False)
        skips the vocabulary projection of the others (on SFT data, most positions)."""
        c = self.config
        head = c.vocab_size * c.n_embd  # lm_head, tied with wte
        body = 6 * (self.num_params(non_embedding=True) - head) + 12 * c.n_layer * c.n_embd * c.block_size
        return body * positions + 6 * head * counted

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float = 1.0, eot_id: int | None = None,
                 max_token_id: int | None = None, use_cache: bool = True, generator=None, constraint=None):
        """Yield new token ids one at a time for a prompt idx of shape (1, T).

        The prompt is processed once; then, with use_cache, one token per step through the KV
        cache. Prompts longer than block_size keep their last block_size - 1 tokens. When the
        context reaches block_size, the oldest half is dropped and the cache is rebuilt from the
        remaining tokens (positions restart at 0), so generation can run past block_size; the
        uncached path applies the same rule, so both give the same tokens.
        temperature 0 means greedy, and any temperature > 0 however small samples without overflow.
        top_k (0 or None: all tokens) / top_p (0: only the most likely token, 1 or None: no cut)
        filter the distribution; repetition_penalty > 1
        divides the positive logits (multiplies the negative) of tokens already in the context.
        Ids >= max_token_id (e.g. PAD and the vocabulary padding) are never sampled. constraint
        (optional) restricts each step to constraint.allowed(state), a (vocab,) bool mask, with
        state = constraint.advance(state, token) after every token (starting at 0). Stops after
        yielding eot_id."""
        for [(_, token)] in self.generate_batch([idx[0].tolist()], max_new_tokens, temperature, top_k, top_p,
                                                repetition_penalty, eot_id, max_token_id, use_cache, [generator],
                                                constraint):
            yield token

    @torch.no_grad()
    def generate_batch(self, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, repetition_penalty: float = 1.0, eot_id: int | None = None,
                       max_token_id: int | None = None, use_cache: bool = True, generators=None, constraint=None):
        """generate for several prompts (lists of ids, of any lengths) at once: each step yields
        [(row, token)] for the rows still going (row: the prompt's index). Every row follows
        generate's rules on its own context: the block rule, the repetition penalty over its own
        tokens, its own constraint state and its own generator (generators[row]); a row stops
        after yielding eot_id. The batch is left-padded (GPT.forward's pad): every row's newest
        token is in the last column. A finished row leaves the batch; when a row's context
        reaches block_size, or the cache has no free column, the cache is rebuilt from every
        row's context (re-padded to the longest)."""
        block, vocab = self.config.block_size, self.config.vocab_size
        device = self.transformer.wte.weight.device
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts: expected one a prompt")
        ctx = [list(p[-(block - 1):]) for p in prompts]
        rows, states = list(range(len(prompts))), [0] * len(prompts)
        generators = list(generators) if generators is not None else [None] * len(prompts)
        cache, pad, seen = None, None, None  # seen: (B, vocab) bool, the tokens in each row's context
        for _ in range(max_new_tokens):
            crop = [i for i, c in enumerate(ctx) if len(c) >= block]
            for i in crop:
                ctx[i] = ctx[i][-(block // 2):]
            if crop or seen is None:
                seen = torch.zeros(len(ctx), vocab, dtype=torch.bool, device=device)
                for i, c in enumerate(ctx):
                    seen[i, c] = True
            if crop or not use_cache or (cache is not None and cache.length >= cache.size):
                cache = None
            if cache is None:  # the whole context, left-padded: (B, width)
                width = max(map(len, ctx))
                x = torch.tensor([[0] * (width - len(c)) + c for c in ctx], dtype=torch.long, device=device)
                pad = None if all(len(c) == width for c in ctx) else torch.tensor([width - len(c) for c in ctx],
                                                                                   device=device)
                # columns for what this call can still add, at most a block (memory: B x size per layer)
                cache = KVCache(self.config.n_layer, min(block, width + max_new_tokens)) if use_cache else None
            else:  # the newest token of each row: (B, 1)
                x = torch.tensor([c[-1:] for c in ctx], dtype=torch.long, device=device)
            logits, _ = self(x, cache=cache, pad=pad)
            logits = logits[:, -1, :].float()  # (B, vocab)
            if max_token_id is not None:
                logits[:, max_token_id:] = -float("inf")
            if constraint is not None:
                allowed = torch.stack([constraint.allowed(s) for s in states]).to(device)
                logits = logits.masked_fill(~allowed, -float("inf"))
            if repetition_penalty != 1.0:
                penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
                logits = torch.where(seen, penalized, logits)
            if temperature <= 0:
                tokens = logits.argmax(dim=-1).tolist()
            else:
                tokens = [self._sample(logits[i:i + 1], temperature, top_k, top_p, g) for i, g in enumerate(generators)]
            seen[range(len(tokens)), tokens] = True
            for i, token in enumerate(tokens):
                ctx[i].append(token)
                if constraint is not None:
                    states[i] = constraint.advance(states[i], token)
            yield list(zip(rows, tokens))
            going = [i for i, token in enumerate(tokens) if token != eot_id]
            if not going:
                return
            if len(going) < len(tokens):
                ctx, rows, states, generators = ([a[i] for i in going] for a in (ctx, rows, states, generators))
                keep = torch.tensor(going, device=device)
                seen = seen.index_select(0, keep)
                pad = None if pad is None else pad.index_select(0, keep)
                if cache is not None:
                    cache.keep(keep)

    @staticmethod
    def _sample(logits, temperature: float, top_k: int | None, top_p: float | None, generator) -> int:
        """One token from logits (1, vocab). Candidates: the top_k logits (already sorted), else the
        whole sorted vocabulary; top_p on the sorted candidates keeps the first whose cumulative mass
        passes top_p (top_p 0: the first alone). Shifted so the best is 0 before dividing (float32:
        MPS has no float64) by at least 1e-6: a tiny temperature sends the others to -inf, never the
        best to inf or nan; below 1e-6 sampling is greedy in effect."""
        if top_k:
            cand, order = torch.topk(logits, min(top_k, logits.size(-1)))  # (1, k)
        else:
            cand, order = torch.sort(logits, descending=True)
        cand = (cand - cand[:, :1]) / max(temperature, 1e-6)
        if top_p is not None and top_p < 1:
            probs = torch.softmax(cand, dim=-1)
            cand = cand.masked_fill(probs.cumsum(dim=-1) - probs > top_p, -float("inf"))
        pick = torch.multinomial(torch.softmax(cand, dim=-1), 1, generator=generator)
        return int(order[0, pick[0, 0]])
