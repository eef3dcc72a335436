"""
The Llama architecture in and out: a random tiny LlamaForCausalLM saved by transformers (GQA, tied
and untied, rope_theta != 10000) loads with transformers' logits and greedy tokens; its tokenizer.json
(built here with the tokenizers library, byte-level as SmolLM2's and SentencePiece-style as Llama 2's)
encodes as transformers' does, its chat template renders as apply_chat_template does; a model built
with the Llama switches exports to LlamaForCausalLM and to llama.cpp's llama GGUF (our own BPE
included); the chat fine-tune of a Llama directory runs end to end; nanoGPT's model.generate works.
"""
import json
import pickle
import random
import re

import numpy as np
import pytest
import torch

from conftest import GPT2_BPE, REPO, SHAKESPEARE, run_script
import export
from checkpoint import load_checkpoint
from model import GPT, GPTConfig
from tokenizer import (chat_tokens, gpt2_tokenizer, load_tokenizer, pretrained_dir, render_chat, same_tokenizer,
                       tokenizer_from_meta, train_bpe)

MIXED = ("Hello, world! It's 1,234.5 -- naïve café; DON'T stop.\n\n\tÜnïcödé: 日本語のテキスト, привет, 🤖🎉 "
         "x  \r\n  trailing   <|im_start|> <s> ")
# ChatML as SmolLM2's template writes it (a default system prompt when there is none), in our own words
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-3-like: bos_token, a namespace, trim, loop controls and raise_exception
HEADERS = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}"
           "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
           "{% if m['role'] == 'system' and m['content'] == 'SKIP' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
           "<|start|>{{ m['role'] }}<|sep|>\n\n{{ m['content'] | trim }}<|eot|>{% endfor %}"
           "{% if add_generation_prompt %}<|start|>assistant<|sep|>\n\n{% endif %}")


def corpus():
    return SHAKESPEARE.read_text()[:40000] if SHAKESPEARE.exists() else MIXED * 200


def byte_level_tokenizer(specials):
    """SmolLM2's kind: digits split one by one, then GPT-2's byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus()], trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sentencepiece_tokenizer():
    """Llama 2's and TinyLlama's kind: ▁ for a space (one prepended), <0x..> byte tokens for what the
    vocabulary lacks, a BOS added to every encoding."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
    base.train_from_iterator([corpus()], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(base.to_str())['model']
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'<0x{b:02X}>': 3 + b for b in range(256)}}
    for piece in sorted(learned['vocab'], key=learned['vocab'].get):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(' '))
                                                    for m in learned['merges']], byte_fallback=True, unk_token='<unk>'))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(' ', 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ('<unk>', '<s>', '</s>')])
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    return tok


def save_llama(path, tok, template, eos, bos, tied=True, **config):
    from transformers import LlamaConfig, LlamaForCausalLM
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / 'tokenizer.json'))
    (path / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': eos, 'bos_token': bos, 'chat_template': template}))
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, rope_theta=500.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=tied, eos_token_id=tok.token_to_id(eos),
                                bos_token_id=tok.token_to_id(bos)), **config})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norm gains far from 1, so a wrongly placed one shows
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope='module')
def llamas(tmp_path_factory):
    """A SmolLM2-like directory (byte-level BPE, ChatML, tied head) and a Llama-2-like one
    (SentencePiece-style tokenizer, another template, untied head)."""
    root = tmp_path_factory.mktemp('llama')
    tok = byte_level_tokenizer(['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
    smol = save_llama(root / 'smol', tok, CHATML, eos='<|im_end|>', bos='<|endoftext|>', tied=True)
    sp = sentencepiece_tokenizer()
    sp.add_special_tokens(['<|start|>', '<|sep|>', '<|eot|>'])
    llama2 = save_llama(root / 'llama2', sp, HEADERS, eos='<|eot|>', bos='<s>', tied=False)
    return {'smol': (root / 'smol', smol), 'llama2': (root / 'llama2', llama2)}


# ---------------------------------------------------------------------------------------------
# in: weights, tokenizer, chat template

@pytest.mark.parametrize('name', ['smol', 'llama2'])
def test_llama_loads_with_transformers_logits_and_greedy_tokens(llamas, name, one_thread):
    path, hf = llamas[name]
    ours = GPT.from_pretrained(str(path)).eval()
    cfg = ours.config
    assert (cfg.use_rope, cfg.norm, cfg.mlp, cfg.bias, cfg.n_kv_head, cfg.rope_theta, cfg.rms_norm_eps,
            cfg.intermediate_size, cfg.tie_embeddings) == (True, 'rmsnorm', 'swiglu', False, 2, 500.0, 1e-5, 96,
                                                           name == 'smol')
    idx = torch.randint(hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx, targets=idx)[0]
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
        theirs = idx[0, :8].tolist()  # transformers' greedy tokens, past any end-of-text token
        for _ in range(40):
            theirs.append(int(hf(torch.tensor([theirs])).logits[0, -1].argmax()))
    assert theirs[8:] == export.ours_greedy(ours, idx[0, :8].tolist(), 40, hf.config.vocab_size)
    assert ours.generate(idx[:1, :8], 40, top_k=1)[0].tolist() == theirs  # nanoGPT's call, greedy


@pytest.mark.parametrize('name', ['smol', 'llama2'])
def test_tokenizer_json_encodes_as_transformers(llamas, name):
    from transformers import AutoTokenizer
    path, _ = llamas[name]
    hf, ours = AutoTokenizer.from_pretrained(path), load_tokenizer(str(path))
    assert ours.name == 'hf' and ours.n_vocab == len(hf)
    rng = random.Random(0)
    alphabet = list(" \n\t\r.,'!?-0123456789aeiouxyzAEZéüß日本語🤖\u200b\u0301") + ["'s", "  ", "\r\n", "<s>", "<|im_end|>"]
    for text in [MIXED, corpus()[5000:7000], ' ', '\n\n', '12345 3.14'] + [
            ''.join(rng.choice(alphabet) for _ in range(rng.randrange(1, 50))) for _ in range(300)]:
        ids = ours.encode(text)  # text that spells a special token stays text
        assert ids == hf.encode(text, add_special_tokens=False, split_special_tokens=True), repr(text)
        assert ours.encode_prompt(text) == hf(text)['input_ids'], repr(text)  # a prompt as transformers encodes it
        if name == 'smol':  # byte-level: exact bytes, so a stream joins characters split across tokens
            assert ours.decode(ids) == text and ours.token_bytes(ids) == text.encode()
        else:  # the ▁ its normalizer puts in front stays a space (transformers' decoder strips it)
            assert ours.decode(ids) == ' ' + text
    assert ours.eot == hf.eos_token_id and ours.special_tokens[hf.eos_token] == hf.eos_token_id


@pytest.mark.parametrize('name', ['smol', 'llama2'])
def test_chat_template_renders_as_apply_chat_template(llamas, name):
    from transformers import AutoTokenizer
    path, _ = llamas[name]
    hf, ours = AutoTokenizer.from_pretrained(path), load_tokenizer(str(path))
    rng = random.Random(1)
    words = ['Hi', 'there', '12 + 30', 'ünï 日本', '\n', '  ', '<|im_end|>', '<|eot|>', 'ok?']
    end = '<|im_end|>\n' if name == 'smol' else '<|eot|>'
    for _ in range(60):  # random conversations: an optional system message, then turns
        messages = ([('system', rng.choice(['Be kind.', 'SKIP']))] if rng.random() < 0.4 else []) + [
            (role, ' '.join(rng.choice(words) for _ in range(rng.randrange(1, 6))))
            for _ in range(rng.randrange(1, 4)) for role in ('user', 'assistant')]
        as_dicts = [{'role': r, 'content': c} for r, c in messages]
        prompt, stop = render_chat(ours, messages[:-1])
        assert stop == [] and prompt == list(hf.apply_chat_template(as_dicts[:-1], add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False))
        ids, mask = chat_tokens(ours, messages)
        assert ids == list(hf.apply_chat_template(as_dicts, tokenize=True, return_dict=False))
        # the loss counts exactly the replies and the template's end of each (a SentencePiece-style
        # tokenizer puts a ▁ before each piece between special tokens: compared without spaces)
        got = ours.decode([i for i, m in zip(ids, mask) if m])
        want = ''.join(c + end for r, c in messages if r == 'assistant')
        assert got == want if name == 'smol' else ''.join(got.split()) == ''.join(want.split())
    if name == 'llama2':
        with pytest.raises(ValueError, match='refuses this conversation: bad role'):
            ours.chat_template.prompt([('tool', 'x')])


def test_what_the_loader_cannot_compute_is_one_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    small = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=32)
    cases = {'rope_type \'linear\'': LlamaConfig(**small, rope_scaling={'rope_type': 'linear', 'factor': 2.0}),
             'attention_bias': LlamaConfig(**small, attention_bias=True), 'mlp_bias': LlamaConfig(**small, mlp_bias=True),
             "activation 'gelu'": LlamaConfig(**small, hidden_act='gelu'),
             "'mistral' model": MistralConfig(**small, sliding_window=16)}
    for i, (message, cfg) in enumerate(cases.items()):
        (MistralForCausalLM if cfg.model_type == 'mistral' else LlamaForCausalLM)(cfg).save_pretrained(tmp_path / str(i))
        with pytest.raises(ValueError, match=re.escape(message)):
            GPT.from_pretrained(str(tmp_path / str(i)))


# ---------------------------------------------------------------------------------------------
# out: LlamaForCausalLM and llama.cpp's llama GGUF

def llama_model(vocab_size, **switches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=vocab_size,
                                    use_rope=True, norm='rmsnorm', mlp='swiglu', bias=False), **switches}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize('switches', [dict(n_kv_head=2, rope_theta=500.0, tie_embeddings=False),
                                      dict(n_kv_head=1, intermediate_size=80, rms_norm_eps=1e-5)],
                         ids=['gqa-untied', 'mqa-tied-width80'])
def test_llama_switches_export_to_llama_for_causal_lm(tmp_path, switches, one_thread):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    chars = [chr(48 + i) for i in range(70)]
    meta = {'vocab_size': 70, 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}
    model = llama_model(70, **switches)
    export.write_hf(model, export.vocabulary(meta), meta, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == 'LlamaForCausalLM' and hf.config.num_key_value_heads == model.config.n_kv_head
    with safe_open(tmp_path / 'model.safetensors', 'pt') as f:  # exactly the class's weights, none left to init
        assert set(f.keys()) == set(hf.state_dict()) - ({'lm_head.weight'} if hf.config.tie_word_embeddings else set())
    back = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(70, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx, targets=idx)[0]
        assert ((hf(idx).logits - ref).abs().max() / ref.abs().max()).item() <= 1e-4
        assert torch.equal(back(idx, targets=idx)[0], ref)  # the round trip computes the same numbers
        out = hf.generate(idx[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=32,
                          do_sample=False)
    assert out[0, 8:].tolist() == export.ours_greedy(model, idx[0, :8].tolist(), 32, 70)
    assert {k: getattr(back.config, k) for k in switches} == switches


def test_our_bpe_and_chat_template_export_to_llama(tmp_path, one_thread):
    """A chat model's rustbpe tokenizer (GPT-4-style split, single digits) goes out with a chat template
    that renders as render_chat; llama.cpp (its 'qwen2' pre-tokenizer splits as SPLIT_PATTERN does)
    tokenizes as we do and decodes the same greedy tokens at f32 and f16, and at q8_0 and q4_0 within the
    tolerance docs/llama.md quotes."""
    from transformers import AutoTokenizer
    meta = train_bpe([corpus(), MIXED], 600)
    ours = tokenizer_from_meta(meta)
    model = llama_model(meta['vocab_size'], n_kv_head=2, tie_embeddings=False, rope_theta=2000.0)
    v = export.vocabulary(meta)
    export.write_hf(model, v, meta, tmp_path / 'hf')
    tok = AutoTokenizer.from_pretrained(tmp_path / 'hf')
    messages = [('system', 'Be brief.'), ('user', 'Hi 12+3?'), ('assistant', 'It is 15.'), ('user', 'And\n2?')]
    assert list(tok.apply_chat_template([{'role': r, 'content': c} for r, c in messages], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) == render_chat(ours, messages)[0]
    llama_cpp = pytest.importorskip('llama_cpp')
    rng = np.random.default_rng(0)
    alphabet = list(" \n\t\r.,'!?-0123456789aeiouxyzAEZéüß日本語🤖\u0301½١") + ["'s", "'LL", "  ", "\r\n", " \n"]
    texts = [MIXED, corpus()[5000:8000]] + [''.join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(500)]
    prompt = ours.encode(corpus()[9000:9100])[:16]
    want = export.ours_greedy(model, prompt, 32, v['n'])
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), targets=torch.tensor([prompt]))[0][0]
    same, err = {}, {}
    for dtype in ('float32', 'float16', 'q8_0', 'q4_0'):
        path = str(tmp_path / f'{dtype}.gguf')
        export.write_gguf(model, v, path, dtype)
        logits, greedy, encode = export.llama_cpp_runner(path, 64)
        if dtype == 'float32':
            assert all(encode(t) == ours.encode(t) for t in texts)
        same[dtype] = next((i for i, (a, b) in enumerate(zip(greedy(prompt, 32), want)) if a != b), 32)
        err[dtype] = ((logits(prompt) - ref).abs().max() / ref.abs().max()).item()
    print(same, err)
    assert same['float32'] == same['float16'] == 32 and err['float32'] < 1e-3 and err['float16'] < 3e-3, (same, err)
    assert err['q8_0'] < 2e-2 and err['q4_0'] < 0.15, err  # docs/llama.md's tolerance for the quantized files


# ---------------------------------------------------------------------------------------------
# the scripts: chat fine-tuning a Llama directory in its own template, and back out

def test_chat_finetune_of_a_llama_directory(llamas, tmp_path):
    path, _ = llamas['smol']
    data = tmp_path / 'data' / 'chat_smollm2'  # the dataset config/finetune_smollm2.py trains on
    run_script(REPO / 'data' / 'chat' / 'prepare.py', '--task=arith', '--n_train=60', '--n_val=4',
               f'--template_from={path}', f'--out_dir={data}', cwd=tmp_path)
    mask = np.fromfile(data / 'train_mask.bin', dtype=np.uint8)
    assert (mask == 2).sum() == 60 and mask[0] == 2  # each conversation's first token: a window may start there
    train = ['--device=cpu', '--compile=False', '--dtype=float32', '--batch_size=2', '--block_size=64', '--eval_iters=1',
             '--log_interval=1', '--gradient_accumulation_steps=1', '--dataset=chat_smollm2']
    proc = run_script(REPO / 'train.py', *train, f'--init_from={path}', '--out_dir=out-ft', '--max_iters=2',
                      '--eval_interval=2', cwd=tmp_path, env={'OMP_NUM_THREADS': '1'})
    assert 'step 2:' in proc.stdout
    args = torch.load(tmp_path / 'out-ft' / 'ckpt.pt', weights_only=True)['model_args']
    assert args['mlp'] == 'swiglu' and args['block_size'] == 256  # a rotary model keeps its context
    # the config a user with internet runs: it names the hub model, which cannot be downloaded here; with
    # this directory instead and data of another tokenizer, train.py refuses in one line
    config = {}
    exec((REPO / 'config' / 'finetune_smollm2.py').read_text(), config)
    with pytest.raises(ValueError, match='HuggingFaceTB/SmolLM2-135M-Instruct is not a local directory, and cannot be'):
        pretrained_dir(config['init_from'])
    chars = tmp_path / 'data' / 'chars'
    chars.mkdir()
    with open(chars / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 3, 'itos': dict(enumerate('abc')), 'stoi': {c: i for i, c in enumerate('abc')}}, f)
    for split in ('train', 'val'):
        (np.arange(300, dtype=np.uint16) % 3).tofile(chars / f'{split}.bin')
    proc = run_script(REPO / 'train.py', REPO / 'config' / 'finetune_smollm2.py', f'--init_from={path}',
                      '--dataset=chars', '--device=cpu', '--compile=False', '--dtype=float32', '--block_size=32',
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1 and 'has another tokenizer than data/chars' in proc.stderr
    assert 'Traceback' not in proc.stderr
    # a chat as sample.py --chat, serve.py and chat_eval.py run it: the model's template, and its end of turn stops it
    from textgen import generate_text, load_model
    model, tok, _ = load_model('resume', str(tmp_path / 'out-ft'))
    prompt, stop = render_chat(tok, [('user', 'What is 2 + 3?')])
    assert tok.decode(prompt).endswith('<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n')
    greedy = export.ours_greedy(model, prompt, 8, tok.n_vocab)
    reply = ''.join(piece for _, piece in generate_text(model, tok, [prompt], 8, stop=stop, temperature=0))
    assert reply == tok.decode(greedy).split('<|im_end|>')[0]
    # and out again, with its tokenizer and template, as export.py writes and checks it
    meta = pickle.loads((tmp_path / 'out-ft' / 'meta.pkl').read_bytes())
    model, _ = load_checkpoint(str(tmp_path / 'out-ft'))
    v = export.vocabulary(meta)
    export.write_hf(model.eval(), v, meta, tmp_path / 'hf-ft')
    err, same, ids_same = export.compare('transformers', model, v, export.hf_runner(str(tmp_path / 'hf-ft')), tok)
    assert err <= 1e-4 and same and ids_same
    assert json.loads((tmp_path / 'hf-ft' / 'tokenizer_config.json').read_text())['chat_template'] == CHATML
    # and to llama.cpp: its tokenizer.json's split (SmolLM's: digits, then GPT-2's) is llama.cpp's 'smollm'
    export.write_gguf(model, v, str(tmp_path / 'ft.gguf'))
    runner = export.llama_cpp_runner(str(tmp_path / 'ft.gguf'), 64)
    if runner is not None:
        err, same, ids_same = export.compare('llama.cpp', model, v, runner, tok)
        assert err <= 1e-3 and same and ids_same


def test_same_tokenizer(llamas):
    """What train.py checks before fine-tuning a directory's model on a dataset."""
    smol, llama2 = (load_tokenizer(str(llamas[name][0])) for name in ('smol', 'llama2'))
    chars = sorted(set(corpus()))
    char = tokenizer_from_meta({'itos': dict(enumerate(chars)), 'stoi': {c: i for i, c in enumerate(chars)}})
    assert same_tokenizer(smol, load_tokenizer(str(llamas['smol'][0]))) and not same_tokenizer(smol, llama2)
    assert not same_tokenizer(smol, char) and not same_tokenizer(char, smol) and same_tokenizer(char, char)
    if GPT2_BPE.exists():  # GPT-2's BPE through tiktoken and through its tokenizer.json are the same tokenizer
        from transformers import GPT2TokenizerFast
        path = llamas['smol'][0].parent / 'gpt2'
        GPT2TokenizerFast(vocab=str(GPT2_BPE / 'encoder.json'), merges=str(GPT2_BPE / 'vocab.bpe')).save_pretrained(path)
        assert same_tokenizer(load_tokenizer(str(path)), gpt2_tokenizer())


# ---------------------------------------------------------------------------------------------
# nanoGPT's model.generate

def test_nanogpt_generate(one_thread):
    """As nanoGPT's sample.py calls it: (B, T) in, (B, T + n) out, the prompt kept; torch.manual_seed repeats
    it; greedy is nanoGPT's loop (argmax over the last block_size tokens) token for token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()
    x = torch.randint(50, (2, 5))
    torch.manual_seed(1337)
    y = model.generate(x, 30, temperature=0.8, top_k=10)
    torch.manual_seed(1337)
    again = model.generate(x, 30, temperature=0.8, top_k=10)
    assert y.shape == (2, 35) and torch.equal(y[:, :5], x) and torch.equal(again, y)
    idx = x.clone()
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(idx[:, -16:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(x, 30, top_k=1), idx) and torch.equal(model.generate(x, 0), x)


# ---------------------------------------------------------------------------------------------
# hostile directories: what a downloaded model can hold is refused in one line, nothing allocated

def test_hostile_llama_directories(llamas, tmp_path):
    import shutil
    import time
    src, theirs = llamas['smol']

    def variant(name, edit_config=None, files=None):
        path = tmp_path / name
        shutil.copytree(src, path)
        if edit_config:
            config = json.loads((path / 'config.json').read_text())
            edit_config(config)
            (path / 'config.json').write_text(json.dumps(config))
        for file, text in (files or {}).items():
            (path / file).write_text(text)
        return path

    # a config.json that claims a huge model: refused from the config and the files' sizes, before allocation
    huge = variant('huge', lambda c: c.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=96,
                                              num_attention_heads=512, num_key_value_heads=512, head_dim=128))
    start = time.time()
    with pytest.raises(ValueError, match=r'describes [\d,.]+M parameters, more than its weight files'):
        GPT.from_pretrained(str(huge))
    assert time.time() - start < 30
    odd = variant('odd', lambda c: c.update(num_attention_heads=5, num_key_value_heads=5, head_dim=None))
    with pytest.raises(ValueError, match='config.json is not one transformers reads.*not a multiple'):
        GPT.from_pretrained(str(odd))
    (odd / 'config.json').write_text('{"model_type": "llama", "hidden_size": ')
    with pytest.raises(OSError, match='not a valid JSON'):  # what scripts print in one line, as a missing one
        GPT.from_pretrained(str(odd))
    for rope in ({'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                  'original_max_position_embeddings': 64}, {'rope_type': 'yarn', 'factor': 4.0}):
        scaled = variant(f"rope-{rope['rope_type']}", lambda c: c.update(rope_scaling=rope))
        with pytest.raises(ValueError, match=f"rope_type '{rope['rope_type']}'"):
            GPT.from_pretrained(str(scaled))
    # fields this GPT has no use for are ignored, as transformers ignores them
    extra = variant('extra', lambda c: c.update(some_future_field={'a': 1}, pretraining_tp=1))
    idx = torch.randint(0, theirs.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(GPT.from_pretrained(str(extra)).eval()(idx, idx)[0], theirs(idx).logits, atol=1e-4)
    # a corrupted or truncated tokenizer.json
    text = (src / 'tokenizer.json').read_text()
    for name, broken in (('truncated', text[:len(text) // 2]), ('garbage', '\x00\x01 not json'),
                         ('wrong-shape', json.dumps({'model': {'type': 'BPE', 'vocab': 5}}))):
        with pytest.raises(ValueError, match='tokenizer') as e:
            load_tokenizer(str(variant(f'tok-{name}', files={'tokenizer.json': broken})))
        assert '\n' not in str(e.value)
    # templates that raise, loop or build without end: one line each, in well under a second
    messages = [('user', 'hi'), ('assistant', 'hello')]
    for template, says in (("{{ 1 / 0 }}", 'ZeroDivisionError'),
                           ("{{ raise_exception('no tools here') }}", 'refuses this conversation: no tools here'),
                           ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            'loops more than'),
                           ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                            'loops more than'),
                           ("{{ 'x' * 10000000000 }}", 'too long'), ("{{ 2 ** 100000000 }}", 'power too large'),
                           ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", 'RecursionError'),
                           ("{% for m in messages %", 'cannot read the chat template')):
        config = json.loads((src / 'tokenizer_config.json').read_text())
        path = variant(f'tpl-{len(says)}-{abs(hash(template))}',
                       files={'tokenizer_config.json': json.dumps({**config, 'chat_template': template})})
        start = time.time()
        with pytest.raises(ValueError, match=says) as e:
            render_chat(load_tokenizer(str(path)), messages)
        assert '\n' not in str(e.value) and len(str(e.value)) < 400 and time.time() - start < 10, (template, e.value)


def test_random_templates_render_or_refuse_in_one_line():
    """Seeded random chat templates pieced from what a downloaded one may hold (loops over range() and the
    messages, string and power arithmetic, raise_exception, macros that recurse, broken syntax): each renders
    to text or is one ValueError line, each within a few seconds, and nothing else escapes."""
    import time
    from tokenizer import ChatTemplate
    pieces = ["{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
              "{% for i in range(N) %}{% for j in range(N) %}{% endfor %}{% endfor %}", "{{ 'ab' * N }}",
              "{{ 2 ** N }}", "{{ raise_exception('no') }}", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
              "{{ messages[N] }}", "{{ N / 0 }}", "{% if add_generation_prompt %}A:{% endif %}", "{{ messages|tojson }}",
              "{% for m in messages %", "{{ x.y.z }}", "{{ ''.__class__ }}", "{{ range(N)|list|length }}"]

    class Library:
        def encode(self, text, add_special_tokens=False):
            return type('Encoding', (), {'ids': list(text.encode())})
    rng = random.Random(3)
    for _ in range(120):
        source = ''.join(rng.choice(pieces).replace('N', str(rng.choice([0, 3, 70, 5000, 10 ** 6, 10 ** 9])))
                         for _ in range(rng.randint(1, 4)))
        start = time.time()
        try:
            ChatTemplate(source, {}, Library()).prompt([('user', 'hi'), ('assistant', 'yo'), ('user', 'ok')])
        except ValueError as e:
            assert '\n' not in str(e) and len(str(e)) < 400, (source, e)
        assert time.time() - start < 10, source
