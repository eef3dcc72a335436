"""
The decode engine: a fixed number of rows over one KV cache, decoded together one token per
step. Sequences join (their prompt is prefilled into a free row) and leave (their length, a
stop token, or the caller ending them) between steps; each row samples with its own
settings, every row in one vectorised call (sampling.py). textgen.py (and through it sample.py,
serve.py, chat_eval.py and rl.py) and bench.py all generate through it. It owns its KV cache and
imports nothing of this project but sampling.py: it calls the model object it is given
(hidden_states, logits).

It knows nothing about text: prompts and outputs are token ids. Stop *strings* are the
caller's (textgen.py's TextStream spots them and calls Engine.finish), and so are a grammar (a
row's `constraint`, grammar.py's JSON matcher, only says which ids it allows next) and tools (the
caller queues a tool's output on row.forced, which the next steps feed instead of sampling).

With prefix_cache_tokens > 0 the engine keeps the keys and values of sequences that ended (up
to that many tokens, least recently used out first), and a new prompt that starts with tokens
a running or a remembered row holds copies their keys and values and prefills only the rest.

    engine = Engine(model, max_rows=4, max_new_tokens=100)
    engine.add([Row(prompt_ids, max_tokens=100, temperature=0.8, top_k=200, seed=1)])
    while engine.rows:
        for row in engine.step():
            print(row.tokens[-1])
"""
import random
from collections import OrderedDict, deque

import torch

from sampling import SlotTables, logprobs_of, sample_tokens
from speculative import DRAFTS, plan, verify


class KVCache:
    """Keys and values of every layer, preallocated for `batch_size` rows of up to `max_len`
    positions. Each row has its own length, so rows holding different prompts (or requests
    that joined a server's batch at different times) decode together in one step. The model's
    attention writes into it (model.py, CausalSelfAttention)."""

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

    def rows(self, start, stop):
        """Rows start..stop-1 as a cache of their own that shares this one's memory (its lengths
        are a copy: write them back after a forward)."""
        view = object.__new__(KVCache)
        view.k, view.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        view.lengths, view.max_len = self.lengths[start:stop], self.max_len
        return view


class SettingError(ValueError):
    """A sampling setting out of range; `name` is the setting (serve.py names it in its 400)."""

    def __init__(self, name, message):
        super().__init__(message)
        self.name = name


class Row:
    """One sequence to generate: its prompt, its sampling settings, what it has generated.

    temperature: 0 is greedy. top_k: keep the k most likely tokens and any tied with the k-th
    (0: off). top_p: keep the smallest set of tokens whose probability reaches p (1: off).
    repetition_penalty (CTRL paper): a seen token's logit is divided by it when positive,
    multiplied when negative. presence_penalty / frequency_penalty (OpenAI's API): subtracted
    once per seen token / per occurrence. logit_bias: {token id: value added to its logit}.
    seed: the row's own random stream (else the engine's). stop_tokens: ids that end the row
    (the id is kept in tokens, finish_reason 'stop'). logprobs: None, or how many of the most
    likely alternatives to record with each sampled token's log probability. constraint: None, or
    an object that fills a bitmask of the ids allowed next (fill_bitmask(int32 words)), takes each
    chosen id (advance(id)) and says when it can take no more (done: the row ends, 'stop').
    forced: ids the caller queues for the next steps to feed instead of sampling (a calculator's
    output); they join tokens like any other but are not the model's choice: sampled is False for
    them and they get no logprobs entry.
    draft: '' (off), 'ngram' or 'model' (the engine's draft_model): speculative decoding (speculative.py),
    up to draft_tokens proposals checked in each step's forward, so a step may add several tokens
    (row.stepped says how many). pause_tokens: ids after which a step adds no more (the caller acts on
    them: a calculator call ends there)."""

    def __init__(self, prompt, max_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None, stop_tokens=(),
                 logprobs=None, constraint=None, draft='', draft_tokens=4):
        positive = ('top_p', 'repetition_penalty')  # these may not be 0 itself
        for name, value, kind, lo, hi in [  # a bool is no number here; an int is a float
                ('max_tokens', max_tokens, int, 0, None), ('temperature', temperature, float, 0, 1e6),
                ('top_k', top_k, int, 0, 2 ** 31 - 1), ('top_p', top_p, float, 0, 1),
                ('repetition_penalty', repetition_penalty, float, 0, 1e6), ('seed', seed, int, 0, 2 ** 64 - 1),
                ('presence_penalty', presence_penalty, float, -2, 2), ('frequency_penalty', frequency_penalty, float, -2, 2),
                ('logprobs', logprobs, int, 0, 20), ('draft_tokens', draft_tokens, int, 1, 64)]:
            if value is None and name in ('seed', 'logprobs'):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise SettingError(name, f"'{name}' must be {'a number' if kind is float else 'an integer'}, not {value!r}")
            if not lo <= value or (value == lo and name in positive) or (hi is not None and value > hi):  # NaN too
                rule = f"{'>' if name in positive else '>='} {lo}" + (f" and <= {hi}" if hi is not None else '')
                raise SettingError(name, f"'{name}' must be {rule}, not {value!r}")
        if not prompt:
            raise SettingError('prompt', "the prompt is empty")
        if draft not in DRAFTS:
            raise SettingError('draft', f"'draft' must be one of {', '.join(map(repr, DRAFTS))}, not {draft!r}")
        if draft and constraint is not None:  # a proposal the grammar forbids would have to be checked first
            raise SettingError('draft', "'draft' does not apply with a grammar (response_format): leave one out")
        if not isinstance(logit_bias or {}, dict) or not all(
                isinstance(k, int) and isinstance(v, (int, float)) and -100 <= v <= 100 for k, v in (logit_bias or {}).items()):
            raise SettingError('logit_bias', f"logit_bias must map token ids to values between -100 and 100, not {logit_bias!r}")
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.penalties = (repetition_penalty, presence_penalty, frequency_penalty)
        self.uses_penalties = self.penalties != (1.0, 0.0, 0.0)
        self.logit_bias, self.stop_tokens, self.logprobs = dict(logit_bias or {}), set(stop_tokens), logprobs
        self.seed, self.rng = seed, random.Random(seed) if seed is not None else None
        self.tokens = []  # generated so far
        self.sampled = []  # for each of tokens: True where the model sampled it, False where it was forced
        self.forced = deque()  # ids the next steps take instead of sampling, queued by the caller
        self.token_logprobs = []  # with logprobs: (logprob of the token, [(id, logprob) of the top alternatives])
        self.next_token = None  # the token the next step feeds (the prompt's last, then each new one)
        self.finish_reason = None  # 'length' | 'stop' | 'error' | whatever the caller's finish() says
        self.error = None  # the exception, when finish_reason is 'error'
        self.constraint = constraint
        self.beam = None  # the Beams this row is one beam of (beam_rows), else None
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.kv_start = 0  # the cache holds (prompt + tokens)[kv_start:]: > 0 once cropped or slid
        self.prefilled = 0  # its first positions computed in whole prefill chunks: what may be reused
        self.draft, self.draft_tokens, self.proposer = draft, draft_tokens, None  # proposer: speculative.py's, made at its first step
        self.pause_tokens = set()
        self.stepped = 0  # tokens the last step added
        self.drafted = (0, 0)  # proposals the last step checked, and how many of them it took

    def cut(self, n):
        """Drop the last n tokens: the caller found its stop string inside a step's run, and ends the row."""
        if n > 0:
            scored = sum(self.sampled[-n:]) if self.logprobs is not None else 0
            del self.tokens[-n:], self.sampled[-n:]
            del self.token_logprobs[len(self.token_logprobs) - scored:]
            self.stepped -= n


class Beams:
    """num_beams rows searching together (beam_rows makes them): transformers' beam search with its
    defaults (length_penalty 1, early_stopping False). Each step every beam's log probabilities (after
    its penalties and logit_bias, which act on them as transformers' logits processors do) add to its
    score; the best 2 x num_beams continuations (more with several stop tokens) are ranked; those among
    the first num_beams that end (a stop token, a stop string, or max_tokens) become hypotheses scored
    by sum / length, the best others continue. It ends when num_beams hypotheses are in and the best
    running beam, at its length, scores no better than the worst of them, or when nothing can
    continue. Then row i holds the i-th best hypothesis, and all leave the engine together.

    stops: None, or a function of a beam's tokens that says whether they end at a stop string (the
    caller's: the engine knows no text) by returning a key, the text that would be kept, else None.
    Two hypotheses with the same key would read the same: the better one stays, so the choices differ."""

    def __init__(self, rows, max_tokens, stop_tokens, stops=None):
        self.rows, self.max_tokens, self.stop_tokens, self.stops = rows, max_tokens, set(stop_tokens), stops
        self.scores = [0.0] + [-1e9] * (len(rows) - 1)  # at first all beams are the same: only one counts
        self.hypotheses = []  # (score, tokens, key, reason), best first, at most num_beams, keys distinct
        self.generated = 0

    def end_of(self, tokens):
        """(key, finish reason) where `tokens` end the search's sequence, else None."""
        if tokens[-1] in self.stop_tokens:
            return tuple(tokens), 'stop'
        key = self.stops(tokens) if self.stops else None
        if key is not None:
            return key, 'stop'
        return (tuple(tokens), 'length') if self.generated >= self.max_tokens else None

    def step(self, engine, logits):
        """One step of the search from its rows' logits (num_beams, vocab), in `engine`."""
        N, V = len(self.rows), logits.size(-1)
        slots = [engine.rows.index(row) for row in self.rows]
        logprobs = logits.float().clone()
        logprobs[:, engine.vocab_size:] = float('-inf')
        logprobs = engine.tables.adjust(self.rows, torch.tensor(slots), logprobs.log_softmax(-1), engine.vocab_size)
        total = logprobs + torch.tensor(self.scores, device=logits.device)[:, None]
        values, ids = total.view(-1).topk(max(2, 1 + len(self.stop_tokens)) * N)
        self.generated += 1
        old = [row.tokens for row in self.rows]
        candidates = [(v, i // V, i % V) for v, i in zip(values.tolist(), ids.tolist())]
        ends = [self.end_of(old[beam] + [t]) for _, beam, t in candidates]
        for (v, beam, t), end in zip(candidates[:N], ends):
            if end is not None:
                self.add_hypothesis(v / self.generated, old[beam] + [t], *end)
        going = [c for c, end in zip(candidates, ends) if end is None][:N]
        done = not going or (len(self.hypotheses) == N and going[0][0] / self.generated <= self.hypotheses[-1][0])
        if done:
            ranked = self.hypotheses + [(v / self.generated, old[beam] + [t], None, end[1])  # too few distinct
                                        for (v, beam, t), end in zip(candidates, ends) if end is not None]
            for row, (_, tokens, _, reason) in zip(self.rows, ranked):
                row.tokens, row.beam_reason = tokens, reason
            for row in self.rows:
                engine.finish(row, row.beam_reason)
            return
        going += [(-1e9, *going[0][1:])] * (N - len(going))  # stop strings ended most candidates: placeholders
        parents = [slots[beam] for _, beam, _ in going]
        if parents != slots:  # each beam's row takes its parent's keys and values (and seen tokens)
            length = engine.cache.lengths[slots[0]]
            for k, v in zip(engine.cache.k, engine.cache.v):
                k[slots, :, :length], v[slots, :, :length] = k[parents, :, :length], v[parents, :, :length]
        engine.tables.reorder(slots, parents)
        for row, (score, beam, token) in zip(self.rows, going):
            row.tokens, row.next_token = old[beam] + [token], token
        self.scores = [score for score, _, _ in going]
        engine.tables.count(slots, [token for _, _, token in going])

    def add_hypothesis(self, score, tokens, key, reason):
        """Keep a finished sequence among the num_beams best, one per key."""
        same = [h for h in self.hypotheses if h[2] == key]
        if same and same[0][0] >= score:
            return
        kept = [h for h in self.hypotheses if h[2] != key] + [(score, tokens, key, reason)]
        self.hypotheses = sorted(kept, key=lambda h: -h[0])[:len(self.rows)]  # stable: earlier first on a tie


def beam_rows(prompt, num_beams, max_tokens, stop_tokens=(), stops=None, **settings):
    """The engine rows of one beam search over `prompt` (add them together). stops: see Beams; settings:
    Row's repetition_penalty, presence_penalty, frequency_penalty and logit_bias."""
    if settings.get('draft'):
        raise SettingError('draft', "'draft' does not apply to a beam search (num_beams, best_of): leave one out")
    rows = [Row(prompt, max_tokens, temperature=0, stop_tokens=stop_tokens, **settings) for _ in range(num_beams)]
    group = Beams(rows, max_tokens, stop_tokens, stops)
    for row in rows:
        row.beam = group
    return rows


class PrefixCache:
    """The keys and values of sequences that ended (up to `budget` tokens, least recently used out
    first), matched with a new prompt by their tokens, longest common prefix first, against the
    engine's running rows and these remembered ones. Not blocks hashed by their prefix, as vLLM's
    paged cache needs: the engine's cache is one dense tensor per layer, so reuse is a copy of
    positions 0..m-1 either way, and a list of token lists finds the longest match in a few lines.
    A sequence supersedes the remembered ones it starts with (a chat's next turn replaces its last),
    so a long chat holds one copy of its history, not one a turn."""

    def __init__(self, budget):
        self.budget = budget
        self.saved = OrderedDict()  # token tuple -> its keys and values (layers, 2, kv heads, tokens, head size); LRU first

    def reuse(self, engine, slot, prompt):
        """Copy into row `slot` the keys and values of the longest start of prompt[:-1] (the part
        a prefill computes), in whole chunks, that a running row or a remembered sequence holds;
        its length."""
        want, best, source = list(prompt[:-1]), 0, None
        whole = lambda m: m // engine.prefill_chunk * engine.prefill_chunk  # noqa: E731
        for i, row in enumerate(engine.rows):
            m = whole(common_prefix(engine.held(row, i)[:row.prefilled], want)) if row.beam is None else 0
            if m > best:
                best, source = m, i
        for tokens, kv in self.saved.items():
            m = whole(common_prefix(tokens, want))
            if m > best:
                best, source = m, tokens
        for layer, (k, v) in enumerate(zip(engine.cache.k, engine.cache.v)):
            if isinstance(source, int):
                k[slot, :, :best], v[slot, :, :best] = k[source, :, :best], v[source, :, :best]
            elif source is not None:
                k[slot, :, :best], v[slot, :, :best] = self.saved[source][layer, :, :, :best]
        if isinstance(source, tuple):
            self.saved.move_to_end(source)
        return best

    def remember(self, engine, row, slot):
        """Keep the keys and values of a row that ends (its whole prefilled chunks, at most
        the budget), for a later prompt that starts the same way; the least recently used
        go first to make room."""
        budget = self.budget // engine.prefill_chunk * engine.prefill_chunk
        tokens = tuple(engine.held(row, slot)[:min(row.prefilled, budget)])
        if not tokens:
            return
        for held in list(self.saved):
            if common_prefix(held, tokens) == len(tokens):  # held already, in this one or a longer one
                self.saved.move_to_end(held)
                return
            if common_prefix(held, tokens) == len(held):  # a start of this one: superseded
                del self.saved[held]
        while self.saved and self.tokens_held() + len(tokens) > self.budget:
            self.saved.popitem(last=False)
        n = len(tokens)
        self.saved[tokens] = torch.stack([torch.stack((k[slot, :, :n], v[slot, :, :n]))
                                          for k, v in zip(engine.cache.k, engine.cache.v)])

    def tokens_held(self):
        return sum(len(tokens) for tokens in self.saved)


class Engine:
    """Rows 0..len(rows)-1 of the cache hold self.rows, in order; a step computes only those.

    The cache is sized once: block_size positions for a model with learned positions (a full
    row slides its window, as nanoGPT's crop does), block_size + max_new_tokens for rotary and
    ALiBi models (which read past block_size). Every prompt is cropped to its last block_size
    tokens. Token ids >= vocab_size (a padded vocabulary's extra rows) are never sampled.

    Prompts prefill in chunks of prefill_chunk tokens at fixed positions (0, c, 2c, ...): a chunk's
    keys and values then come out bit for bit the same whichever request computed them, and only
    those whole chunks are reused (by the prefix cache, PrefixCache, with prefix_cache_tokens > 0).
    Positions computed otherwise (a last partial chunk, decode steps) are computed again: in bfloat16
    their rounding differs enough to flip a near-tie later on."""

    def __init__(self, model, max_rows, max_new_tokens, vocab_size=None, seed=None, longest_prompt=None,
                 prefix_cache_tokens=0, prefill_chunk=64, draft_model=None):
        self.model, self.max_rows, self.max_new_tokens = model, max_rows, max_new_tokens
        cfg = model.config
        weight = model.transformer.wte.weight  # the model's float dtype even when its Linears are int8
        self.device = weight.device
        # prompts are cropped to the last block_size tokens; a caller that knows its prompts are
        # shorter (sample.py) gets a smaller cache, which is quicker to allocate
        self.window = min(longest_prompt or cfg.block_size, cfg.block_size)
        max_len = self.window + max_new_tokens
        if cfg.learned_positions:
            max_len = min(max_len, cfg.block_size)
        # On a CPU the cache is float32 whatever the weights: PyTorch's CPU attention kernel attends
        # a decode step's one query several times faster in float32 than in bfloat16 (GPT-2 shapes,
        # 2 cores, 1000 keys: 69 vs 518 us; see model.py). It costs twice a bfloat16 cache's memory
        # (GPT-2 124M, 8 rows of 1024 positions: 604 MB instead of 302).
        cache_dtype = torch.float32 if weight.device.type == 'cpu' else weight.dtype
        self.cache = KVCache(cfg, max_rows, max_len, weight.device, cache_dtype)
        self.vocab_size = min(vocab_size or cfg.vocab_size, cfg.vocab_size)
        self.rng = random.Random(seed)
        self.rows = []
        self.tables = SlotTables(max_rows, cfg.vocab_size, self.device)  # penalties, logit_bias, grammars
        self.prefill_chunk = prefill_chunk
        self.prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        # rows with draft='model': the draft model and a KV cache of its own for each (speculative.ModelDraft)
        self.draft = draft_model and (draft_model, lambda: KVCache(draft_model.config, 1, max_len, self.device, cache_dtype))

    # --- joining and leaving ---

    @torch.inference_mode()
    def add(self, rows):
        """Prefill `rows` into free rows of the cache. Rows with the same prompt (n samples of it)
        share one prefill; distinct prompts of one length are prefilled in one batched pass.
        On an exception none of them has joined."""
        n = len(self.rows)
        if n + len(rows) > self.max_rows:
            raise RuntimeError(f"{len(rows)} rows do not fit: {self.max_rows - n} of {self.max_rows} are free")
        for row in rows:
            bad = [t for t in row.prompt + list(row.logit_bias) if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise SettingError('prompt' if bad[0] in row.prompt else 'logit_bias',
                                   f"token id {bad[0]!r} is not in the vocabulary (0..{self.vocab_size - 1})")
            if row.draft == 'model' and not self.draft:
                raise SettingError('draft', "'draft' is 'model' but no draft model is loaded (draft=<its out_dir>)")
            if not 1 <= row.max_tokens <= self.max_new_tokens:  # a row always generates its first token
                raise SettingError('max_tokens', f"max_tokens is {row.max_tokens}; it must be 1 to {self.max_new_tokens}")
            if self.window < self.model.config.block_size and len(row.prompt) > self.window:
                raise SettingError('prompt', f"the prompt has {len(row.prompt)} tokens; this engine takes {self.window}")
        groups = {}  # each distinct (cropped) prompt and its rows, in order
        for row in rows:
            groups.setdefault(tuple(row.prompt[-self.window:]), []).append(row)
        prompts = list(groups)
        # a prompt whose start the prefix cache holds gets those positions copied in; its prefill starts there
        starts = [self.prefix.reuse(self, n + i, p) if self.prefix else 0 for i, p in enumerate(prompts)]
        # The cache holds all of a prompt but its last token, which the next step feeds like any
        # other row's newest token: every step is then one token per row.
        same = len({(len(p), start) for p, start in zip(prompts, starts)}) == 1
        batches = [list(range(len(prompts)))] if same else [[i] for i in range(len(prompts))]
        for batch in batches:
            view = self.cache.rows(n + batch[0], n + batch[-1] + 1)
            start, end = starts[batch[0]], len(prompts[batch[0]]) - 1
            view.lengths = [start] * len(batch)
            for at in range(start, end, self.prefill_chunk):  # start is a chunk's first position
                idx = torch.tensor([prompts[i][at:min(at + self.prefill_chunk, end)] for i in batch], device=self.device)
                self.model.hidden_states(idx, cache=view)
            self.cache.lengths[n + batch[0]:n + batch[-1] + 1] = view.lengths
        for i, group in enumerate(groups.values()):
            for row in group:
                row.cached_tokens, row.kv_start = starts[i], len(row.prompt) - len(prompts[i])
                row.prefilled = (len(prompts[i]) - 1) // self.prefill_chunk * self.prefill_chunk
        placed = [group[0] for group in groups.values()] + [row for group in groups.values() for row in group[1:]]
        source = {id(row): n + i for i, group in enumerate(groups.values()) for row in group}
        for slot, row in enumerate(placed, start=n):
            if slot >= n + len(prompts):  # another sample of a prompt prefilled above
                self.cache.copy_row(slot, self.cache, source[id(row)])
            row.next_token = row.prompt[-1]
            self.tables.init(slot, row)
        self.rows.extend(placed)

    @torch.inference_mode()  # the penalty and bias tables are inference tensors (made in add)
    def finish(self, row, reason):
        """End a row (a stop string, a client gone, ...): it leaves the engine now."""
        row.finish_reason = row.finish_reason or reason
        if self.prefix and row in self.rows and row.error is None and row.beam is None:
            self.prefix.remember(self, row, self.rows.index(row))
        if row in self.rows:
            slot, last = self.rows.index(row), len(self.rows) - 1
            if slot != last:  # move the last row into the freed slot, so rows stay 0..n-1
                self.cache.copy_row(slot, self.cache, last)
                self.tables.move(slot, last)
                self.rows[slot] = self.rows[last]
            self.rows.pop()

    def held(self, row, slot):
        """The tokens whose keys and values row `slot` of the cache holds, at positions 0, 1, ..."""
        return (row.prompt + row.tokens)[row.kv_start:row.kv_start + self.cache.lengths[slot]]

    def prefix_tokens_held(self):
        return self.prefix.tokens_held() if self.prefix else 0

    # --- one step ---

    @torch.inference_mode()
    def step(self):
        """A token for every row. Returns the rows this step touched: each got a new token
        (row.tokens[-1]) unless it failed (finish_reason 'error', row.error). Rows that ended
        (length, a stop token, an error) have left the engine. A fault in one row stays in
        that row: when the batched step raises, each row is retried alone to find it."""
        rows = list(self.rows)
        if not rows:
            return []
        runs = plan(self, rows)  # each speculating row's proposals: fed after its newest token
        width = 1 + max(map(len, runs.values()), default=0)
        logits = self._isolated(lambda part: self._forward(part, runs, width), rows)  # (n, width, vocab)
        for row in rows:
            row.stepped = 0
            if row.error is None and id(row) not in runs:  # the cache keeps the newest token's position only
                self.cache.lengths[self.rows.index(row)] -= width - 1
        for group in {id(r.beam): r.beam for r in rows if r.beam is not None}.values():
            try:  # a fault in one beam fails its whole search
                failed = next((r.error for r in group.rows if r.error is not None), None)
                if failed is not None:
                    raise failed
                group.step(self, logits[[rows.index(r) for r in group.rows], 0])
            except Exception as e:
                for r in group.rows:
                    r.error = r.error or e
        live = [r for r in rows if r.error is None and r.beam is None]
        speculating = [r for r in live if id(r) in runs]
        sampling = [r for r in live if not r.forced and id(r) not in runs]  # the others take their next forced token
        # each row's random draws, made once: a retry below must not move a row's random stream
        draws = {id(r): [(r.rng or self.rng).random() for _ in range(2 * len(runs[id(r)]) + 2 if id(r) in runs else 1)]
                 for r in sampling + speculating}
        tokens = self._isolated(lambda part: self._sample(part, logits[[rows.index(r) for r in part], 0],
                                                          [draws[id(r)][0] for r in part]), sampling)
        chosen = {id(row): [token] for row, token in zip(sampling, tokens.tolist())}
        # a speculating row takes the proposals the model agrees with, then a token of the model's own
        chosen.update(verify(self, speculating, logits[[rows.index(r) for r in speculating]], runs, draws))
        done = [(row, token) for row in live if row.error is None for token in chosen.get(id(row)) or [row.forced.popleft()]]
        self.tables.count([self.rows.index(row) for row, _ in done], [token for _, token in done])
        for row, token in done:
            row.sampled.append(id(row) in chosen)
            self._append(row, token)
        for row in rows:
            if row.error is not None:
                self.finish(row, 'error')
        return rows

    def _isolated(self, fn, rows):
        """fn(rows) -> a tensor with a row per row; on an exception, fn on each row alone, and
        the rows that still raise are marked failed (their result row is a zero)."""
        if not rows:
            return torch.zeros(0, dtype=torch.long)
        try:
            return fn(rows)
        except Exception:
            pass  # find the rows at fault, below
        parts = []
        for row in rows:
            try:
                parts.append(fn([row]))
            except Exception as e:
                row.error = e
                parts.append(None)
        good = next((p for p in parts if p is not None), torch.zeros(1, dtype=torch.long))
        return torch.cat([p if p is not None else torch.zeros_like(good[:1]) for p in parts])

    def _forward(self, rows, runs, width):
        """The logits (n, width, vocab) after each position fed: each row's newest token, then its proposals
        (runs), padded to width. `rows` is all the rows, or one row alone (slices of the cache, contiguous
        either way)."""
        first = self.rows.index(rows[0])
        for i, row in enumerate(rows):
            self._make_room(first + i, row)
        view = self.cache.rows(first, first + len(rows))
        idx = torch.tensor([([row.next_token] + runs.get(id(row), []) + [row.next_token] * width)[:width] for row in rows],
                           device=self.device)
        x = self.model.hidden_states(idx, cache=view)
        self.cache.lengths[first:first + len(rows)] = view.lengths
        return self.model.logits(x).float()

    def _make_room(self, slot, row):
        """A learned-position model cannot see past block_size. When a row's cache is full,
        prefill its last block_size-1 tokens again (the step then feeds the newest), so it
        sees exactly the window that nanoGPT's crop sees."""
        if self.cache.lengths[slot] < self.cache.max_len or not self.model.config.learned_positions:
            return
        window = (row.prompt + row.tokens)[-self.model.config.block_size:-1]
        row.kv_start = len(row.prompt) + len(row.tokens) - self.model.config.block_size
        row.prefilled = 0  # prefilled in one pass, not in chunks: nothing here is reused
        view = self.cache.rows(slot, slot + 1)
        view.lengths = [0]
        self.model.hidden_states(torch.tensor([window], device=self.device), cache=view)
        self.cache.lengths[slot] = view.lengths[0]

    def _sample(self, rows, logits, draws):
        """A token per row from its logits (n, vocab) and its random draw, each row with its own settings."""
        slots = torch.tensor([self.rows.index(r) for r in rows], device=self.device)
        x = self.tables.adjust(rows, slots, logits, self.vocab_size)
        setting = lambda name, dtype: torch.tensor([getattr(r, name) for r in rows], device=self.device, dtype=dtype)
        tokens = sample_tokens(x, setting('temperature', torch.float), setting('top_k', torch.long),
                               setting('top_p', torch.float), torch.tensor(draws, device=self.device))
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if wanted:
            entries = logprobs_of(logits[wanted], tokens[wanted], max(rows[i].logprobs for i in wanted), self.vocab_size)
            for i, (logprob, top) in zip(wanted, entries):
                rows[i].token_logprobs.append((logprob, top[:rows[i].logprobs]))
        return tokens

    @torch.inference_mode()
    def prompt_logprobs(self, prompt, n):
        """The logprobs entries of a prompt's own tokens, each given those before it: None for the
        first, and for any before the last block_size tokens (the prompt is cropped, as always)."""
        ids = prompt[-self.window:]
        x = self.model.hidden_states(torch.tensor([ids], device=self.device))
        entries = logprobs_of(self.model.logits(x[0, :-1]), torch.tensor(ids[1:], device=self.device), n,
                              self.vocab_size)
        return [None] * (len(prompt) - len(ids) + 1) + entries

    def _append(self, row, token):
        row.tokens.append(token)
        row.stepped += 1
        row.next_token = token
        if row.constraint is not None:
            try:  # the grammar library's fault stays in this row
                row.constraint.advance(token)
            except Exception as e:
                row.error = e
                self.finish(row, 'error')
                return
        if row.constraint is not None and row.constraint.done:  # the grammar is complete: nothing may follow
            self.finish(row, 'stop')
        elif token in row.stop_tokens:
            self.finish(row, 'stop')
        elif len(row.tokens) >= row.max_tokens:
            self.finish(row, 'length')


def common_prefix(a, b):
    """How many leading items two sequences share: bisection over slices, which compare at C speed."""
    lo, hi = 0, min(len(a), len(b))
    a, b = tuple(a), tuple(b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@torch.inference_mode()
def embed(model, ids):
    """One embedding of a sequence of token ids: the mean of the model's last hidden states over
    its tokens (llama-server's pooling 'mean'), a list of n_embd floats."""
    x = model.hidden_states(torch.tensor([ids], device=model.transformer.wte.weight.device))
    return x[0].float().mean(0).tolist()


def generate(model, prompts, max_new_tokens, seed=None, **settings):
    """What nanoGPT's model.generate did, through the engine: the new token ids for each prompt
    (a list of id lists, one row each, generated together). settings: Row's (temperature, top_k, ...);
    row i draws from seed + i."""
    engine = Engine(model, len(prompts), max_new_tokens, seed=seed, longest_prompt=max(map(len, prompts)))
    rows = [Row(p, max_new_tokens, seed=None if seed is None else seed + i, **settings) for i, p in enumerate(prompts)]
    engine.add(rows)
    while engine.rows:
        for row in engine.step():
            if row.error is not None:
                raise row.error
    return [row.tokens for row in rows]


@torch.inference_mode()
def continuation_logprobs(model, requests, vocab_size=None, batch_size=16):
    """How likely each request's continuation is after its context, the way lm-eval-harness scores a choice:
    requests are (context ids, continuation ids), each sequence cropped to its last block_size + 1 tokens.
    Returns the log probability of every continuation token given all before it (ids >= vocab_size, a padded
    vocabulary's extra rows, get none). Requests with the same model input (one-token continuations of one
    context: the letters of a question) share a forward; inputs go longest first, batch_size at a time,
    padded on the right, which causal attention never sees."""
    cfg = model.config
    device = model.transformer.wte.weight.device
    vocab_size = min(vocab_size or cfg.vocab_size, cfg.vocab_size)
    users = {}  # model input -> [(request index, its continuation tokens as targets)]
    for i, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError("a context must have at least one token")
        whole = (list(context) + list(continuation))[-(cfg.block_size + 1):]
        users.setdefault(tuple(whole[:-1]), []).append((i, whole[max(1, len(whole) - len(continuation)):]))
    out = [[] for _ in requests]
    inputs = sorted(users, key=len, reverse=True)
    for b in range(0, len(inputs), batch_size):
        batch = inputs[b:b + batch_size]
        idx = torch.tensor([list(s) + [0] * (len(batch[0]) - len(s)) for s in batch], device=device)
        x = model.hidden_states(idx)
        for row, s in enumerate(batch):
            n = max(len(t) for _, t in users[s])  # only the positions some continuation is scored at
            if n == 0:
                continue
            logits = model.logits(x[row, len(s) - n:len(s)]).float()
            logits[:, vocab_size:] = float('-inf')
            logprobs = logits.log_softmax(-1)
            for i, targets in users[s]:
                if targets:
                    picked = logprobs[n - len(targets):].gather(1, torch.tensor(targets, device=device)[:, None])
                    out[i] = picked[:, 0].tolist()
    return out
