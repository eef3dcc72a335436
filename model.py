"""
The GPT language model in one file.

By default it is GPT-2: learned position embeddings, pre-LayerNorm blocks, causal
self-attention, a 4x GELU MLP and an output head tied to the token embedding.
GPTConfig switches turn on the newer pieces (rotary embeddings, ALiBi, RMSNorm,
QK-norm, ReLU², SwiGLU, grouped-query attention, logit soft-capping, an untied head, a norm
after the token embedding; use_rope, rmsnorm, swiglu and no biases together are Llama's
architecture); each acts in a few lines at the place it matters and
defaults to GPT-2, so every old checkpoint still loads.

Also here: loading transformers' weights (from_pretrained, through hf.py's name maps), the optimizer
setup (AdamW, or Muon from muon.py) and nanoGPT's generate (through engine.py, which owns the KV
cache the attention writes into). Checkpoints are checkpoint.py's; the faster Linears inference swaps
in are inference.py's; the dtype and device policy is common.py's.

References:
1) OpenAI's GPT-2 paper and TensorFlow code
2) huggingface/transformers' PyTorch GPT-2 (for the checkpoint layout)
"""
import contextlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

import engine
import hf


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
    mlp: str = 'gelu'  # 'gelu' | 'relu2' (squared ReLU) | 'swiglu' (LLaMA's gated SiLU)
    intermediate_size: int = 0  # swiglu's hidden width; 0: LLaMA's 8/3 * n_embd rounded up to a multiple of 256
    rms_norm_eps: float = 1e-6  # the epsilon of norm='rmsnorm' (Llama checkpoints carry their own)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    tie_embeddings: bool = True  # lm_head shares the token embedding's weight
    embed_norm: bool = False  # RMS-normalise the token embedding (nanochat's architecture)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert not (self.use_rope and self.use_alibi), "choose one of use_rope and use_alibi"
        assert self.norm in ('layernorm', 'rmsnorm'), f"unknown norm '{self.norm}'"
        assert self.mlp in ('gelu', 'relu2', 'swiglu'), f"unknown mlp '{self.mlp}'"
        assert self.intermediate_size == 0 or self.mlp == 'swiglu', "intermediate_size is swiglu's hidden width"
        assert self.gelu_approximate in ('none', 'tanh')
        if self.use_rope:
            assert (self.n_embd // self.n_head) % 2 == 0, "rotary embeddings need an even head size"

    @property
    def learned_positions(self):
        return not (self.use_rope or self.use_alibi)

    @property
    def mlp_hidden(self):
        """The MLP's hidden width: GPT-2's 4 * n_embd; SwiGLU's three matrices keep about the same
        parameters with 2/3 of that, which LLaMA rounds up to a multiple of 256."""
        if self.mlp != 'swiglu':
            return 4 * self.n_embd
        return self.intermediate_size or -(-(8 * self.n_embd // 3) // 256) * 256


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
        return nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
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
        upcast = x.device.type == 'cpu' and (T <= 256 or cache is not None)
        if upcast:
            # Short attention on a CPU runs in float32, under bfloat16 autocast or weights too:
            # PyTorch's CPU kernels are slower in bfloat16 there. Measured on 2 cores, 12 heads of
            # 64, forward and backward over 8192 tokens, float32 takes 0.47x bfloat16's time at 64
            # positions, 0.98x at 256 (but 1.37x at 1024); one decode query over 1000 keys 0.13x.
            # So engine.py keeps a CPU cache in float32, and everything that reads it is float32.
            q, k, v = q.float(), k.float(), v.float()
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.float()
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        # CPU autocast would cast the float32 inputs back to bfloat16; entered only when it is on
        # (2.3 us a layer otherwise, in every decode step)
        no_autocast = upcast and torch.is_autocast_enabled('cpu')
        with torch.autocast('cpu', enabled=False) if no_autocast else contextlib.nullcontext():
            if attn_mask is None:
                # plain causal attention, where the fused (flash) kernels apply; a lone query (a
                # decode step) is the newest position and sees every key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden
        # swiglu: the gate's and the up projection's rows in one matmul, gate first
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if config.mlp == 'swiglu' else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kind, self.gelu_approximate = config.mlp, config.gelu_approximate

    def forward(self, x):
        x = self.c_fc(x)
        if self.kind == 'relu2':
            x = F.relu(x).square()  # squared ReLU (So et al., 2021): cheaper than GELU and trains faster
        elif self.kind == 'swiglu':
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up  # Shazeer (2020), as LLaMA computes it
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

    activation_checkpointing = False  # train.py's setting: recompute this block's activations in the backward

    def forward(self, x, **attn_kwargs):
        if self.activation_checkpointing and torch.is_grad_enabled():
            # inside the block, so FSDP's all-gather hooks on it stay outside the recomputation
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False, **attn_kwargs)
        return self._forward(x, **attn_kwargs)

    def _forward(self, x, **attn_kwargs):
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
        """idx: (B, T) token ids. Returns (logits, loss): logits for every position when targets
        are given (targets of -1 are left out of the loss), else only for the last position
        (all that generation needs). With a KVCache, see hidden_states."""
        x = self.hidden_states(idx, cache)
        if targets is None:
            return self.logits(x[:, [-1], :]), None
        logits = self.logits(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits(self, x):
        """Scores over the vocabulary from final hidden states."""
        logits = self.lm_head(x)
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, idx, cache=None):
        """The final (normalised) hidden states, (B, T, n_embd). Without a cache the positions
        are 0..T-1; with a KVCache each row's tokens continue at that row's length, their keys
        and values are written into the cache, and its lengths grow by T."""
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
        if cfg.embed_norm:
            # parameter-free, as nanochat does: the residual stream starts at unit scale whatever the embedding's
            x = F.rms_norm(x, (cfg.n_embd,), eps=1e-6)
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
        if cache is not None:
            cache.lengths = [n + T for n in cache.lengths]
        return self.transformer.ln_f(x)

    def shard(self, param_dtype=None):
        """Fully sharded data parallel (FSDP2) across the default process group: every block, then the
        rest (embeddings, head, final norm) as one group, each gathered only while it computes.
        param_dtype: the dtype blocks compute in (FSDP's mixed precision); gradients are reduced in float32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in self.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(self, mp_policy=mp)
        return self

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) on shorter windows."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """nanoGPT's call: (B, T) token ids in, (B, T + max_new_tokens) out, each row continued by
        sampling (temperature 0: greedy; top_k: only the k most likely tokens), through engine.py's
        loop. torch.manual_seed makes it repeat: the engine's seed is drawn from torch's generator."""
        if max_new_tokens == 0:
            return idx
        seed = int(torch.randint(2 ** 31, (1,)))
        new = engine.generate(self, idx.tolist(), max_new_tokens, seed=seed, temperature=temperature, top_k=top_k or 0)
        return torch.cat([idx, torch.tensor(new, dtype=idx.dtype, device=idx.device)], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """Weights from transformers: OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl',
        downloaded from the hub) or a local directory written by save_pretrained or export.py, holding a
        GPT2LMHeadModel, a NanoChatForCausalLM or a LlamaForCausalLM (SmolLM2, TinyLlama, ...), their names
        mapped to ours by hf.py. ValueError for a model this GPT does not compute (rope scaling, biases,
        another architecture)."""
        override_args = override_args or {}
        assert all(k == 'dropout' for k in override_args), "only dropout can be overridden"
        from transformers import AutoConfig, AutoModelForCausalLM
        print(f"loading weights from pretrained gpt: {name_or_path}")
        # the config first: what it describes must be a model this GPT computes, and a local directory's
        # weight files must be big enough to hold it, before transformers allocates a byte of it
        try:
            hf_config = AutoConfig.from_pretrained(name_or_path)
        except OSError:
            raise  # no such directory or hub model: transformers' own message says which
        except Exception as e:  # transformers' checks of the config's values, a config.json that is not JSON
            raise ValueError(f"{name_or_path}: its config.json is not one transformers reads: "
                             f"{' '.join(str(e).split())[:200]}") from None
        args, arch = hf.config_from_hf(hf_config, name_or_path)
        try:
            config = GPTConfig(**args, dropout=override_args.get('dropout', 0.0))
            with torch.device('meta'):
                n_params = sum(p.numel() for p in GPT(config).parameters())
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"{name_or_path}: its config.json describes no model this GPT builds: {e}") from None
        stored = hf.weight_file_bytes(name_or_path) if os.path.isdir(name_or_path) else None
        if stored is not None and 2 * n_params > 1.05 * stored:  # 2 bytes a parameter at the least (16-bit)
            raise ValueError(f"{name_or_path}: its config.json describes {n_params / 1e6:,.1f}M parameters, more than "
                             f"its weight files ({stored / 1e6:,.1f} MB) can hold")
        hf_model = AutoModelForCausalLM.from_pretrained(name_or_path)
        model = GPT(config)
        own = model.state_dict()
        theirs = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(('.attn.masked_bias', '.attn.bias'))}
        try:
            sd, unused = hf.from_theirs(arch, config, theirs)
        except ValueError as e:
            unused = [str(e)]
        odd = unused or [k for k in own if k not in sd or sd[k].shape != own[k].shape]
        if odd:
            raise ValueError(f"{name_or_path}: weights do not fit the architecture its config describes: {odd[:3]}")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
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
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if use_fused else {}))
        assert optimizer == 'muon', f"unknown optimizer '{optimizer}'"
        matrices = [p for n, p in params.items() if p.dim() == 2 and n.startswith('transformer.h.')]
        embed_head = [p for n, p in params.items() if p.dim() >= 2 and not n.startswith('transformer.h.')]
        print(f"Muon on {len(matrices)} block matrices, AdamW on {len(embed_head)} embedding/head matrices")
        groups = [
            {'params': matrices, 'use_muon': True, 'lr': muon_lr, 'momentum': muon_momentum, 'weight_decay': 0.0},
            {'params': embed_head, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': weight_decay},
            {'params': no_decay, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': 0.0},
        ]
        from muon import Muon  # only here: it imports torch.distributed's tensors, ~0.6 s at every start otherwise
        return Muon([g for g in groups if g['params']])

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12, block_size=None):
        """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (A100 bf16 dense is 312e12,
        H100 SXM bf16 dense ~989e12), for windows of block_size tokens (default: the model's).
        FLOPs per token from the PaLM paper's appendix B."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, block_size or cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops


def training_memory(config, batch_size):
    """Roughly the bytes a training run of this model holds at its peak, for a check before it starts:
    float32 weights, gradients and AdamW's two moments (16 bytes a parameter), the activations the
    backward keeps (Korthikanti et al. 2022 count s*b*h*(34 + 5*a*s/h) bytes a layer in 16 bits;
    doubled for float32) and the logits with their gradient. Counted on the meta device: nothing is allocated."""
    with torch.device('meta'):
        n_params = sum(p.numel() for p in GPT(config).parameters())
    s, b, h, a, L, V = config.block_size, batch_size, config.n_embd, config.n_head, config.n_layer, config.vocab_size
    return 16 * n_params + 2 * L * s * b * h * (34 + 5 * a * s / h) + 12 * b * s * V
