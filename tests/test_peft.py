"""
LoRA out to the ecosystem and back: a tiny LlamaForCausalLM saved by transformers, LoRA-trained here on chat data
in its template, exported with export.py --format=peft, loads in peft (PeftModel.from_pretrained) with our logits
and those of the merged transformers export; an adapter made by peft itself (random B, some modules left out)
loads here as an init_from with peft's logits, and trains on. peft is a test-only dependency.
"""
import json

import pytest
import torch

from conftest import REPO, run_script
from test_llama import CHATML, byte_level_tokenizer, save_llama

peft = pytest.importorskip('peft')

TRAIN = ['--device=cpu', '--compile=False', '--dtype=float32', '--batch_size=2', '--block_size=64', '--eval_iters=1',
         '--log_interval=1', '--gradient_accumulation_steps=1', '--dataset=chat_llama', '--learning_rate=3e-2',
         '--warmup_iters=0', '--decay_lr=False']


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp('peft')
    tok = byte_level_tokenizer(['<|endoftext|>', '<|im_start|>', '<|im_end|>'])
    save_llama(root / 'llama', tok, CHATML, eos='<|im_end|>', bos='<|endoftext|>', tied=True)
    run_script(REPO / 'data' / 'chat' / 'prepare.py', '--task=arith', '--n_train=40', '--n_val=4',
               f"--template_from={root / 'llama'}", f"--out_dir={root / 'data' / 'chat_llama'}", cwd=root)
    return root


def ours_and_theirs(model, hf, vocab):
    ids = torch.randint(vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(ids, ids)[0]
        theirs = hf(ids).logits
    return (ours - theirs).abs().max().item()


def test_lora_run_exports_to_peft_with_our_logits(llama, one_thread):
    from transformers import AutoModelForCausalLM
    from checkpoint import load_checkpoint
    proc = run_script(REPO / 'train.py', *TRAIN, f"--init_from={llama / 'llama'}", '--out_dir=out-lora',
                      '--lora_rank=4', '--lora_alpha=8', '--lora_targets=all', '--max_iters=4', '--eval_interval=4',
                      cwd=llama, env={'OMP_NUM_THREADS': '1'})
    assert 'LoRA adapters of rank 4' in proc.stdout
    proc = run_script(REPO / 'export.py', '--out_dir=out-lora', '--format=peft', cwd=llama)
    assert 'peft: logits within' in proc.stdout and 'PEFT LoRA adapter over' in proc.stdout
    config = json.loads((llama / 'out-lora-peft' / 'adapter_config.json').read_text())
    assert config['r'] == 4 and config['lora_alpha'] == 8 and config['base_model_name_or_path'] == str(llama / 'llama')
    assert set(config['target_modules']) == {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'}
    model, _ = load_checkpoint(str(llama / 'out-lora'))
    base = AutoModelForCausalLM.from_pretrained(llama / 'llama', dtype=torch.float32).eval()
    assert ours_and_theirs(model, base, model.config.vocab_size) > 1e-3  # the adapters changed the model
    adapted = peft.PeftModel.from_pretrained(base, llama / 'out-lora-peft').eval()
    assert ours_and_theirs(model, adapted, model.config.vocab_size) < 1e-4
    # the transformers export of the same run: the adapters merged in
    run_script(REPO / 'export.py', '--out_dir=out-lora', cwd=llama)
    merged = AutoModelForCausalLM.from_pretrained(llama / 'out-lora-hf', dtype=torch.float32).eval()
    assert ours_and_theirs(model, merged, model.config.vocab_size) < 1e-4
    # a whole model has no adapters to write
    proc = run_script(REPO / 'export.py', f"--out_dir={llama / 'llama'}", '--format=peft', '--to=x', cwd=llama,
                      check=False)
    assert proc.returncode == 1


def test_an_adapter_made_by_peft_loads_and_trains_here(llama, one_thread):
    from transformers import AutoModelForCausalLM
    from textgen import load_model
    base = AutoModelForCausalLM.from_pretrained(llama / 'llama', dtype=torch.float32)
    # k_proj and up_proj left out: their rows of our fused weights get no update
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj'],
                          init_lora_weights=False, task_type='CAUSAL_LM', rank_pattern={'o_proj': 2},
                          alpha_pattern={'down_proj': 7})
    adapted = peft.get_peft_model(base, cfg).eval()
    adapted.save_pretrained(llama / 'from-peft')
    model, tokenizer, _ = load_model(str(llama / 'from-peft'), dtype='float32', pack=False)
    assert tokenizer.n_vocab == base.config.vocab_size
    plain = AutoModelForCausalLM.from_pretrained(llama / 'llama', dtype=torch.float32).eval()
    assert ours_and_theirs(model, plain, base.config.vocab_size) > 1e-3  # a nonzero B: the adapter counts
    assert ours_and_theirs(model, adapted, base.config.vocab_size) < 1e-4
    # as an init_from, train.py trains the adapter on over the base it names
    proc = run_script(REPO / 'train.py', *TRAIN, f"--init_from={llama / 'from-peft'}", '--out_dir=out-from-peft',
                      '--max_iters=2', '--eval_interval=2', '--lora_rank=1', cwd=llama, env={'OMP_NUM_THREADS': '1'})
    assert f"over the frozen {llama / 'llama'}" in proc.stdout
    ckpt = torch.load(llama / 'out-from-peft' / 'ckpt.pt', weights_only=True)
    assert ckpt['lora']['base'] == str(llama / 'llama')
    assert ckpt['model']['transformer.h.0.attn.c_attn.lora_A'].shape[0] == 6  # q's and v's ranks, stacked
    # and out again: ranks that differ by module go out as PEFT's rank_pattern, checked against peft by export.py
    proc = run_script(REPO / 'export.py', '--out_dir=out-from-peft', '--format=peft', cwd=llama)
    assert 'peft: logits within' in proc.stdout
    config = json.loads((llama / 'out-from-peft-peft' / 'adapter_config.json').read_text())
    assert config['rank_pattern']['model.layers.0.self_attn.q_proj'] == 6 and config['lora_alpha'] == config['r']
