"""
The text layer over the decode engine: a model and its tokenizer loaded for inference (load_model),
text streamed out of token ids as they decode (TextStream, stop strings included), a row's reply with
its calculator calls answered (start_reply, decode_step), and generate_text, which does all of it for a
list of prompts. sample.py, serve.py (serving/worker.py), chat_eval.py, rl.py and bench.py import it;
the engine itself knows nothing of text.
"""
import codecs
import os
import sys
import time

from calculator import tool_calls
from checkpoint import load_checkpoint, load_pretrained, peft_base
from common import check_device_dtype
from engine import Engine, Row, beam_rows
from inference import for_inference
from model import GPTConfig
from tokenizer import check_vocab, gpt2_tokenizer, load_tokenizer, pretrained_dir


def load_model(init_from='resume', out_dir='out', device='cpu', dtype='float32', quantize='', pack=True):
    """The model ready for inference on `device` in `dtype`, its tokenizer, and a dict that says
    where it came from (the checkpoint's iter_num, config, parameters, ...); quantize and pack are
    inference.for_inference's. ValueError or FileNotFoundError with a one-line reason for anything
    that cannot work, a tokenizer that does not fit included."""
    ptdtype = check_device_dtype(device, dtype)
    if init_from == 'resume':
        model, info = load_checkpoint(out_dir, device)
        info.pop('optimizer', None)
        info['source'] = os.path.join(out_dir, 'ckpt.pt')
        tokenizer = load_tokenizer(out_dir, (info.get('config') or {}).get('dataset'))
    elif init_from.startswith('gpt2') or os.path.isdir(init_from) or init_from.count('/') == 1:
        if not init_from.startswith('gpt2'):
            init_from = pretrained_dir(init_from)  # a hub id ('HuggingFaceTB/SmolLM2-135M-Instruct'): downloaded once
        model = load_pretrained(init_from)  # a PEFT adapter directory: its base, the adapter merged in
        info = {'source': init_from, 'model_args': {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}}
        # export.py leaves meta.pkl; a Llama model has its tokenizer.json; a PEFT adapter its base's
        tokenizer_dir = pretrained_dir(peft_base(init_from)) if peft_base(init_from) else init_from
        tokenizer = load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else gpt2_tokenizer()
    else:
        raise ValueError(f"init_from must be 'resume', a gpt2 name, a local transformers directory or a hub id "
                         f"(owner/name), not '{init_from}'")
    check_vocab(tokenizer, model.config.vocab_size)
    info['parameters'] = model.get_num_params()  # counted before for_inference swaps the Linears out
    return for_inference(model, device, ptdtype, quantize, pack), tokenizer, info


def load_draft(source, tokenizer, device='cpu', dtype='float32', quantize=''):
    """A draft model for speculative decoding (Row's draft='model'): an out_dir with a checkpoint, or what
    load_model's init_from takes, which must have the model's tokenizer. ValueError when it does not."""
    resume = os.path.exists(os.path.join(source, 'ckpt.pt'))
    model, draft_tokenizer, _ = load_model('resume' if resume else source, source, device, dtype, quantize)
    probe = range(0, tokenizer.n_vocab, max(1, tokenizer.n_vocab // 2000))  # ids across the vocabulary: the same bytes?
    if draft_tokenizer.n_vocab != tokenizer.n_vocab or any(
            draft_tokenizer.token_bytes([i]) != tokenizer.token_bytes([i]) for i in probe):
        raise ValueError(f"the draft model {source} has another tokenizer than the model's: it cannot propose its tokens")
    return model


class TextStream:
    """Turns one sample's tokens into text as they arrive. A BPE token can end in the middle
    of a UTF-8 character, so bytes are decoded incrementally and a partial character waits
    for the next token. Text that could be the start of a stop string is held back until it
    is clear; at a stop string the text ends just before it, at a stop token (<|endoftext|>)
    it ends there."""

    def __init__(self, tokenizer, stop=(), stop_tokens=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.stop_tokens = set(stop_tokens)
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.pending = ''  # decoded, not yet released
        self.stopped = False  # a stop string or stop token was reached

    def add(self, token):
        """Feed one token id; return the text that is now safe to show ('' if none)."""
        if self.stopped:
            return ''
        if token in self.stop_tokens:
            self.stopped = True
            return self._release(len(self.pending))
        self.pending += self.decoder.decode(self.tokenizer.token_bytes([token]))
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        # hold back the longest tail of pending that begins some stop string
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        return self._release(len(self.pending) - hold)

    def finish(self):
        """The text still held back at the end of generation."""
        if self.stopped:
            return ''
        self.pending += self.decoder.decode(b'', final=True)
        return self._release(len(self.pending))

    def _release(self, n):
        out, self.pending = self.pending[:n], ('' if self.stopped else self.pending[n:])
        return out


def stop_tokens_of(tokenizer):
    """The ids that end a generation: <|endoftext|> (a transformers model's eos_token), and a chat
    model's <|assistant_end|> (and <|bos|>, which only ever starts a new conversation), and those a
    transformers model's generation_config.json names."""
    chat = [tokenizer.special_tokens[name] for name in ('<|assistant_end|>', '<|bos|>') if name in tokenizer.special_tokens]
    return ([] if tokenizer.eot is None else [tokenizer.eot]) + chat + tokenizer.stop_ids


def stop_key(tokenizer, stop):
    """For a beam search (engine.Beams' stops): a function of token ids that gives the text before the first
    of the stop strings in their text, or None where none is; None when there are no stop strings."""
    stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    if not stops:
        return None

    def key(tokens):
        text = tokenizer.token_bytes(tokens).decode('utf-8', errors='replace')
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else None
    return key


def start_reply(row, tokenizer, stop=(), tools=True):
    """What decode_step needs on a row: its TextStream (row.text) and its calculator (row.calculator,
    None unless tools and the tokenizer has the tool tokens)."""
    row.text = TextStream(tokenizer, stop, row.stop_tokens)
    row.calculator = tool_calls(tokenizer, tools)
    if row.calculator:  # a speculative run ends at a call's end: its output comes next
        row.pause_tokens.add(row.calculator.end)


def decode_step(engine):
    """One engine step, as text: (row, the text its new tokens add: row.stepped of them) for each row the step
    touched. Every row carries its TextStream as row.text (see start_reply): a row whose text
    reaches a stop string ends there, and a token the tokenizer cannot decode fails the row
    (row.error) as an engine fault would. A row's row.calculator answers the calculator calls
    its model writes: the call and its output are part of the text."""
    out = []
    for row in engine.step():
        piece = ''
        if row.error is None:
            try:
                if row.beam is not None:  # a beam's tokens change until the search ends: its text comes whole then
                    tokens = row.tokens if row.finish_reason else []
                    piece = ''.join(row.text.add(t) for t in tokens)
                else:  # one token, or a speculative run's several: a stop string inside one ends the row there
                    new = row.tokens[len(row.tokens) - row.stepped:]
                    for i, token in enumerate(new):
                        piece += row.text.add(token)
                        if row.text.stopped:
                            row.cut(len(new) - i - 1)
                            row.finish_reason = row.finish_reason and 'stop'
                            break
                        if getattr(row, 'calculator', None) and not row.finish_reason:  # a call's end queues its output
                            row.forced.extend(row.calculator.after(token))
                if row.text.stopped:
                    engine.finish(row, 'stop')
                if row.finish_reason:
                    piece += row.text.finish()
            except Exception as e:
                row.error = e
                engine.finish(row, 'error')
        out.append((row, piece))
    return out


BEAM_SETTINGS = ('repetition_penalty', 'presence_penalty', 'frequency_penalty', 'logit_bias')  # what beams honour


def generate_text(model, tokenizer, prompts, max_new_tokens, stop=(), seed=None, progress=False, num_beams=1,
                  tools=True, keep=None, draft_model=None, **settings):
    """Continue each prompt (a list of strings or token id lists, one engine row each). Yields (row, text) pieces
    as they decode; a row ends at a stop string, <|endoftext|>, or after max_new_tokens tokens.
    settings: Row's sampling settings (temperature, top_k, top_p, repetition_penalty, ...). num_beams > 1:
    each prompt's best beam instead, its text whole at the end: the search is greedy (temperature, top_k and
    top_p do not apply), the penalties, logit_bias and stop strings do.
    tools: answer the model's calculator calls. keep: a list that receives the engine rows (their tokens, and
    which of them were sampled). draft_model: the model of rows with draft='model' (load_draft).
    progress: on stderr, a bar (tokens/s, ETA) on a terminal, else a line at every tenth of the tokens."""
    ids = [tokenizer.encode_prompt(p) if isinstance(p, str) else p for p in prompts]
    if num_beams > 1:
        kept = {k: v for k, v in settings.items() if k in BEAM_SETTINGS + ('draft',)}  # beam_rows refuses a draft
        beams = [beam_rows(p, num_beams, max_new_tokens, stop_tokens_of(tokenizer), stop_key(tokenizer, stop), **kept)
                 for p in ids]
        rows, every = [group[0] for group in beams], [row for group in beams for row in group]  # row 0 ends the best
    else:
        rows = every = [Row(p, max_new_tokens, seed=None if seed is None else seed + i,
                            stop_tokens=stop_tokens_of(tokenizer), **settings) for i, p in enumerate(ids)]
    engine = Engine(model, len(every), max_new_tokens, vocab_size=tokenizer.n_vocab, seed=seed,
                    longest_prompt=max(len(row.prompt) for row in rows), draft_model=draft_model)
    index = {id(row): i for i, row in enumerate(rows)}
    if keep is not None:
        keep.extend(rows)
    for row in every:
        start_reply(row, tokenizer, stop, tools)
    engine.add(every)
    total, done, t0, bar = max(1, len(every) * max_new_tokens), 0, time.time(), None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, unit='tok', desc='sampling', leave=False, file=sys.stderr, dynamic_ncols=True)
    while engine.rows:
        stepped = decode_step(engine)
        for row, piece in stepped:
            if row.error is not None:
                raise row.error
            if piece and id(row) in index:
                yield index[id(row)], piece
        new = sum(max(row.stepped, 1) for row, _ in stepped)  # a speculative step's run: several tokens
        done += new
        if bar is not None:
            bar.update(new)
        elif progress and done * 10 // total > (done - new) * 10 // total:  # a file or CI's log: no \r
            rate = done / max(time.time() - t0, 1e-6)
            print(f"sampling: {done}/{total} tokens, {rate:.1f} tok/s, {(total - done) / rate:.0f}s left",
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
