"""
The GPT language model in one file.

By default it is GPT-2: learned position embeddings, pre-LayerNorm blocks, causal
self-attention, a 4x GELU MLP and an output head tied to the token embedding.
GPTConfig switches turn on the newer pieces (rotary embeddings, ALiBi, RMSNorm,
QK-norm, ReLU², grouped-query attention, logit soft-capping, an untied head); each
acts in a few lines at the place it matters and defaults to GPT-2, so every old
checkpoint still loads.

Also here: a KV cache and the decode primitives (prefill, one batched decode step,
token sampling) that sample.py, bench.py and serve.py all build on, and the Muon
optimizer.

References:
1) OpenAI's GPT-2 paper and TensorFlow code
2) huggingface/transformers' PyTorch GPT-2 (for the checkpoint layout)
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    # --- switches beyond GPT-2; every default is GPT-2's behaviour ---
    gelu_approximate: str = 'none'  # 'tanh' is what GPT-2's weights were trained with (from_pretrained sets it)
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head (plain multi-head)
    use_rope: bool = False  # rotary position embeddings instead of learned ones
    rope_theta: float = 10000.0
    use_alibi: bool = False  # ALiBi linear attention biases instead of position embeddings
    norm: str = 'layernorm'  # 'layernorm' | 'rmsnorm'
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention
    mlp: str = 'gelu'  # 'gelu' | 'relu2' (squared ReLU)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    tie_embeddings: bool = True  # lm_head shares the token embedding's weight

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert not (self.use_rope and self.use_alibi), "choose one of use_rope and use_alibi"
        assert self.norm in ('layernorm', 'rmsnorm'), f"unknown norm '{self.norm}'"
        assert self.mlp in ('gelu', 'relu2'), f"unknown mlp '{self.mlp}'"
        assert self.gelu_approximate in ('none', 'tanh')
        if self.use_rope:
            assert (self.n_embd // self.n_head) % 2 == 0, "rotary embeddings need an even head size"

    @property
    def learned_positions(self):
        return not (self.use_rope or self.use_alibi)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop just the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def make_norm(config):
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(config.n_embd, eps=1e-6)
    return LayerNorm(config.n_embd, bias=config.bias)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes: a geometric sequence starting at 2^(-8/n) (Press et al., 2021).
    For a head count that is not a power of two, take the slopes of the nearest lower power of
    two and fill up with every other slope of the next power of two, as the paper does."""
    def power_of_two_slopes(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_two_slopes(n_head))
    lower = 2 ** math.floor(math.log2(n_head))
    extra = power_of_two_slopes(2 * lower)[0::2][:n_head - lower]
    return torch.tensor(power_of_two_slopes(lower) + extra)


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd/2). Rotate each pair (first half, second half).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every layer, preallocated for `batch_size` rows of up to `max_len`
    positions. Each row has its own length, so rows holding different prompts (or requests
    that joined a server's batch at different times) decode together in one step."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = [0] * batch_size  # tokens held per row (host side: it sizes every step)
        self.max_len = max_len

    def copy_row(self, row, other, other_row=0):
        """Put row `other_row` of cache `other` (e.g. a freshly prefilled prompt) into row `row`."""
        n = other.lengths[other_row]
        assert n <= self.max_len
        for layer in range(len(self.k)):
            self.k[layer][row, :, :n] = other.k[layer][other_row, :, :n]
            self.v[layer][row, :, :n] = other.v[layer][other_row, :, :n]
        self.lengths[row] = n


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # queries, keys and values in one matmul; with n_kv_head < n_head the k and v parts shrink
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rope=None, attn_mask=None, cache=None, positions=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([C, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            # bounds the attention logits, which lets training take larger learning rates
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # write the new keys/values at each row's own positions, then attend over the
            # cache up to the longest row; the mask hides what a row has not written
            cache_k, cache_v = cache.k[self.layer_idx], cache.v[self.layer_idx]
            start, end = min(cache.lengths), max(cache.lengths)
            if start == end:  # every row at the same length: a plain slice copy, no index arithmetic
                cache_k[:, :, start:start + T] = k
                cache_v[:, :, start:start + T] = v
            else:
                rows = torch.arange(B, device=x.device)[:, None]
                cache_k[rows, :, positions] = k.transpose(1, 2).to(cache_k.dtype)
                cache_v[rows, :, positions] = v.transpose(1, 2).to(cache_v.dtype)
            k, v = cache_k[:, :, :end + T], cache_v[:, :, :end + T]
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if attn_mask is None:
            # plain causal attention, where the fused (flash) kernels apply; a lone query (a decode
            # step) is the newest position and sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kind, self.gelu_approximate = config.mlp, config.gelu_approximate

    def forward(self, x):
        x = self.c_fc(x)
        if self.kind == 'relu2':
            x = F.relu(x).square()  # squared ReLU (So et al., 2021): cheaper than GELU and trains faster
        else:
            x = F.gelu(x, approximate=self.gelu_approximate)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, **attn_kwargs):
        x = x + self.attn(self.ln_1(x), **attn_kwargs)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.learned_positions:
            self.transformer['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (Press & Wolf, 2017): one matrix embeds tokens and scores them
            self.transformer.wte.weight = self.lm_head.weight
        if config.use_alibi:
            self.register_buffer('alibi_slopes', alibi_slopes(config.n_head), persistent=False)

        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection adds to the stream once per layer
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count. By default the position embeddings are left out: the token
        embedding is counted because (tied) it is also the output layer's weight."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and 'wpe' in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids. Without `cache` the positions are 0..T-1. With a KVCache the
        tokens continue each row at that row's length and the cache is extended by T.
        Returns (logits, loss): logits for every position when targets are given, else only
        for the last position (all the sampler needs)."""
        device = idx.device
        B, T = idx.size()
        cfg = self.config
        if cache is None:
            positions = torch.arange(T, device=device)[None, :]  # (1, T)
        else:
            positions = torch.tensor(cache.lengths, device=device)[:, None] + torch.arange(T, device=device)
            assert max(cache.lengths) + T <= cache.max_len, "KV cache is full"
        end = T if cache is None else max(cache.lengths) + T  # one past the last position, as a Python int
        if cfg.learned_positions:
            assert end <= cfg.block_size, f"cannot forward {end} positions, block size is only {cfg.block_size}"

        x = self.transformer.wte(idx)
        if cfg.learned_positions:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)

        rope = None
        if cfg.use_rope:
            hd = cfg.n_embd // cfg.n_head
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
            angles = positions[:, None, :, None].float() * inv_freq  # (B or 1, 1, T, hd/2)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))

        # The attention mask: None means plain causal attention (the fast path). That is right with
        # a cache too while every row is at the same length and the cache is empty (a prompt) or
        # one token comes per row (a decode step). Otherwise (rows at different lengths, or several
        # tokens after cached ones) each query sees the keys at positions <= its own.
        attn_mask = None
        ragged = cache is not None and (min(cache.lengths) != max(cache.lengths) or (T > 1 and max(cache.lengths) > 0))
        if ragged or cfg.use_alibi:
            key_pos = torch.arange(end, device=device)
            allowed = key_pos[None, None, :] <= positions[:, :, None]  # (B or 1, T, S)
            if cfg.use_alibi:
                # ALiBi: a head-specific penalty growing linearly with the query-key distance
                distance = (key_pos[None, None, :] - positions[:, :, None]).float()
                bias = distance[:, None] * self.alibi_slopes[None, :, None, None]  # (B or 1, nh, T, S)
                attn_mask = bias.masked_fill(~allowed[:, None], float('-inf')).to(x.dtype)
            else:
                attn_mask = allowed[:, None]  # (B, 1, T, S), True = may attend

        for block in self.transformer.h:
            x = block(x, rope=rope, attn_mask=attn_mask, cache=cache, positions=positions)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.lengths = [n + T for n in cache.lengths]

        if targets is not None:
            logits = self.lm_head(x)
            if cfg.logit_softcap > 0:
                logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            x = x[:, [-1], :]  # the last position only: what sampling needs
            head = self.decode_head() if cache is not None else None
            logits = self.lm_head(x) if head is None else x @ head
            if cfg.logit_softcap > 0:
                logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) on shorter windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from transformers: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded
        from the hub) or a local directory written by transformers' save_pretrained."""
        override_args = override_args or {}
        assert all(k == 'dropout' for k in override_args), "only dropout can be overridden"
        from transformers import GPT2LMHeadModel
        print(f"loading weights from pretrained gpt: {name_or_path}")
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        hf = hf_model.config
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, bias=True, gelu_approximate='tanh',
                           dropout=override_args.get('dropout', 0.0))
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = hf_model.state_dict()
        # transformers stores these four as Conv1D weights, (in, out): transpose into Linear's (out, in)
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        keys = [k for k in sd_hf if not k.endswith(('.attn.masked_bias', '.attn.bias'))]
        assert set(keys) == set(sd), f"mismatched keys: {set(keys) ^ set(sd)}"
        with torch.no_grad():
            for k in keys:
                src = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert src.shape == sd[k].shape, f"shape mismatch for {k}: {src.shape} vs {sd[k].shape}"
                sd[k].copy_(src)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             optimizer='adamw', muon_lr=0.02, muon_momentum=0.95):
        """AdamW with weight decay on the matrices (>= 2-D) only, fused (one kernel for all tensors) on CUDA and CPU. With
        optimizer='muon', the 2-D matrices inside the blocks go to Muon at muon_lr and the
        embeddings, the head and every 1-D parameter to AdamW at learning_rate."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        print(f"num non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        if optimizer == 'adamw':
            groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
            on = self.lm_head.weight.device.type  # fused kernels exist for CUDA and CPU tensors
            use_fused = on in ('cuda', 'cpu') and 'fused' in inspect.signature(torch.optim.AdamW).parameters
            print(f"using fused AdamW: {use_fused}")
            return self._forget_decode_head_on_step(
                torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if use_fused else {})))
        assert optimizer == 'muon', f"unknown optimizer '{optimizer}'"
        matrices = [p for n, p in params.items() if p.dim() == 2 and n.startswith('transformer.h.')]
        embed_head = [p for n, p in params.items() if p.dim() >= 2 and not n.startswith('transformer.h.')]
        print(f"Muon on {len(matrices)} block matrices, AdamW on {len(embed_head)} embedding/head matrices")
        groups = [
            {'params': matrices, 'use_muon': True, 'lr': muon_lr, 'momentum': muon_momentum, 'weight_decay': 0.0},
            {'params': embed_head, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': weight_decay},
            {'params': no_decay, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': 0.0},
        ]
        return self._forget_decode_head_on_step(Muon([g for g in groups if g['params']]))

    def _forget_decode_head_on_step(self, optimizer):
        # decode_head() keeps a transposed copy of lm_head keyed by the weight's _version, but the
        # fused AdamW kernels update weights without bumping _version: drop the copy at every step
        optimizer.register_step_post_hook(lambda *args: setattr(self, '_decode_head_key', None))
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (A100 bf16 dense is 312e12,
        H100 SXM bf16 dense ~989e12). FLOPs per token from the PaLM paper's appendix B."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # ------------------------------------------------------------------------------------
    # Decoding with the KV cache. sample.py, bench.py and serve.py all use these pieces.

    def new_cache(self, batch_size, max_len):
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def decode_head(self):
        """On a CPU, without gradients: the output layer's weight transposed to (n_embd, vocab),
        else None. The head is the largest matrix a decode step reads, and MKL multiplies a few
        rows by it about 1.6x faster in this layout than in nn.Linear's (vocab, n_embd); the copy
        costs vocab * n_embd floats (154 MB for GPT-2) and is made again when the weight changes."""
        w = self.lm_head.weight
        if w.device.type != 'cpu' or torch.is_grad_enabled():
            return None
        key = (w.data_ptr(), w._version, w.dtype)  # _version: bumped by every in-place update
        if getattr(self, '_decode_head_key', None) != key:
            self._decode_head = w.detach().t().contiguous()
            self._decode_head_key = key
        return self._decode_head

    @torch.inference_mode()
    def prefill(self, tokens):
        """Run one prompt (a list of ids) through the model in one pass. Returns a 1-row
        cache holding it and the logits (1, vocab) for the next token. A learned-position
        model keeps the last block_size tokens, as nanoGPT crops."""
        if self.config.learned_positions:
            tokens = tokens[-self.config.block_size:]
        cache = self.new_cache(1, len(tokens))
        idx = torch.tensor([tokens], dtype=torch.long, device=self.lm_head.weight.device)
        logits, _ = self(idx, cache=cache)
        return cache, logits[:, -1, :]

    @torch.inference_mode()
    def decode_step(self, cache, tokens):
        """One new token per row: tokens (B,) -> logits (B, vocab) for the token after it."""
        logits, _ = self(tokens[:, None], cache=cache)
        return logits[:, -1, :]

    def make_room(self, cache, row, history):
        """A learned-position model cannot see past block_size. When row `row` is full,
        re-prefill its last block_size-1 tokens (all of `history` but the newest token, which
        the next decode step feeds) so the step sees exactly the window nanoGPT's crop sees."""
        if self.config.learned_positions and cache.lengths[row] >= cache.max_len:
            window, _ = self.prefill(history[-self.config.block_size:-1])
            cache.copy_row(row, window)

    @torch.inference_mode()
    def generate_tokens(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, generator=None):
        """The decode loop. prompts: a list of token-id lists (any lengths), one row each.
        Yields a (B,) LongTensor of new tokens per step, max_new_tokens times."""
        B = len(prompts)
        cfg = self.config
        longest = max(len(p) for p in prompts) + max_new_tokens
        max_len = min(longest, cfg.block_size) if cfg.learned_positions else longest
        cache = self.new_cache(B, max_len)
        if B > 1 and len({len(p) for p in prompts}) == 1 and len({tuple(p) for p in prompts}) == B:
            # distinct prompts of one length: prefill them together, in one batched pass
            window = cfg.block_size if cfg.learned_positions else len(prompts[0])  # as prefill crops
            idx = torch.tensor([p[-window:] for p in prompts], dtype=torch.long, device=self.lm_head.weight.device)
            logits = self(idx, cache=cache)[0][:, -1, :]
        else:
            logits = []
            for row, prompt in enumerate(prompts):
                if row > 0 and prompt == prompts[row - 1]:  # num_samples copies: prefill once
                    cache.copy_row(row, cache, row - 1)
                    logits.append(logits[-1])
                    continue
                one, last = self.prefill(prompt)
                cache.copy_row(row, one)
                logits.append(last)
            logits = torch.cat(logits)
        history = [list(p) for p in prompts]
        counts = token_counts(history, logits.size(-1), logits.device) if repetition_penalty != 1.0 else None
        for step in range(max_new_tokens):
            if counts is not None:
                logits = apply_penalties(logits, counts, repetition_penalty=repetition_penalty)
            next_tokens = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield next_tokens
            for row, t in enumerate(next_tokens.tolist()):
                history[row].append(t)
                self.make_room(cache, row, history[row])
            if counts is not None:
                counts[torch.arange(B), next_tokens] += 1
            if step < max_new_tokens - 1:
                logits = self.decode_step(cache, next_tokens)

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 generator=None):
        """nanoGPT's call: idx (B, T) -> (B, T + max_new_tokens), now with the KV cache.
        temperature=0 or top_k=1 is greedy."""
        new = list(self.generate_tokens(idx.tolist(), max_new_tokens, temperature, top_k, top_p,
                                        repetition_penalty, generator))
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1).to(idx.device)], dim=1)


def token_counts(histories, vocab_size, device):
    """(B, vocab) float counts of each token in each row's history, for the penalties."""
    counts = torch.zeros(len(histories), vocab_size, device=device)
    for row, h in enumerate(histories):
        if h:
            counts[row].index_add_(0, torch.tensor(h, device=device), torch.ones(len(h), device=device))
    return counts


def apply_penalties(logits, counts, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """Discourage tokens already seen. repetition_penalty (> 1 discourages; CTRL paper): a seen
    token's logit is divided by it when positive, multiplied when negative. presence/frequency
    (OpenAI's API): subtract presence once per seen token and frequency per occurrence."""
    seen = counts > 0
    if repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if presence_penalty or frequency_penalty:
        logits = logits - presence_penalty * seen.to(logits.dtype) - frequency_penalty * counts
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab). temperature 0 is greedy; top_k keeps
    the k most likely tokens (and any tied with the k-th); top_p keeps the smallest set whose
    probability reaches p."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k and top_k < logits.size(-1):
        # Only the top_k tokens can come out, so draw among those k (topk hands them over sorted,
        # as top_p needs) instead of over the whole vocabulary: the same distribution for much
        # less work per step. One token more is fetched to see whether a tie crosses the cut.
        values, indices = torch.topk(logits, top_k + 1)
        values = values / temperature
        if bool((values[:, -1] < values[:, -2]).all()):
            choice = sample_sorted(values[:, :-1], top_p, generator)
            return indices.gather(-1, choice[:, None])[:, 0]
        # a tie at the k-th place: keep every token tied with it, over the whole vocabulary
        logits = logits / temperature
        logits = logits.masked_fill(logits < values[:, [-2]], float('-inf'))
    else:
        logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        logits, order = torch.sort(logits, descending=True)
        return order.gather(-1, sample_sorted(logits, top_p, generator)[:, None])[:, 0]
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def sample_sorted(logits, top_p=None, generator=None):
    """Draw a column index per row of logits (B, n) sorted in descending order, after top_p."""
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------
# Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al., 2024)

def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately orthogonalise G (push its singular values towards 1) with a quintic
    Newton-Schulz iteration; coefficients (3.4445, -4.7750, 2.0315) from the Muon write-up.
    It only needs matmuls, so it runs in bfloat16 on a GPU."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T  # iterate on the wide side: X @ X.T is then the smaller Gram matrix
    X = X / (X.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True (2-D weight matrices): SGD-momentum (Nesterov)
    whose update is orthogonalised by newton_schulz, scaled by sqrt(max(1, rows/cols)).
    Groups with use_muon=False get a plain AdamW update, so one optimizer (one state_dict,
    one learning-rate schedule) drives the whole model."""

    def __init__(self, param_groups):
        defaults = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.95), eps=1e-8,
                        weight_decay=0.0, use_muon=True)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group['use_muon']:
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = torch.zeros_like(g)
                    buf = state['momentum_buffer']
                    buf.mul_(group['momentum']).add_(g)
                    g = g.add(buf, alpha=group['momentum']) if group['nesterov'] else buf
                    update = newton_schulz(g, steps=group['ns_steps'])
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                else:
                    if 'step' not in state:
                        state['step'] = 0
                        state['exp_avg'] = torch.zeros_like(p)
                        state['exp_avg_sq'] = torch.zeros_like(p)
                    state['step'] += 1
                    beta1, beta2 = group['betas']
                    state['exp_avg'].lerp_(g, 1 - beta1)
                    state['exp_avg_sq'].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    bias1 = 1 - beta1 ** state['step']
                    bias2 = 1 - beta2 ** state['step']
                    denom = (state['exp_avg_sq'] / bias2).sqrt_().add_(group['eps'])
                    p.addcdiv_(state['exp_avg'], denom, value=-lr / bias1)
        return loss
