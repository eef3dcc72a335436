"""
Export a trained model (an out_dir checkpoint) to transformers or to llama.cpp.

$ python export.py --out_dir=out-shakespeare-char                  # -> out-shakespeare-char-hf/
$ python export.py --out_dir=out-shakespeare-char --format=gguf --dtype=float16 --to=shakespeare-char-f16.gguf

--format=hf writes a directory that AutoModelForCausalLM and AutoTokenizer load, and --init_from=DIR
here: config.json, model.safetensors, generation_config.json, the tokenizer (tokenizer.json; GPT-2's
vocab.json and merges.txt too for GPT-2's BPE) and our meta.pkl. The class is the one that computes
the same function as our model:
- GPT2LMHeadModel: learned positions, LayerNorm, plain multi-head attention, no QK-norm, soft-capping
  or embedding norm (every switch at its default), with a GELU or ReLU² MLP and a tied head or not;
- NanoChatForCausalLM: nanochat's architecture, use_rope with norm='rmsnorm', qk_norm and embed_norm,
  no biases, any n_kv_head, mlp, logit_softcap and head. Our RMSNorm gains fold into the next layer.
- LlamaForCausalLM: use_rope with norm='rmsnorm', mlp='swiglu' and no biases (no QK-norm, embedding
  norm or soft-capping), any n_kv_head, rope_theta, intermediate_size and head.
Anything else stops with the switches that no transformers class computes. A padded vocabulary
(GPT-2's 50257 padded to 50304) is cut to the tokenizer's size. A chat model's tokenizer gets a chat
template that renders as tokenizer.render_chat; a transformers model's tokenizer (a Llama model
fine-tuned here) goes out as it came, chat template included.
--format=peft writes a LoRA run's adapters (train.py --lora_rank) as a PEFT adapter directory over the
transformers model they adapt (adapter_config.json, adapter_model.safetensors, PEFT's module names: our
fused attention and gate/up weights split into q/k/v and gate/up, each with its rows of B), which
peft.PeftModel.from_pretrained(base, dir) loads and vLLM's --lora-modules takes; checked against peft's
logits where peft is installed. --format=hf and gguf write a LoRA run with its adapters merged in.
--format=gguf writes one llama.cpp file of its GPT-2 architecture (learned positions) or its Llama
architecture (the Llama switches), float32, float16, q8_0 or q4_0 (the gguf package, imported only
here), tokenizer and chat template included.

Before the export is put in place it is checked: transformers' (llama.cpp's, when llama-cpp-python is
installed) logits against ours on a fixed prompt, their greedy continuation against our engine's, their
tokenizer's ids against ours. A float32 transformers export that disagrees is not written.
"""
import json
import os
import pickle
import re
import shutil

import copy

import torch

from checkpoint import load_checkpoint
from configurator import configure, fail
from engine import Engine, Row
from hf import HF_CLASSES, gguf_arch, hf_arch, to_hf, to_peft, to_theirs, with_biases
from lora import LoRALinear, merge_lora
from tokenizer import (SPECIAL_NAMES, SPLIT_PATTERN, byte_chars, gpt2_tokenizer, meta_path_for, read_meta,
                       tokenizer_from_meta)

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export (train.py's out_dir)
format = 'hf'  # 'hf' (a transformers directory) | 'gguf' (one llama.cpp file) | 'peft' (a LoRA run's adapters)
to = ''  # where to write it; '' = <out_dir>-hf, <out_dir>.gguf or <out_dir>-peft
dtype = 'float32'  # 'float32' | 'float16' | 'bfloat16' (hf only) | 'q8_0' (gguf only)
overwrite = False  # replace an existing --to, when it is a previous export (never the run itself or other files)
check = True  # compare the export's logits and greedy tokens with ours before putting it in place
# -----------------------------------------------------------------------------

# GPT-2's split regex: tiktoken's spelling (possessive quantifiers, same pieces) and OpenAI's original
GPT2_PATTERNS = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
                 r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


# ---------------------------------------------------------------------------------------------
# the tokenizer: meta.pkl as byte-level BPE (or characters), for tokenizers' tokenizer.json and GGUF

def vocabulary(meta):
    """meta.pkl's tokenizer (None: GPT-2's) as one dict: kind ('char' | 'gpt2' | 'bpe'), ranks ({token
    bytes: id} of the ordinary tokens), special ({text: id}), pattern (the split regex; None for
    characters), eot (the id that ends a document, or None) and n (the number of ids)."""
    if meta is not None and 'stoi' in meta:
        v = dict(kind='char', ranks={c.encode('utf-8'): i for c, i in meta['stoi'].items()}, special={}, pattern=None,
                 eot=None)
    elif meta is None or meta.get('tokenizer', 'gpt2') == 'gpt2':
        import tiktoken
        enc = tiktoken.get_encoding('gpt2')
        special = {**enc._special_tokens, **(meta or {}).get('special_tokens', {})}  # chat tokens after its 50257
        v = dict(kind='gpt2', ranks=enc._mergeable_ranks, special=special, pattern=enc._pat_str, eot=enc.eot_token)
    elif meta['tokenizer'] == 'bpe':
        special = dict(meta['special_tokens'])
        v = dict(kind='bpe', ranks=dict(meta['mergeable_ranks']), special=special, pattern=meta['pattern'],
                 eot=special.get('<|bos|>'))  # a trained BPE starts (so ends) every document with <|bos|>
    elif meta['tokenizer'] == 'hf':  # a transformers model's own (fine-tuned here): its files go out as they came
        from tokenizers import Tokenizer as Library
        library, ours = Library.from_str(meta['tokenizer_json']), tokenizer_from_meta(meta)
        special = {t.content: i for i, t in library.get_added_tokens_decoder().items()}
        ranks = {ours.token_bytes([i]): i for i in range(ours.n_vocab) if i not in special.values()}
        return dict(kind='hf', ranks=ranks, special=special, pattern=None, eot=ours.eot, n=ours.n_vocab, meta=meta,
                    bos=library.token_to_id(meta.get('bos_token') or ''), stop_ids=meta.get('stop_ids', []),
                    adds_bos=len(library.encode('a').ids) > len(library.encode('a', add_special_tokens=False).ids),
                    chat_template=meta.get('chat_template'))
    else:
        raise ValueError(f"unknown tokenizer '{meta['tokenizer']}' in meta.pkl")
    v['n'] = len(v['ranks']) + len(v['special'])
    if sorted([*v['ranks'].values(), *v['special'].values()]) != list(range(v['n'])):
        raise ValueError(f"the tokenizer's ids are not 0..{v['n'] - 1}, each once")
    v['chat_template'] = CHAT_TEMPLATE if '<|assistant_start|>' in v['special'] else None
    return v


# tokenizer.chat_tokens' rendering as a chat template, for transformers, llama.cpp and vLLM users of an
# exported chat model: a system message opens the next user turn
CHAT_TEMPLATE = ("<|bos|>{% set ns = namespace(system=[]) %}{% for m in messages %}"
                 "{% if m['role'] == 'system' %}{% set ns.system = ns.system + [m['content']] %}"
                 "{% elif m['role'] == 'user' %}<|user_start|>{{ (ns.system + [m['content']]) | join('\\n\\n') }}"
                 "<|user_end|>{% set ns.system = [] %}"
                 "{% else %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant_start|>{% endif %}")


BYTE_CHARS = byte_chars()


def as_text(token):
    return ''.join(BYTE_CHARS[b] for b in token)


def bpe_merges(ranks):
    """The merge list ((left, right) byte pairs, in rank order) that reproduces tiktoken's ranks: a
    token of rank r is the merge of the two parts its own bytes become when BPE runs with the ranks
    below r. For GPT-2 this gives back its merges.txt exactly."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:  # else BPE never builds this token from its pieces: only a whole piece matches it
            merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer(v, merges):
    """A tokenizers.Tokenizer that encodes as ours does: byte-level BPE with tiktoken's rule (a piece
    that is a whole token stays whole, then the lowest-ranked merge first; merges from bpe_merges),
    or one token per character."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    if v['kind'] == 'char':
        tok = Tokenizer(BPE(vocab={t.decode('utf-8'): i for t, i in v['ranks'].items()}, merges=[]))
        tok.decoder = decoders.Fuse()  # characters join without spaces
        return tok
    vocab = {as_text(t): i for t, i in v['ranks'].items()}
    merges = [(as_text(a), as_text(b)) for a, b in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(v['pattern']), behavior='isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = sorted(v['special'], key=v['special'].get)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    for s in special:
        if tok.token_to_id(s) != v['special'][s]:
            raise ValueError(f"special token {s} must come right after the ordinary tokens to keep its id")
    return tok


def write_hf_tokenizer(v, path, block_size):
    if v['kind'] == 'hf':
        with open(os.path.join(path, 'tokenizer.json'), 'w', encoding='utf-8') as f:
            f.write(v['meta']['tokenizer_json'])
        config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': block_size,
                  'clean_up_tokenization_spaces': False, 'chat_template': v['chat_template'],
                  **{k: v['meta'][k] for k in SPECIAL_NAMES if v['meta'].get(k)}}
        with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
            json.dump({k: x for k, x in config.items() if x is not None}, f, indent=2, ensure_ascii=False)
        return
    merges = bpe_merges(v['ranks']) if v['kind'] != 'char' else []
    tok = hf_tokenizer(v, merges)
    tok.save(os.path.join(path, 'tokenizer.json'))
    config = {'tokenizer_class': 'GPT2Tokenizer' if v['kind'] == 'gpt2' else 'PreTrainedTokenizerFast',
              'model_max_length': block_size, 'clean_up_tokenization_spaces': False}
    if v['eot'] is not None:
        eot = next(s for s, i in v['special'].items() if i == v['eot'])
        config.update(bos_token=eot, eos_token=eot, pad_token=eot)
    elif v['kind'] == 'char':
        # lm-eval-harness and transformers' padding need an eos token: a character vocabulary has no special
        # token, so its newline (else its first character) ends a text, keeping every id as it is
        end = b'\n' if b'\n' in v['ranks'] else min(v['ranks'], key=v['ranks'].get)
        config.update(eos_token=end.decode('utf-8'), pad_token=end.decode('utf-8'))
    if v['kind'] == 'gpt2':
        # GPT-2's own files too, for tools that read them (tokenizer.json is what AutoTokenizer loads)
        config.update(add_prefix_space=False, unk_token='<|endoftext|>')
        with open(os.path.join(path, 'vocab.json'), 'w') as f:
            json.dump({**{as_text(t): i for t, i in v['ranks'].items()}, **v['special']}, f, ensure_ascii=False)
        with open(os.path.join(path, 'merges.txt'), 'w', encoding='utf-8') as f:
            f.write('#version: 0.2\n' + ''.join(f"{as_text(a)} {as_text(b)}\n" for a, b in merges))
    if v['chat_template']:
        config['chat_template'] = v['chat_template']
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# writers: into a fresh directory `path` (hf) or file (gguf)

TORCH_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def write_hf(model, v, meta, path, dtype='float32'):
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    config, sd = to_hf(model, v['n'], v['eot'])
    config.dtype = dtype
    config.save_pretrained(path)
    if config.tie_word_embeddings:
        del sd['lm_head.weight']  # the same tensor as the embedding: safetensors stores it once
    save_file({k: t.to(TORCH_DTYPES[dtype]).contiguous() for k, t in sd.items()},
              os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    stop = [v['eot']] + [i for s, i in v['special'].items() if s == '<|assistant_end|>']  # the end of a chat reply
    stop = list(dict.fromkeys(stop + v.get('stop_ids', [])))  # and a transformers model's own
    GenerationConfig(bos_token_id=v.get('bos', v['eot']), eos_token_id=stop if v['eot'] is not None else None,
                     pad_token_id=v['eot']).save_pretrained(path)
    write_hf_tokenizer(v, path, model.config.block_size)
    if meta is not None:  # our own tokenizer, exactly, for --init_from=DIR here
        with open(os.path.join(path, 'meta.pkl'), 'wb') as f:
            pickle.dump(meta, f)


def peft_base_path(checkpoint):
    """The transformers model a LoRA run's adapters go over: its base as train.py recorded it, or for a base
    trained here (an out_dir) that base's own transformers export, <base>-hf."""
    base = checkpoint['lora']['base']
    return base + '-hf' if os.path.isfile(os.path.join(base, 'ckpt.pt')) else base


def write_peft(model, checkpoint, path):
    """A PEFT LoRA adapter directory for the adapters of `model` (loaded with merge=False)."""
    from safetensors.torch import save_file
    adapters = {name: (m.lora_A.detach().float(), m.lora_B.detach().float(), m.lora_scaling)
                for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state, fields = to_peft(hf_arch(model.config), model.config, adapters)
    lora = checkpoint['lora']
    config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=peft_base_path(checkpoint),
                  lora_dropout=lora.get('dropout', 0.0), bias='none', inference_mode=True, use_rslora=False,
                  use_dora=False, init_lora_weights=True, modules_to_save=None, layers_to_transform=None,
                  layers_pattern=None, revision=None, **fields)
    with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    save_file(state, os.path.join(path, 'adapter_model.safetensors'), metadata={'format': 'pt'})


# llama.cpp's names for the split regexes of transformers' byte-level pre-tokenizers it rebuilds in C++
# (llama-vocab.cpp); written by tokenizer.json as a ByteLevel with its regex, or a Split then a ByteLevel without
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r'\p{N}{1,3}', r'\p{N}')


def hf_pre_tokenizer(tokenizer_json):
    """llama.cpp's name ('tokenizer.ggml.pre') for the pre-tokenizer of a byte-level BPE tokenizer.json;
    ValueError for one it does not rebuild."""
    spec = json.loads(tokenizer_json)
    pre, model = spec.get('pre_tokenizer') or {}, spec.get('model') or {}
    steps = pre.get('pretokenizers', [pre]) if pre.get('type') == 'Sequence' else [pre]
    shape = tuple(('Digits' if p.get('individual_digits') else 'digits') if p.get('type') == 'Digits' else
                  ('ByteLevel', p.get('use_regex', True)) if p.get('type') == 'ByteLevel' else
                  (p.get('type'), (p.get('pattern') or {}).get('Regex'), p.get('behavior')) for p in steps)
    known = {(('ByteLevel', True),): 'gpt-2', ('Digits', ('ByteLevel', True)): 'smollm',
             (('Split', LLAMA3_PATTERN, 'Isolated'), ('ByteLevel', False)): 'llama-bpe',
             (('Split', QWEN2_PATTERN, 'Isolated'), ('ByteLevel', False)): 'qwen2'}
    if model.get('type') != 'BPE' or model.get('byte_fallback') or spec.get('normalizer') or shape not in known:
        raise ValueError("--format=gguf: this tokenizer.json is not a byte-level BPE whose text splitting llama.cpp "
                         "rebuilds (GPT-2's, SmolLM's, Llama 3's or Qwen2's): use --format=hf")
    return known[shape]


def gguf_tokenizer(v):
    """(tokens, types, merges as 'left right' lines, llama.cpp's pre-tokenizer name) of the tokenizer v:
    byte-level BPE for all of ours (characters are byte-level tokens too, multi-byte ones merged from
    their bytes); a transformers model's tokenizer.json as it is."""
    import gguf
    if v['kind'] == 'hf':
        spec = json.loads(v['meta']['tokenizer_json'])
        pre, merges = hf_pre_tokenizer(v['meta']['tokenizer_json']), spec['model']['merges']
        merges = [m if isinstance(m, str) else ' '.join(m) for m in merges]
        tokens, types = [''] * v['n'], [gguf.TokenType.NORMAL] * v['n']
        for piece, i in spec['model']['vocab'].items():
            tokens[i] = piece
        for t in spec.get('added_tokens', []):
            tokens[t['id']] = t['content']
            types[t['id']] = gguf.TokenType.CONTROL if t['special'] else gguf.TokenType.USER_DEFINED
        return tokens, types, merges, pre
    if v['kind'] == 'char':
        pre = 'gpt-2'  # no merge crosses a character, so any split that keeps characters whole will do
        chars = [t for t in v['ranks'] if len(t) > 1]
        merges = list(dict.fromkeys((c[:j], c[j:j + 1]) for c in chars for j in range(1, len(c))))
        # llama.cpp refuses a BPE vocabulary without merges (and gguf drops an empty list): an ASCII
        # vocabulary gets one that never applies, 0xFF twice, a byte that UTF-8 text never holds
        merges = merges or [(b'\xff', b'\xff')]
    elif v['pattern'] in GPT2_PATTERNS:
        pre, merges = 'gpt-2', bpe_merges(v['ranks'])
    elif v['pattern'] == SPLIT_PATTERN:
        pre, merges = 'qwen2', bpe_merges(v['ranks'])  # the same pieces as Qwen2's regex (tests/test_llama.py)
    else:
        raise ValueError("--format=gguf: llama.cpp splits text with its own built-in regexes and has none for this "
                         "tokenizer's split pattern (GPT-2's and tokenizer.py's SPLIT_PATTERN are supported): use "
                         "--format=hf")
    tokens, types = [''] * v['n'], [gguf.TokenType.NORMAL] * v['n']
    for t, i in v['ranks'].items():
        tokens[i] = as_text(t)
    for s, i in v['special'].items():
        tokens[i], types[i] = s, gguf.TokenType.CONTROL
    return tokens, types, [f"{as_text(a)} {as_text(b)}" for a, b in merges], pre


GGUF_FILE_TYPES = {'float32': 'ALL_F32', 'float16': 'MOSTLY_F16', 'q8_0': 'MOSTLY_Q8_0', 'q4_0': 'MOSTLY_Q4_0'}


def write_gguf(model, v, path, dtype='float32', name=''):
    """llama.cpp's 'gpt2' architecture (learned positions), or its 'llama' architecture (rotary positions),
    its tensor names and hyperparameters, the tokenizer (gguf_tokenizer) and its chat template. llama.cpp's
    GPT-2 computes GELU with the tanh approximation, ours the exact one unless the model came from GPT-2's
    weights: the logits differ by about 1e-3, the greedy tokens rarely."""
    import gguf
    cfg = model.config
    arch = gguf_arch(cfg).removeprefix('gguf-')
    tokens, types, merges, pre = gguf_tokenizer(v)
    n, hd = v['n'], cfg.n_embd // cfg.n_head
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    if arch == 'gpt2':
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(n)
    w.add_file_type(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[dtype]))
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = v.get('bos', v['eot'])
    if bos is not None:
        w.add_bos_token_id(bos)
    if v['eot'] is not None:
        w.add_eos_token_id(v['eot'])
    if '<|assistant_end|>' in v['special']:  # the end of a chat reply: llama.cpp stops there too
        w.add_eot_token_id(v['special']['<|assistant_end|>'])
    w.add_add_bos_token(bool(v.get('adds_bos')))  # ours start with their first token; Llama 3's with a BOS
    if v.get('chat_template'):
        w.add_chat_template(v['chat_template'])

    # llama.cpp's names for our tensors (hf.py's table); its matrices are (out, in) like Linear's
    sd = {k: t.detach().float() for k, t in model.state_dict().items()}
    sd['transformer.wte.weight'], sd['lm_head.weight'] = sd['transformer.wte.weight'][:n], sd['lm_head.weight'][:n]
    tensors = to_theirs('gguf-' + arch, cfg, with_biases(sd) if arch == 'gpt2' else sd)
    for key, t in tensors.items():
        # float16 or quantized for the matrices only, as llama.cpp's converter does: norms and biases stay float32;
        # q8_0 and q4_0 pack blocks of 32 along a row, and the position table (a lookup, not a matmul) stays float32.
        # With q4_0 the output layer (the embedding, when tied) is q8_0: llama.cpp's own quantizer keeps it finer too
        if dtype in ('q8_0', 'q4_0') and t.dim() == 2 and t.shape[1] % 32 == 0 and key != 'position_embd.weight':
            head = 'token_embd.weight' if cfg.tie_embeddings else 'output.weight'
            kind = 'Q8_0' if dtype == 'q8_0' or key == head else 'Q4_0'
            quant = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(key, gguf.quants.quantize(t.contiguous().numpy(), quant), raw_dtype=quant)
            continue
        t = t.to(torch.float16 if dtype == 'float16' and t.dim() == 2 else torch.float32)
        w.add_tensor(key, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------
# checks: the export against our model, on the same prompt

SAMPLE = ("Hello, world! It's 1,234.5 degrees -- naïve café, Ünïcödé, 日本語のテキスト, emoji 🤖🎉\n\n"
          "\tindented   spaces  \r\nTHE END. ")


def ours_greedy(model, prompt, max_new_tokens, n):
    """Our greedy continuation through the decode engine, sampling only the tokenizer's n ids."""
    engine = Engine(model, 1, max_new_tokens, vocab_size=n)
    row = Row(prompt, max_new_tokens, top_k=1)
    engine.add([row])
    while engine.rows:
        engine.step()
    return row.tokens


def hf_runner(path, adapter=None):
    """(logits over a list of ids, greedy continuation of a prompt, encode text) through transformers,
    from the exported directory (adapter: a PEFT adapter directory over it, through peft). Greedy is plain
    argmax over a full forward per token: generate() would stop at an end-of-text token, and the cache's
    argument name changes between versions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel
        hf = PeftModel.from_pretrained(hf, adapter).eval()

    def greedy(prompt, n):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        return ids[len(prompt):]
    return lambda ids: hf(torch.tensor([ids])).logits[0], greedy, lambda text: tok(text, verbose=False)['input_ids']


def llama_cpp_runner(path, n_ctx):
    """The same through llama.cpp (llama-cpp-python); None where it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np
    llm = Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=min(4, os.cpu_count() or 1))

    def logits(ids):
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)]))

    def greedy(prompt, n):
        llm.reset()
        llm.eval(prompt)
        ids = []
        for _ in range(n):
            ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(ids[-1:])
        return ids
    return logits, greedy, lambda text: llm.tokenize(text.encode('utf-8'), add_bos=False, special=False)


@torch.no_grad()
def compare(what, model, v, runner, tokenizer=None):
    """Print and return (relative logit difference, greedy tokens all identical, tokenizer ids identical
    or None): the export's logits over a fixed prompt against ours, its greedy continuation against
    our engine's, and its tokenizer against ours on SAMPLE."""
    logits_of, greedy, encode = runner
    g = torch.Generator().manual_seed(0)
    ordinary = sorted(v['ranks'].values())  # the prompt holds no special tokens
    length = min(24, model.config.block_size // 2)
    prompt = [ordinary[i] for i in torch.randint(len(ordinary), (length,), generator=g).tolist()]
    new = min(32, model.config.block_size - length)
    idx = torch.tensor([prompt])
    ours = model(idx, targets=torch.zeros_like(idx))[0][0, :, :v['n']]
    err = ((ours - logits_of(prompt)).abs().max() / ours.abs().max()).item()
    mine, theirs = ours_greedy(model, prompt, new, v['n']), greedy(prompt, new)
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), new)
    line = f"{what}: logits within {err:.1e} (relative) of ours; greedy tokens: {same} of {new} identical"
    ids_same = None
    if tokenizer is not None:
        text = ''.join(c for c in SAMPLE if c.encode('utf-8') in v['ranks']) if v['kind'] == 'char' else SAMPLE
        ids_same = encode(text) == tokenizer.encode(text)
        line += f"; tokenizer: {'the same' if ids_same else 'DIFFERENT'} ids on a {len(text)}-character sample"
    print(line)
    return err, same == new, ids_same


# ---------------------------------------------------------------------------------------------

def check_peft(model, v, path, base, tokenizer):
    """peft's logits with the adapter over its base against ours, where peft and the base are here."""
    try:
        import peft  # noqa: F401  (a test dependency: the export itself needs only safetensors)
    except ImportError:
        print("peft is not installed: the adapter is not checked against peft")
        return
    if not os.path.isdir(base):
        print(f"{base} is not a local transformers directory: the adapter is not checked against peft")
        return
    err, same, _ = compare('peft', model, v, hf_runner(base, adapter=path), None)
    if err > 1e-4 or not same:
        fail("the adapter over its base does not compute what our model does; nothing written")


def check_target(dest):
    """Refuse a --to that is the model's own out_dir or a folder around it, and with --overwrite anything but
    a previous export (a transformers directory of its files only, or a GGUF file): nothing else is ever replaced."""
    source, target = os.path.realpath(out_dir), os.path.realpath(dest)
    if os.path.commonpath([source, target]) == target:
        fail(f"--to={dest} holds the model being exported ({out_dir}): choose another --to")
    if not os.path.lexists(dest):
        return
    if not overwrite:
        fail(f"{dest} exists: remove it, choose another --to, or --overwrite=True")
    if format in ('hf', 'peft'):
        names = os.listdir(dest) if os.path.isdir(dest) and not os.path.islink(dest) else None
        marker = 'config.json' if format == 'hf' else 'adapter_config.json'
        previous = names is not None and marker in names and all(
            re.fullmatch(r'[\w.-]+\.(json|safetensors|txt|pkl|jinja|model)', n) and os.path.isfile(os.path.join(dest, n))
            for n in names)
    else:
        previous = False
        if os.path.isfile(dest) and not os.path.islink(dest):
            with open(dest, 'rb') as f:
                previous = f.read(4) == b'GGUF'
    if not previous:
        fail(f"{dest} is not a previous {dict(hf='transformers', peft='PEFT', gguf='GGUF')[format]} export: --overwrite replaces only "
             f"those; remove it yourself or choose another --to")


def main():
    if format not in ('hf', 'gguf', 'peft'):
        fail(f"format must be 'hf', 'gguf' or 'peft', not '{format}'")
    if dtype not in (GGUF_FILE_TYPES if format == 'gguf' else TORCH_DTYPES if format == 'hf' else ('float32',)):
        fail(f"dtype must be float32{', float16 or bfloat16' if format == 'hf' else ', float16, q8_0 or q4_0'}, "
             f"not '{dtype}'" if format != 'peft' else f"--format=peft writes float32, not '{dtype}'")
    try:
        model, checkpoint = load_checkpoint(out_dir, merge=format != 'peft')  # hf, gguf: the adapters merged in
        if format == 'peft' and 'lora' not in checkpoint:
            raise ValueError(f"--format=peft writes a LoRA run's adapters: {out_dir} holds a whole model (train.py "
                             f"--lora_rank=N trains adapters)")
        meta_path = meta_path_for(out_dir, (checkpoint.get('config') or {}).get('dataset'))
        meta = read_meta(meta_path) if meta_path else None
        v = vocabulary(meta)
        try:  # ours, to check the exported tokenizer against
            tokenizer = tokenizer_from_meta(meta) if meta is not None else gpt2_tokenizer()
        except ValueError:  # a kind this tokenizer.py does not read: the export is not compared with it
            tokenizer = None
        if format in ('hf', 'peft'):
            hf_arch(model.config)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        fail(str(e))
    model.eval()
    if not v['n'] <= model.config.vocab_size <= -(-v['n'] // 128) * 128:  # at most padding beyond the tokenizer's ids
        fail(f"the tokenizer ({v['kind']}, {v['n']} ids) does not fit the model's vocabulary of "
             f"{model.config.vocab_size}: is meta.pkl missing from the out_dir, or from another dataset?")
    dest = to or os.path.normpath(out_dir) + {'hf': '-hf', 'gguf': '.gguf', 'peft': '-peft'}[format]
    check_target(dest)

    # everything goes into a temporary path beside dest, renamed into place once written and checked
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        if format == 'hf':
            os.makedirs(tmp)
            write_hf(model, v, meta, tmp, dtype)
        elif format == 'peft':
            os.makedirs(tmp)
            write_peft(model, checkpoint, tmp)
            model = merge_lora(copy.deepcopy(model))  # what the check compares with
        else:
            try:
                import gguf  # noqa: F401  (llama.cpp's own writer, needed for this format only)
            except ImportError:
                fail("--format=gguf needs the gguf package: pip install gguf")
            write_gguf(model, v, tmp, dtype, name=os.path.basename(os.path.normpath(out_dir)))
        if check and format == 'peft':
            check_peft(model, v, tmp, peft_base_path(checkpoint), tokenizer)
        elif check and format == 'hf':
            err, same, ids_same = compare('transformers', model, v, hf_runner(tmp), tokenizer)
            if dtype == 'float32' and (err > 1e-4 or not same or ids_same is False):
                fail("the export does not compute what our model and tokenizer do; nothing written")
        elif check:
            runner = llama_cpp_runner(tmp, model.config.block_size)
            if runner is None:
                print("llama-cpp-python is not installed: the GGUF file is not checked against llama.cpp")
            else:
                compare('llama.cpp', model, v, runner, tokenizer)
        if os.path.exists(dest):  # --overwrite: the old export goes only once the new one is whole
            old = f"{dest}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        else:
            os.replace(tmp, dest)
    except (ValueError, OSError) as e:
        fail(str(e))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)
    what = (f"{HF_CLASSES[hf_arch(model.config)]} directory" if format == 'hf' else 'GGUF file' if format == 'gguf' else
            f"PEFT LoRA adapter over {peft_base_path(checkpoint)}")
    print(f"wrote {dest}: {what}, {dtype}, vocabulary of {v['n']} ({v['kind']})")


if __name__ == '__main__':
    configure(globals())
    main()
