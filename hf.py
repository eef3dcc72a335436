"""
Our weight names and configs against transformers' (and llama.cpp's GGUF), one table per architecture,
used in both directions: GPT.from_pretrained (model.py) reads transformers' weights through it, export.py
writes transformers' and GGUF's, bench.py builds transformers' twin of a model; LoRA adapters go to and come
from PEFT's layout through the same table (to_peft, from_peft).

The architectures our GPT computes, and their classes:
- 'gpt2': GPT2LMHeadModel. Learned positions, LayerNorm, the same names as ours (nanoGPT kept them),
  four of its matrices stored transposed (Conv1D).
- 'nanochat': NanoChatForCausalLM. Rotary positions, gain-less RMSNorms, QK-norm, a normed embedding;
  its rotary embedding pairs a head's halves the other way round from ours (flip_rotary).
- 'llama': LlamaForCausalLM (SmolLM2, TinyLlama, ...). Rotary positions, RMSNorm, SwiGLU; queries, keys
  and values (and the gate and up projections) in separate matrices where ours fuses them.
- 'gguf-gpt2', 'gguf-llama': llama.cpp's GPT-2 and Llama architectures; its Llama rotates adjacent pairs.
This file imports nothing of the project: it takes a config (GPTConfig or anything with its fields) and
state dicts.
"""
import os

import torch

# transformers' GPT-2 keeps these four as Conv1D weights, (in, out): the transpose of Linear's (out, in)
GPT2_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# transformers' activation names <-> (mlp, gelu_approximate); GPT-2's weights were trained with 'gelu_new' (tanh)
HF_ACTIVATIONS = {'gelu': ('gelu', 'none'), 'gelu_new': ('gelu', 'tanh'), 'gelu_pytorch_tanh': ('gelu', 'tanh'),
                  'relu2': ('relu2', 'none')}
OUR_ACTIVATIONS = {('gelu', 'none'): 'gelu', ('gelu', 'tanh'): 'gelu_new', ('relu2', 'none'): 'relu2'}


def flip_rotary(w, head_dim):
    """A query or key projection's rows with the second half of every head negated. transformers'
    NanoChat rotates each (first half, second half) pair the other way round from model.apply_rope;
    negating the second half turns one rotation into the other, and neither the query-key dot
    products nor QK-norm see the sign. Its own inverse."""
    sign = torch.ones(head_dim, dtype=w.dtype, device=w.device)
    sign[head_dim // 2:] = -1
    return w * sign.repeat(w.shape[0] // head_dim)[:, None]


def interleave_rotary(w, head_dim, back=False):
    """A query or key projection's rows reordered within each head from (first half, second half) to
    (x0, y0, x1, y1, ...): llama.cpp's Llama rotates adjacent pairs, ours the two halves. back: the inverse."""
    if back:
        return w.view(-1, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    return w.view(-1, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def table(arch, cfg):
    """[(our name, [(their name, transform), ...])] for every weight: one of theirs, or several that our
    one fuses (concatenated along its rows in that order), or none (a norm without a gain there: ours
    is ones). transform: None, 'transpose' (GPT-2's Conv1D), 'flip' (flip_rotary) or 'interleave'
    (interleave_rotary), each with its inverse for the way back."""
    untied = not cfg.tie_embeddings
    if arch == 'gpt2':  # our names are transformers' own
        top = ['transformer.wte.weight', 'transformer.wpe.weight', 'transformer.ln_f.weight', 'transformer.ln_f.bias',
               'lm_head.weight']
        per_layer = [f'{m}.{kind}' for m in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj')
                     for kind in ('weight', 'bias')]
        names = top + [f'transformer.h.{i}.{n}' for i in range(cfg.n_layer) for n in per_layer]
        return [(n, [(n, 'transpose' if n.endswith(GPT2_CONV1D) else None)]) for n in names]
    if arch == 'gguf-gpt2':
        layer = {'ln_1': 'attn_norm', 'attn.c_attn': 'attn_qkv', 'attn.c_proj': 'attn_output', 'ln_2': 'ffn_norm',
                 'mlp.c_fc': 'ffn_up', 'mlp.c_proj': 'ffn_down'}
        out = [('transformer.wte.weight', [('token_embd.weight', None)]),
               ('transformer.wpe.weight', [('position_embd.weight', None)]),
               ('transformer.ln_f.weight', [('output_norm.weight', None)]),
               ('transformer.ln_f.bias', [('output_norm.bias', None)])]
        out += [('lm_head.weight', [('output.weight', None)])] if untied else []
        return out + [(f'transformer.h.{i}.{ours}.{kind}', [(f'blk.{i}.{theirs}.{kind}', None)])
                      for i in range(cfg.n_layer) for ours, theirs in layer.items() for kind in ('weight', 'bias')]
    if arch == 'nanochat':
        out = [('transformer.wte.weight', [('model.embed_tokens.weight', None)]), ('transformer.ln_f.weight', []),
               ('lm_head.weight', [('lm_head.weight', None)])]
        for i in range(cfg.n_layer):
            h, layer = f'transformer.h.{i}.', f'model.layers.{i}.'
            out += [(h + 'attn.c_attn.weight', [(layer + 'self_attn.q_proj.weight', 'flip'),
                                                (layer + 'self_attn.k_proj.weight', 'flip'),
                                                (layer + 'self_attn.v_proj.weight', None)]),
                    (h + 'attn.c_proj.weight', [(layer + 'self_attn.o_proj.weight', None)]),
                    (h + 'mlp.c_fc.weight', [(layer + 'mlp.fc1.weight', None)]),
                    (h + 'mlp.c_proj.weight', [(layer + 'mlp.fc2.weight', None)]),
                    (h + 'ln_1.weight', []), (h + 'ln_2.weight', [])]
        return out
    if arch in ('llama', 'gguf-llama'):
        hf = arch == 'llama'
        rotary = None if hf else 'interleave'  # transformers' Llama pairs a head's halves as ours does
        out = [('transformer.wte.weight', [('model.embed_tokens.weight' if hf else 'token_embd.weight', None)]),
               ('transformer.ln_f.weight', [('model.norm.weight' if hf else 'output_norm.weight', None)])]
        if hf or untied:  # transformers' state dict names a tied head too; GGUF stores it once
            out += [('lm_head.weight', [('lm_head.weight' if hf else 'output.weight', None)])]
        for i in range(cfg.n_layer):
            h, layer = f'transformer.h.{i}.', f'model.layers.{i}.' if hf else f'blk.{i}.'
            name = (lambda ours, theirs: layer + (ours if hf else theirs) + '.weight')  # noqa: E731
            out += [(h + 'attn.c_attn.weight', [(name('self_attn.q_proj', 'attn_q'), rotary),
                                                (name('self_attn.k_proj', 'attn_k'), rotary),
                                                (name('self_attn.v_proj', 'attn_v'), None)]),
                    (h + 'attn.c_proj.weight', [(name('self_attn.o_proj', 'attn_output'), None)]),
                    (h + 'mlp.c_fc.weight', [(name('mlp.gate_proj', 'ffn_gate'), None),
                                             (name('mlp.up_proj', 'ffn_up'), None)]),
                    (h + 'mlp.c_proj.weight', [(name('mlp.down_proj', 'ffn_down'), None)]),
                    (h + 'ln_1.weight', [(name('input_layernorm', 'attn_norm'), None)]),
                    (h + 'ln_2.weight', [(name('post_attention_layernorm', 'ffn_norm'), None)])]
        return out
    raise ValueError(f"unknown architecture '{arch}'")


def transform(how, w, head_dim, back=False):
    if how == 'transpose':
        return w.t()
    if how == 'flip':
        return flip_rotary(w, head_dim)
    if how == 'interleave':
        return interleave_rotary(w, head_dim, back)
    return w


def split_sizes(name, cfg, n):
    """How our fused weight `name` splits into n of theirs: queries, keys, values; or gate and up, halves."""
    if n == 1:
        return None
    hd = cfg.n_embd // cfg.n_head
    if name.endswith('attn.c_attn.weight'):
        return [cfg.n_embd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]
    return [cfg.mlp_hidden] * 2


def to_theirs(arch, cfg, ours):
    """Our state dict (float tensors) under `arch`'s names. A weight theirs keeps elsewhere must be
    moved first (fold_norm_gains for 'nanochat'); GPT-2's formats always hold biases (with_biases)."""
    hd, out = cfg.n_embd // cfg.n_head, {}
    for mine, theirs in table(arch, cfg):
        if not theirs:
            continue
        sizes = split_sizes(mine, cfg, len(theirs))
        parts = ours[mine].split(sizes) if sizes else [ours[mine]]
        for (name, how), part in zip(theirs, parts):
            out[name] = transform(how, part, hd)
    return out


def from_theirs(arch, cfg, theirs):
    """Their state dict as ours: (state dict, the names of theirs it did not use)."""
    hd, out, used = cfg.n_embd // cfg.n_head, {}, set()
    for mine, parts in table(arch, cfg):
        if not parts:  # their norm has no gain: ours is one
            out[mine] = torch.ones(cfg.n_embd)
            continue
        missing = [name for name, _ in parts if name not in theirs]
        if missing:
            raise ValueError(f"{missing[0]} is missing")
        out[mine] = torch.cat([transform(how, theirs[name], hd, back=True) for name, how in parts])
        used.update(name for name, _ in parts)
    return out, sorted(set(theirs) - used)


def fold_norm_gains(ours, cfg):
    """nanochat's RMSNorms have no gain: ours multiply into the columns of the layer each feeds (the final
    one into the head, which unties it). Returns a new state dict whose norm gains are all one."""
    out = dict(ours)
    out['lm_head.weight'] = ours['lm_head.weight'] * ours['transformer.ln_f.weight']
    for i in range(cfg.n_layer):
        h = f'transformer.h.{i}.'
        out[h + 'attn.c_attn.weight'] = ours[h + 'attn.c_attn.weight'] * ours[h + 'ln_1.weight']
        out[h + 'mlp.c_fc.weight'] = ours[h + 'mlp.c_fc.weight'] * ours[h + 'ln_2.weight']
    return out


def with_biases(sd):
    """A GPT-2-architecture state dict with a zero bias beside every LayerNorm and Linear weight that has
    none (bias=False): GPT-2's formats always hold biases, and a zero one computes the same."""
    out = dict(sd)
    for k, v in sd.items():
        bias = k.removesuffix('.weight') + '.bias'
        if k.startswith(('transformer.h.', 'transformer.ln_f.')) and k.endswith('.weight') and bias not in sd:
            out[bias] = torch.zeros(v.shape[0])
    return out


# ---------------------------------------------------------------------------------------------
# configs: which transformers class computes a GPTConfig, and the config each way

def as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def described(needs):
    """Switch values as a reader writes them: norm='rmsnorm', mlp in ('gelu', 'relu2')."""
    return ', '.join(f"{k} in {v!r}" if isinstance(v, tuple) else f"{k}={v!r}" for k, v in needs.items())


def hf_arch(cfg):
    """'gpt2', 'nanochat' or 'llama': the transformers architecture that computes the model of GPTConfig
    cfg; ValueError naming the switches that none computes."""
    if cfg.use_alibi:
        raise ValueError("no transformers class computes use_alibi=True (GPT2LMHeadModel has learned positions, "
                         "NanoChatForCausalLM and LlamaForCausalLM rotary ones)")
    if cfg.use_rope and (cfg.qk_norm or cfg.embed_norm):
        arch, needs = 'nanochat', dict(norm='rmsnorm', qk_norm=True, embed_norm=True, bias=False, mlp=('gelu', 'relu2'))
    elif cfg.use_rope:
        arch, needs = 'llama', dict(norm='rmsnorm', mlp='swiglu', bias=False, logit_softcap=0.0)
    else:
        arch, needs = 'gpt2', dict(norm='layernorm', qk_norm=False, embed_norm=False, logit_softcap=0.0,
                                   n_kv_head=cfg.n_head, mlp=('gelu', 'relu2'))
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in needs.items() if getattr(cfg, k) not in as_tuple(v)]
    if wrong:
        positions = 'rotary' if cfg.use_rope else 'learned'
        raise ValueError(f"no transformers class computes this model: with {positions} positions that is "
                         f"{HF_CLASSES[arch]}, which needs {described(needs)}; this model has {', '.join(wrong)}")
    return arch


HF_CLASSES = {'gpt2': 'GPT2LMHeadModel', 'nanochat': 'NanoChatForCausalLM', 'llama': 'LlamaForCausalLM'}


def gguf_arch(cfg):
    """'gguf-gpt2' or 'gguf-llama': the llama.cpp architecture that computes the model of GPTConfig cfg;
    ValueError naming the switches that neither computes."""
    if cfg.use_rope:
        arch, needs = 'gguf-llama', dict(norm='rmsnorm', mlp='swiglu', bias=False, qk_norm=False, embed_norm=False,
                                         logit_softcap=0.0)
    else:
        arch, needs = 'gguf-gpt2', dict(use_alibi=False, norm='layernorm', qk_norm=False, embed_norm=False,
                                        mlp='gelu', logit_softcap=0.0, n_kv_head=cfg.n_head)
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, ok in needs.items() if getattr(cfg, k) != ok]
    if wrong:
        raise ValueError(f"--format=gguf writes a model with {'rotary' if cfg.use_rope else 'learned'} positions as "
                         f"llama.cpp's {'Llama' if cfg.use_rope else 'GPT-2'} architecture, which needs "
                         f"{described(needs)}; this model has {', '.join(wrong)}")
    return arch


def weight_file_bytes(path):
    """The bytes of a transformers directory's weight files (safetensors or PyTorch, sharded or not); None
    when it has none (transformers then says what is missing)."""
    names = [n for n in os.listdir(path) if n.endswith(('.safetensors', '.bin')) and not n.startswith('training_args')]
    return sum(os.path.getsize(os.path.join(path, n)) for n in names) if names else None


def config_from_hf(hf, name_or_path):
    """(GPTConfig's arguments, arch) for a transformers config; ValueError for a model this GPT does not
    compute (rope scaling, biases, another architecture)."""
    if hf.model_type not in ('gpt2', 'nanochat', 'llama'):  # Mistral's sliding window, Qwen2's biases, ...
        raise ValueError(f"{name_or_path} holds a '{hf.model_type}' model; this GPT loads 'gpt2', 'nanochat' "
                         f"and 'llama' models")
    act = hf.activation_function if hf.model_type == 'gpt2' else getattr(hf, 'hidden_act', None)
    # Llama's MLP gates with its activation (SiLU: SwiGLU); GPT-2's and NanoChat's apply theirs to one projection
    known = {'silu': ('swiglu', 'none')} if hf.model_type == 'llama' else HF_ACTIVATIONS
    if act not in known:
        raise ValueError(f"{name_or_path}: activation '{act}' is not one of {', '.join(known)}")
    mlp, gelu_approximate = known[act]
    common = dict(vocab_size=hf.vocab_size, mlp=mlp, gelu_approximate=gelu_approximate,
                  tie_embeddings=bool(hf.tie_word_embeddings))
    if hf.model_type == 'gpt2':
        return dict(block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, bias=True,
                    **common), 'gpt2'
    C, H, rope = hf.hidden_size, hf.num_attention_heads, hf.rope_parameters or {}
    rotary = dict(block_size=hf.max_position_embeddings, n_layer=hf.num_hidden_layers, n_head=H, n_embd=C,
                  n_kv_head=hf.num_key_value_heads, bias=False, use_rope=True, norm='rmsnorm',
                  rope_theta=rope.get('rope_theta', 10000.0), **common)
    if hf.model_type == 'nanochat':
        if (hf.intermediate_size != 4 * C or hf.attention_bias or getattr(hf, 'head_dim', None) not in (None, C // H)
                or rope.get('rope_type', 'default') != 'default'):
            raise ValueError(f"{name_or_path}: this GPT computes NanoChat models with intermediate_size = 4 * "
                             f"hidden_size, no attention bias and plain rotary embeddings only")
        return dict(rotary, qk_norm=True, embed_norm=True, logit_softcap=hf.final_logit_softcapping or 0.0), 'nanochat'
    cannot = [what for what, present in [
        (f"rope_type '{rope.get('rope_type')}' (rope scaling)", rope.get('rope_type', 'default') != 'default'),
        ('attention_bias', hf.attention_bias), ('mlp_bias', hf.mlp_bias),
        (f"head_dim {hf.head_dim} (not hidden_size / num_attention_heads)", hf.head_dim not in (None, C // H))]
        if present]
    if cannot:
        raise ValueError(f"{name_or_path}: this GPT computes Llama models with plain rotary embeddings, no biases "
                         f"and head_dim = hidden_size / num_attention_heads; this one has {', '.join(cannot)}")
    return dict(rotary, rms_norm_eps=hf.rms_norm_eps, intermediate_size=hf.intermediate_size), 'llama'


def hf_config(cfg, n, eot):
    """The transformers config (GPT2Config, NanoChatConfig or LlamaConfig) of GPTConfig cfg, its vocabulary
    cut to n ids, eot the id that ends a document (None: none)."""
    from transformers import GPT2Config, LlamaConfig, NanoChatConfig
    arch = hf_arch(cfg)
    act = OUR_ACTIVATIONS.get((cfg.mlp, cfg.gelu_approximate if cfg.mlp == 'gelu' else 'none'))
    ids = dict(bos_token_id=eot, eos_token_id=eot, architectures=[HF_CLASSES[arch]])
    if arch == 'gpt2':
        return GPT2Config(vocab_size=n, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, activation_function=act, layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings, **ids)
    rotary = dict(vocab_size=n, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  num_key_value_heads=cfg.n_kv_head, max_position_embeddings=cfg.block_size,
                  rms_norm_eps=cfg.rms_norm_eps, rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
                  attention_bias=False, pad_token_id=None, **ids)
    if arch == 'llama':
        return LlamaConfig(intermediate_size=cfg.mlp_hidden, hidden_act='silu', mlp_bias=False,
                           tie_word_embeddings=cfg.tie_embeddings, **rotary)
    # folding the final norm's gain into the head unties it (fold_norm_gains)
    return NanoChatConfig(intermediate_size=4 * cfg.n_embd, hidden_act=act, tie_word_embeddings=False,
                          final_logit_softcapping=cfg.logit_softcap or None, **rotary)


def to_hf(model, vocab_size=None, eot=None):
    """(transformers config, state dict under its names) for our GPT: the class hf_arch picks, the
    vocabulary cut to vocab_size rows (a padded vocabulary's extra rows are never sampled), eot the
    id that ends a document (None: none)."""
    cfg, n = model.config, vocab_size or model.config.vocab_size
    arch = hf_arch(cfg)
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    ours['transformer.wte.weight'], ours['lm_head.weight'] = ours['transformer.wte.weight'][:n], ours['lm_head.weight'][:n]
    ours = fold_norm_gains(ours, cfg) if arch == 'nanochat' else with_biases(ours) if arch == 'gpt2' else ours
    return hf_config(cfg, n, eot), to_theirs(arch, cfg, ours)


# ---------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's layout: each of their Linears its own A and B. A fused weight of ours splits by
# its rows: every part keeps our A and takes its rows of B. The way back stacks their As and places their
# Bs block-diagonally (the fused rank is the sum of theirs), each B scaled by its own alpha / r.

PEFT_PREFIX = 'base_model.model.'


def lora_modules(arch, cfg):
    """[(our Linear's name, [(their Linear's name, transform), ...])] for every Linear a block holds."""
    if arch not in ('gpt2', 'llama'):
        raise ValueError(f"LoRA adapters in PEFT's layout are written for Llama and GPT-2 models, not '{arch}'")
    return [(mine.removesuffix('.weight'), [(n.removesuffix('.weight'), how) for n, how in theirs])
            for mine, theirs in table(arch, cfg) if mine.startswith('transformer.h.') and mine.endswith('.weight')
            and '.ln_' not in mine]


def lora_rows(how, b, head_dim):
    # a B's rows are its Linear's output rows: a rotary flip acts on them; GPT-2's Conv1D keeps LoRA's shapes
    return b if how == 'transpose' else transform(how, b, head_dim)


def peft_target(name, all_names, chosen):
    """The shortest suffix of their module name that names only modules the adapter covers (PEFT matches
    target_modules by suffix): 'q_proj', or 'attn.c_proj' where 'c_proj' would take the MLP's too."""
    parts = name.split('.')
    for n in range(1, len(parts) + 1):
        suffix = '.'.join(parts[-n:])
        if all(m in chosen for m in all_names if m == suffix or m.endswith('.' + suffix)):
            return suffix
    return name


def to_peft(arch, cfg, adapters):
    """(PEFT's adapter state dict, the LoRA fields of its adapter_config.json) for our adapters,
    {our Linear's name: (A, B, scaling)}."""
    hd, state, ranks = cfg.n_embd // cfg.n_head, {}, {}
    modules = lora_modules(arch, cfg)
    uniform = len({(a.shape[0], float(s)) for a, _, s in adapters.values()}) == 1
    for mine, theirs in modules:
        if mine not in adapters:
            continue
        a, b, s = adapters[mine]
        b = b if uniform else b * s  # ranks or scales that differ: each folded into its B, alpha = r
        sizes = split_sizes(mine + '.weight', cfg, len(theirs))
        for (name, how), part in zip(theirs, b.split(sizes) if sizes else [b]):
            state[f'{PEFT_PREFIX}{name}.lora_A.weight'] = a.clone()  # each its own copy: safetensors shares none
            state[f'{PEFT_PREFIX}{name}.lora_B.weight'] = lora_rows(how, part, hd).contiguous()
            ranks[name] = a.shape[0]
    all_names = [n for _, theirs in modules for n, _ in theirs]
    targets = sorted({peft_target(n, all_names, ranks) for n in ranks})
    r, s = next(iter(adapters.values()))[0].shape[0], float(next(iter(adapters.values()))[2])
    fields = dict(r=r, lora_alpha=s * r if uniform else r, target_modules=targets, fan_in_fan_out=arch == 'gpt2',
                  rank_pattern={} if uniform else ranks, alpha_pattern={} if uniform else ranks)
    return state, fields


def peft_setting(config, pattern, name, default):
    """A per-module setting of adapter_config.json: the rank_pattern / alpha_pattern entry whose key ends the
    module's name (PEFT's rule), else the config-wide value."""
    import re
    for key, value in (config.get(pattern) or {}).items():
        if re.fullmatch(rf'(.*\.)?{key}', name):
            return value
    return default


def from_peft(arch, cfg, config, theirs):
    """Our adapter state ({name.lora_A, .lora_B, .lora_scaling}) from a PEFT LoRA adapter: adapter_config.json's
    dict and its tensors. ValueError for what our LoRA does not compute (DoRA, LoRA biases, adapted
    embeddings or heads, weights left over)."""
    cannot = [what for what, present in [('use_dora', config.get('use_dora')), ('lora_bias', config.get('lora_bias')),
                                         ('modules_to_save', config.get('modules_to_save')),
                                         (f"peft_type {config.get('peft_type')}", config.get('peft_type', 'LORA') != 'LORA')]
              if present]
    if cannot:
        raise ValueError(f"this adapter uses {cannot[0]}: only plain LoRA adapters on Linears load here")
    hd, out, used = cfg.n_embd // cfg.n_head, {}, set()
    theirs = {k.replace('.lora_A.default.', '.lora_A.').replace('.lora_B.default.', '.lora_B.'): v
              for k, v in theirs.items()}
    for mine, parts in lora_modules(arch, cfg):
        sizes = split_sizes(mine + '.weight', cfg, len(parts)) or [None]
        As, Bs, rank = [], [], 0
        for (name, how), rows in zip(parts, sizes):
            a_key, b_key = f'{PEFT_PREFIX}{name}.lora_A.weight', f'{PEFT_PREFIX}{name}.lora_B.weight'
            if a_key not in theirs:
                Bs.append((rows, None))
                continue
            a, b = theirs[a_key].float(), theirs[b_key].float()
            r = peft_setting(config, 'rank_pattern', name, config.get('r', a.shape[0]))
            alpha = peft_setting(config, 'alpha_pattern', name, config.get('lora_alpha', r))
            scale = alpha / (r ** 0.5 if config.get('use_rslora') else r)
            As.append(a)
            Bs.append((b.shape[0], lora_rows(how, b * scale, hd)))
            used.update((a_key, b_key))
            rank += a.shape[0]
        if not As:
            continue
        B, col = torch.zeros(sum(rows for rows, _ in Bs), rank), 0
        row = 0
        for rows, b in Bs:
            if b is not None:
                B[row:row + rows, col:col + b.shape[1]] = b
                col += b.shape[1]
            row += rows
        out.update({f'{mine}.lora_A': torch.cat(As), f'{mine}.lora_B': B, f'{mine}.lora_scaling': torch.tensor(1.0)})
    left = sorted(set(theirs) - used)
    if left:
        raise ValueError(f"{left[0]} is not a LoRA weight of a Linear this model has{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}")
    return out
