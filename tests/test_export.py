"""
export.py: checkpoints trained by train.py (character-level and GPT-2 BPE, the GPT-2 architecture and
nanochat's) exported to transformers and GGUF. transformers' logits and greedy tokens equal ours, its
tokenizer gives our ids, the directories load back here (from_pretrained, train.py and sample.py
--init_from=DIR), GGUF files hold the right tensors and metadata and, with llama-cpp-python
installed, llama.cpp tokenizes and greedy-decodes as we do. Unsupported switches stop with a
one-line error that names them, and nothing is written.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import GPT2_BPE, REPO, SHAKESPEARE, run_script
import export
import hf
from checkpoint import load_checkpoint
from model import GPT, GPTConfig

TINY = ['--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2', '--n_head=4', '--n_embd=32',
        '--block_size=32', '--batch_size=4', '--eval_iters=1', '--log_interval=10', '--warmup_iters=2',
        '--learning_rate=1e-2', '--min_lr=1e-4', '--gradient_accumulation_steps=1']
NANOCHAT = ['--use_rope=True', '--norm=rmsnorm', '--qk_norm=True', '--mlp=relu2', '--embed_norm=True',
            '--n_kv_head=2', '--logit_softcap=15.0']
# checkpoint -> (dataset, train.py settings, transformers class)
MODELS = {'char': ('tiny', [], 'GPT2LMHeadModel'),
          'nanochat': ('tiny', NANOCHAT, 'NanoChatForCausalLM'),
          'bpe': ('tinybpe', ['--max_iters=10', '--eval_interval=10'], 'GPT2LMHeadModel')}
# every GPT-2 BPE text test: spaces, contractions, digits, accents, CJK, emoji, CRLF
VARIED = ("Hello, world! It's 1,234.5 -- naïve café; DON'T stop.\n\n\tÜnïcödé: 日本語のテキスト, привет, 🤖🎉 "
          "x  \r\n  trailing   ")


def start(workdir, script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args}\n{out[-2000:]}\n{err[-2000:]}"
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Three tiny models trained side by side, then exported side by side: each to transformers, and
    the two GPT-2-architecture ones to GGUF (the character model in float32, the BPE one in float16)."""
    if not SHAKESPEARE.exists():
        pytest.skip("../shared/data/tinyshakespeare/input.txt not present")
    root = tmp_path_factory.mktemp('export')
    for name, script in (('tiny', 'shakespeare_char'), ('tinybpe', 'shakespeare')):
        data = root / 'data' / name
        data.mkdir(parents=True)
        (data / 'input.txt').write_text(SHAKESPEARE.read_text()[:40000])
        run_script(REPO / 'data' / script / 'prepare.py', f'--out_dir={data}', cwd=root, env={'PYTHONPATH': str(REPO)})
    procs = [start(root, 'train.py', *TINY, f'--dataset={data}', f'--out_dir=out-{name}', '--max_iters=20',
                   '--eval_interval=20', *args) for name, (data, args, _) in MODELS.items()]
    for p in procs:
        finish(p)
    exports = {f'hf-{name}': start(root, 'export.py', f'--out_dir=out-{name}', f'--to=hf-{name}') for name in MODELS}
    exports['gguf-char'] = start(root, 'export.py', '--out_dir=out-char', '--format=gguf', '--to=char.gguf')
    exports['gguf-bpe'] = start(root, 'export.py', '--out_dir=out-bpe', '--format=gguf', '--dtype=float16',
                                '--to=bpe-f16.gguf')
    return dict(root=root, out={name: finish(p) for name, p in exports.items()})


def ours_of(runs, name):
    model, ckpt = load_checkpoint(runs['root'] / f'out-{name}')
    return model.eval(), ckpt


def text_for(name):
    """Text our tokenizer can encode: Shakespeare for the characters, anything for GPT-2's BPE."""
    return SHAKESPEARE.read_text()[30000:30600] + ('' if name != 'bpe' else VARIED)


def ours_encode(runs, name):
    from tokenizer import load_tokenizer
    return load_tokenizer(str(runs['root'] / f'out-{name}')).encode


def printed_check(out, what):
    m = re.search(rf'^{what}: logits within (\S+) \(relative\) of ours; greedy tokens: (\d+) of (\d+) identical; '
                  r'tokenizer: (.+) ids', out, re.M)
    assert m, out
    return float(m.group(1)), m.group(2) == m.group(3), m.group(4) == 'the same'


# ---------------------------------------------------------------------------------------------
# transformers

@pytest.mark.parametrize('name', list(MODELS))
def test_hf_export_matches_ours(runs, name):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    err, greedy_same, ids_same = printed_check(runs['out'][f'hf-{name}'], 'transformers')
    assert err < 1e-4 and greedy_same and ids_same
    path = runs['root'] / f'hf-{name}'
    assert {'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json'} <= set(os.listdir(path))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == MODELS[name][2]
    with safe_open(path / 'model.safetensors', 'pt') as f:  # exactly the class's weights, none left to init
        assert set(f.keys()) == set(hf.state_dict()) - ({'lm_head.weight'} if hf.config.tie_word_embeddings else set())
    ours, _ = ours_of(runs, name)
    n = hf.config.vocab_size
    if name == 'bpe':
        assert ours.config.vocab_size == 50304 and n == 50257  # the padding rows are cut
    else:
        assert n == ours.config.vocab_size
    if type(hf).__name__ == 'GPT2LMHeadModel':
        assert hf.config.activation_function == 'gelu'  # exact GELU, as trained here (GPT-2's own is gelu_new)
    # logits over whole blocks
    idx = torch.randint(n, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(idx, targets=idx)[0][..., :n]
        got = hf(idx).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    # the tokenizer: our ids on real text, and back
    tok = AutoTokenizer.from_pretrained(path)
    text = text_for(name)
    ids = tok(text, verbose=False)['input_ids']
    assert ids == ours_encode(runs, name)(text)
    assert tok.decode(ids) == text
    # greedy continuation of a real prompt, as docs/export.md's snippet does it
    prompt = ids[:12]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=20,
                          do_sample=False, pad_token_id=0)
    assert out[0, 12:].tolist() == export.ours_greedy(ours, prompt, 20, n)


@pytest.mark.parametrize('switches', [
    dict(mlp='relu2', tie_embeddings=False, bias=True),  # GPT2LMHeadModel with ReLU², an untied head and biases
    dict(gelu_approximate='tanh'),  # GPT-2's own GELU
    dict(use_rope=True, rope_theta=500.0, norm='rmsnorm', qk_norm=True, embed_norm=True, n_kv_head=1),  # MQA, tied
    dict(use_rope=True, norm='rmsnorm', qk_norm=True, embed_norm=True, n_kv_head=2, mlp='relu2', logit_softcap=10.0,
         tie_embeddings=False),
], ids=['gpt2-relu2-untied-bias', 'gpt2-tanh', 'nanochat-mqa-gelu-tied', 'nanochat-gqa-relu2-softcap'])
def test_hf_parity_of_switch_combinations(tmp_path, switches):
    """Other switch combinations each class computes, on random weights whose norm gains and biases
    are far from their init (so folding the gains is tested): same logits, greedy tokens and round trip."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=70, bias=False)
    model = GPT(GPTConfig(**{**shape, **switches}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    chars = [chr(48 + i) for i in range(70)]
    meta = {'vocab_size': 70, 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}
    export.write_hf(model, export.vocabulary(meta), meta, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with safe_open(tmp_path / 'model.safetensors', 'pt') as f:  # exactly the class's weights, none left to init
        tied = {'lm_head.weight'} if hf.config.tie_word_embeddings else set()
        assert set(f.keys()) == set(hf.state_dict()) - tied
    back = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(70, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx, targets=idx)[0]
        for got in (hf(idx).logits, back(idx, targets=idx)[0]):
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
        out = hf.generate(idx[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=16,
                          do_sample=False)
    assert out[0, 8:].tolist() == export.ours_greedy(model, idx[0, :8].tolist(), 16, 70)


def test_hf_gpt2_files_are_gpt2s(runs):
    path = runs['root'] / 'hf-bpe'
    if not GPT2_BPE.exists():
        pytest.skip("../shared/gpt2_bpe not present")
    assert (path / 'merges.txt').read_text() == (GPT2_BPE / 'vocab.bpe').read_text()
    assert json.loads((path / 'vocab.json').read_text()) == json.loads((GPT2_BPE / 'encoder.json').read_text())
    gen = json.loads((path / 'generation_config.json').read_text())
    assert gen['eos_token_id'] == [50256] and gen['bos_token_id'] == 50256


def test_hf_round_trip(runs):
    """Each exported directory loads back here as the same function; train.py and sample.py take it as init_from."""
    for name in MODELS:
        ours, _ = ours_of(runs, name)
        back = GPT.from_pretrained(str(runs['root'] / f'hf-{name}')).eval()
        n = back.config.vocab_size
        idx = torch.randint(n, (2, 32), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            a, b = ours(idx, targets=idx)[0][..., :n], back(idx, targets=idx)[0]
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, name
        for k in ('use_rope', 'norm', 'qk_norm', 'mlp', 'embed_norm', 'logit_softcap', 'n_kv_head', 'gelu_approximate'):
            assert getattr(back.config, k) == getattr(ours.config, k), (name, k)
    root = runs['root']
    trained = start(root, 'train.py', *TINY, '--dataset=tiny', '--init_from=hf-nanochat', '--out_dir=out-again',
                    '--max_iters=2', '--eval_interval=2')
    sampled = start(root, 'sample.py', '--init_from=hf-bpe', '--device=cpu', '--num_samples=1', '--max_new_tokens=8',
                    '--start=ROMEO:', '--temperature=0')
    assert 'step 2:' in finish(trained)
    args = torch.load(root / 'out-again' / 'ckpt.pt', weights_only=True)['model_args']
    assert args['embed_norm'] is True and args['use_rope'] is True and args['qk_norm'] is True
    text = finish(sampled).split('loading weights from pretrained gpt: hf-bpe\n')[1]
    assert text.startswith('ROMEO:') and text.count('---------------') == 1


def test_embed_norm_is_recorded_only_when_on(runs):
    _, nanochat = ours_of(runs, 'nanochat')
    _, char = ours_of(runs, 'char')
    assert nanochat['model_args']['embed_norm'] is True
    assert 'embed_norm' not in char['model_args']


def test_trained_bpe_tokenizer_json_encodes_as_tiktoken(tmp_path):
    """A byte-level BPE trained with rustbpe (meta.pkl's 'bpe' format, with chat tokens), and GPT-2's
    BPE with the chat tokens appended: AutoTokenizer gives tiktoken's ids, special tokens included."""
    rustbpe = pytest.importorskip('rustbpe')
    import tiktoken
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pattern = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    text = SHAKESPEARE.read_text()[:100000] if SHAKESPEARE.exists() else VARIED * 50
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter([text, VARIED]), 600, pattern=pattern)
    ranks = {bytes(t): r for t, r in bpe.get_mergeable_ranks()}
    chat = ['<|bos|>', '<|user_start|>', '<|user_end|>', '<|assistant_start|>', '<|assistant_end|>']
    special = {s: len(ranks) + i for i, s in enumerate(chat)}
    trained = {'tokenizer': 'bpe', 'vocab_size': len(ranks) + 5, 'pattern': pattern, 'mergeable_ranks': ranks,
               'special_tokens': special, 'dtype': 'uint16'}
    gpt2 = tiktoken.get_encoding('gpt2')
    gpt2_chat = {'tokenizer': 'gpt2', 'vocab_size': 50262, 'special_tokens': {s: 50257 + i for i, s in enumerate(chat)},
                 'dtype': 'uint16'}
    rng = np.random.default_rng(0)
    alphabet = list(" \n\t\r.,'!?-0123456789aeiouxyzAEZéüß日本語🤖\u200b\u0301") + ["'s", "'LL", "  ", "\r\n"]
    samples = [VARIED, text[5000:9000], '', ' ', '\n\n\n', 'a' * 300, "12345678 3.14159", "DON'T we'll I'M",
               *(''.join(rng.choice(alphabet, size=rng.integers(1, 60))) for _ in range(200))]
    for meta, ranks_, pattern_, specials in ((trained, ranks, pattern, special),
                                             (gpt2_chat, gpt2._mergeable_ranks, gpt2._pat_str,
                                              {**gpt2._special_tokens, **gpt2_chat['special_tokens']})):
        enc = tiktoken.Encoding('t', pat_str=pattern_, mergeable_ranks=ranks_, special_tokens=specials)
        # a random model of that vocabulary, written as export.py does
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=meta['vocab_size'])).eval()
        v = export.vocabulary(meta)
        path = tmp_path / meta['tokenizer']
        path.mkdir()
        export.write_hf(model, v, meta, path)
        tok = AutoTokenizer.from_pretrained(path)
        assert len(tok) == meta['vocab_size']
        for s in samples:
            ids = tok(s, verbose=False)['input_ids']
            assert ids == enc.encode_ordinary(s), repr(s)
            assert tok.decode(ids) == s
        turn = '<|bos|><|user_start|>Hi there<|user_end|><|assistant_start|>Hello!<|assistant_end|>'
        assert tok(turn)['input_ids'] == enc.encode(turn, allowed_special='all')
        gen = json.loads((path / 'generation_config.json').read_text())
        eot = special['<|bos|>'] if meta['tokenizer'] == 'bpe' else 50256
        assert gen['eos_token_id'] == [eot, specials['<|assistant_end|>']]
        assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == meta['vocab_size']
        if meta['tokenizer'] == 'bpe':  # every merged token is built by exactly one merge
            assert len(export.bpe_merges(ranks)) == len(ranks) - 256


# ---------------------------------------------------------------------------------------------
# GGUF

@pytest.mark.parametrize('name, file, dtype', [('char', 'char.gguf', np.float32), ('bpe', 'bpe-f16.gguf', np.float16)])
def test_gguf_tensors_and_metadata(runs, name, file, dtype):
    import gguf
    ours, _ = ours_of(runs, name)
    cfg = ours.config
    reader = gguf.GGUFReader(runs['root'] / file)

    def field(key, index=slice(None)):
        return reader.fields[key].contents(index)
    n = 50257 if name == 'bpe' else cfg.vocab_size
    assert field('general.architecture') == 'gpt2'
    assert field('gpt2.context_length') == cfg.block_size and field('gpt2.embedding_length') == cfg.n_embd
    assert field('gpt2.block_count') == cfg.n_layer and field('gpt2.attention.head_count') == cfg.n_head
    assert field('gpt2.feed_forward_length') == 4 * cfg.n_embd
    assert field('tokenizer.ggml.model') == 'gpt2' and field('tokenizer.ggml.pre') == 'gpt-2'
    assert len(reader.fields['tokenizer.ggml.tokens'].data) == n
    if name == 'bpe':
        assert field('tokenizer.ggml.tokens', 50256) == '<|endoftext|>' and field('tokenizer.ggml.eos_token_id') == 50256
        assert field('tokenizer.ggml.tokens', 464) == 'The' and field('tokenizer.ggml.tokens', 770) == 'ĠThis'
        assert len(reader.fields['tokenizer.ggml.merges'].data) == 50000
        assert field('tokenizer.ggml.merges', 0) == 'Ġ t'  # GPT-2's first merge
    else:
        meta = pickle.loads((runs['root'] / 'out-char' / 'meta.pkl').read_bytes())
        assert field('tokenizer.ggml.tokens') == [export.as_text(meta['itos'][i].encode()) for i in range(n)]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 4 + 12 * cfg.n_layer  # tied head: no output.weight
    sd = ours.state_dict()
    embd = tensors['token_embd.weight']
    assert embd.data.shape == (n, cfg.n_embd) and embd.data.dtype == dtype
    assert np.allclose(embd.data, sd['transformer.wte.weight'][:n].numpy(), atol=1e-3 if dtype == np.float16 else 0)
    qkv = tensors['blk.1.attn_qkv.weight']
    assert qkv.data.shape == (3 * cfg.n_embd, cfg.n_embd) and qkv.data.dtype == dtype
    assert np.allclose(qkv.data, sd['transformer.h.1.attn.c_attn.weight'].numpy(), atol=1e-3 if dtype == np.float16 else 0)
    norm = tensors['blk.0.attn_norm.weight']
    assert norm.data.dtype == np.float32 and np.array_equal(norm.data, sd['transformer.h.0.ln_1.weight'].numpy())
    assert not tensors['blk.0.attn_qkv.bias'].data.any()  # bias=False: zeros, which llama.cpp's GPT-2 needs


@pytest.mark.parametrize('name, file', [('char', 'char.gguf'), ('bpe', 'bpe-f16.gguf')])
def test_llama_cpp_generates_our_tokens(runs, name, file):
    out = runs['out'][f'gguf-{name}']
    try:
        from llama_cpp import Llama
    except ImportError:
        assert 'llama-cpp-python is not installed' in out
        pytest.skip("llama-cpp-python not installed")
    err, greedy_same, ids_same = printed_check(out, 'llama.cpp')
    assert greedy_same and ids_same and err < 1e-2
    # and once more here, through llama.cpp's own sampler on real text
    ours, _ = ours_of(runs, name)
    encode = ours_encode(runs, name)
    llm = Llama(model_path=str(runs['root'] / file), n_ctx=32, verbose=False, n_threads=1)
    text = text_for(name)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == encode(text)
    prompt = encode(text)[:12]
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        theirs.append(token)
        if len(theirs) == 20:
            break
    assert theirs == export.ours_greedy(ours, prompt, 20, llm.n_vocab())


# ---------------------------------------------------------------------------------------------
# what cannot be exported

def test_switches_without_a_transformers_class_are_named():
    cases = {'use_alibi=True': dict(use_alibi=True),
             "norm='rmsnorm'": dict(norm='rmsnorm'),
             'qk_norm=False': dict(use_rope=True, norm='rmsnorm', embed_norm=True),
             'embed_norm=False': dict(use_rope=True, norm='rmsnorm', qk_norm=True),
             'n_kv_head=1': dict(n_kv_head=1),
             'logit_softcap=30.0': dict(logit_softcap=30.0),
             'bias=True': dict(use_rope=True, norm='rmsnorm', qk_norm=True, embed_norm=True, bias=True)}
    for name, switches in cases.items():
        cfg = GPTConfig(**dict(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=10, block_size=8, bias=False), **switches))
        with pytest.raises(ValueError, match=re.escape(name)):
            hf.hf_arch(cfg)
    ok = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=10, block_size=8, mlp='relu2', tie_embeddings=False)
    assert hf.HF_CLASSES[hf.hf_arch(ok)] == 'GPT2LMHeadModel'


def test_export_errors_are_one_line_and_write_nothing(runs):
    root = runs['root']
    cases = [(['--out_dir=out-nanochat', '--format=gguf', '--to=x.gguf'], "this model has mlp='relu2', qk_norm=True"),
             (['--out_dir=out-char', '--to=hf-char'], 'hf-char exists')]
    before = set(os.listdir(root))
    procs = [(start(root, 'export.py', *args), message) for args, message in cases]
    for proc, message in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and message in err, err
        assert 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert set(os.listdir(root)) == before
    # --overwrite replaces a whole export with a whole one, and leaves nothing else behind
    (root / 'hf-char' / 'stale.txt').write_text('from an older export')
    run_script(REPO / 'export.py', '--out_dir=out-char', '--to=hf-char', '--overwrite=True', '--check=False', cwd=root)
    assert set(os.listdir(root)) == before and not (root / 'hf-char' / 'stale.txt').exists()
    assert (root / 'hf-char' / 'model.safetensors').exists()
