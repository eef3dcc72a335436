"""
The decode engine: a fixed number of rows over one KV cache, decoded together one token per
step. Sequences join (their prompt is prefilled into a free row) and leave (their length, a
stop token, or the caller ending them) between steps; each row samples with its own
settings, every row in one vectorised call. sample.py, bench.py and serve.py all generate
through it.

It knows nothing about text: prompts and outputs are token ids. Stop *strings* are the
caller's (sample.py's TextStream spots them and calls Engine.finish), and so are a grammar (a
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

from model import KVCache

MIN_TEMPERATURE = 1e-5  # below this, dividing the logits by the temperature means nothing: greedy


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
    them and they get no logprobs entry."""

    def __init__(self, prompt, max_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None, stop_tokens=(),
                 logprobs=None, constraint=None):
        positive = ('top_p', 'repetition_penalty')  # these may not be 0 itself
        for name, value, kind, lo, hi in [  # a bool is no number here; an int is a float
                ('max_tokens', max_tokens, int, 0, None), ('temperature', temperature, float, 0, 1e6),
                ('top_k', top_k, int, 0, 2 ** 31 - 1), ('top_p', top_p, float, 0, 1),
                ('repetition_penalty', repetition_penalty, float, 0, 1e6), ('seed', seed, int, 0, 2 ** 64 - 1),
                ('presence_penalty', presence_penalty, float, -2, 2), ('frequency_penalty', frequency_penalty, float, -2, 2),
                ('logprobs', logprobs, int, 0, 20)]:
            if value is None and name in ('seed', 'logprobs'):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise SettingError(name, f"'{name}' must be {'a number' if kind is float else 'an integer'}, not {value!r}")
            if not lo <= value or (value == lo and name in positive) or (hi is not None and value > hi):  # NaN too
                rule = f"{'>' if name in positive else '>='} {lo}" + (f" and <= {hi}" if hi is not None else '')
                raise SettingError(name, f"'{name}' must be {rule}, not {value!r}")
        if not prompt:
            raise SettingError('prompt', "the prompt is empty")
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


class Beams:
    """num_beams rows searching together (beam_rows makes them): transformers' beam search with its
    defaults (length_penalty 1, early_stopping False). Each step every beam's log probabilities add
    to its score; the best 2 x num_beams continuations (more with several stop tokens) are ranked;
    those among the first num_beams that end (a stop token, or max_tokens) become hypotheses scored
    by sum / length, the best others continue. It ends when num_beams hypotheses are in and the best
    running beam, at its length, scores no better than the worst of them, or when nothing can
    continue. Then row i holds the i-th best hypothesis, and all leave the engine together."""

    def __init__(self, rows, max_tokens, stop_tokens):
        self.rows, self.max_tokens, self.stop_tokens = rows, max_tokens, set(stop_tokens)
        self.scores = [0.0] + [-1e9] * (len(rows) - 1)  # at first all beams are the same: only one counts
        self.hypotheses = []  # (score, tokens), best first, at most num_beams
        self.generated = 0


def beam_rows(prompt, num_beams, max_tokens, stop_tokens=()):
    """The engine rows of one beam search over `prompt` (add them together)."""
    rows = [Row(prompt, max_tokens, temperature=0, stop_tokens=stop_tokens) for _ in range(num_beams)]
    group = Beams(rows, max_tokens, stop_tokens)
    for row in rows:
        row.beam = group
    return rows


class Engine:
    """Rows 0..len(rows)-1 of the cache hold self.rows, in order; a step computes only those.

    The cache is sized once: block_size positions for a model with learned positions (a full
    row slides its window, as nanoGPT's crop does), block_size + max_new_tokens for rotary and
    ALiBi models (which read past block_size). Every prompt is cropped to its last block_size
    tokens. Token ids >= vocab_size (a padded vocabulary's extra rows) are never sampled.

    Prompts prefill in chunks of prefill_chunk tokens at fixed positions (0, c, 2c, ...): a chunk's
    keys and values then come out bit for bit the same whichever request computed them, and only
    those whole chunks are reused. Positions computed otherwise (a last partial chunk, decode steps)
    are computed again: in bfloat16 their rounding differs enough to flip a near-tie later on.

    The prefix cache matches those chunks by their tokens, longest common prefix first, against the
    rows running and a least-recently-used list of sequences that ended (not blocks hashed by their
    prefix, as vLLM's paged cache needs: ours is one dense tensor per layer, so reuse is a copy of
    positions 0..m-1 either way, and a list of token lists finds the longest match in a few lines).
    A sequence supersedes the remembered ones it starts with (a chat's next turn replaces its last),
    so a long chat holds one copy of its history, not one a turn."""

    def __init__(self, model, max_rows, max_new_tokens, vocab_size=None, seed=None, longest_prompt=None,
                 prefix_cache_tokens=0, prefill_chunk=64):
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
        self.counts = None  # (max_rows, vocab) token counts, made when a row first uses a penalty
        self.bias = None  # (max_rows, vocab) logit_bias, made when a row first uses one
        self.allowed = None  # (max_rows, vocab / 32) int32 bitmasks of the constrained rows, made when first used
        self.prefix_cache_tokens, self.prefill_chunk = prefix_cache_tokens, prefill_chunk
        self.saved = OrderedDict()  # token tuple -> its keys and values (layers, 2, kv heads, tokens, head size); LRU first

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
            if not 1 <= row.max_tokens <= self.max_new_tokens:  # a row always generates its first token
                raise SettingError('max_tokens', f"max_tokens is {row.max_tokens}; it must be 1 to {self.max_new_tokens}")
            if self.window < self.model.config.block_size and len(row.prompt) > self.window:
                raise SettingError('prompt', f"the prompt has {len(row.prompt)} tokens; this engine takes {self.window}")
        groups = {}  # each distinct (cropped) prompt and its rows, in order
        for row in rows:
            groups.setdefault(tuple(row.prompt[-self.window:]), []).append(row)
        prompts = list(groups)
        # a prompt whose start the prefix cache holds gets those positions copied in; its prefill starts there
        starts = [self._reuse(n + i, p) if self.prefix_cache_tokens else 0 for i, p in enumerate(prompts)]
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
            self._init_slot(slot, row)
        self.rows.extend(placed)

    def _init_slot(self, slot, row):
        V = self.model.config.vocab_size
        if row.uses_penalties:
            if self.counts is None:
                self.counts = torch.zeros(self.max_rows, V, device=self.device)
            self.counts[slot].zero_()
            self.counts[slot].index_add_(0, torch.tensor(row.prompt, device=self.device),
                                         torch.ones(len(row.prompt), device=self.device))
        if self.bias is not None:
            self.bias[slot].zero_()
        if row.logit_bias:
            if self.bias is None:
                self.bias = torch.zeros(self.max_rows, V, device=self.device)
            ids = torch.tensor(list(row.logit_bias), device=self.device)
            self.bias[slot, ids] = torch.tensor(list(row.logit_bias.values()), device=self.device, dtype=torch.float)

    @torch.inference_mode()  # the penalty and bias tables are inference tensors (made in add)
    def finish(self, row, reason):
        """End a row (a stop string, a client gone, ...): it leaves the engine now."""
        row.finish_reason = row.finish_reason or reason
        if self.prefix_cache_tokens and row in self.rows and row.error is None and row.beam is None:
            self._remember(row, self.rows.index(row))
        if row in self.rows:
            slot, last = self.rows.index(row), len(self.rows) - 1
            if slot != last:  # move the last row into the freed slot, so rows stay 0..n-1
                self.cache.copy_row(slot, self.cache, last)
                for table in (self.counts, self.bias):
                    if table is not None:
                        table[slot] = table[last]
                self.rows[slot] = self.rows[last]
            self.rows.pop()

    # --- the prefix cache ---

    def _held(self, row, slot):
        """The tokens whose keys and values row `slot` of the cache holds, at positions 0, 1, ..."""
        return (row.prompt + row.tokens)[row.kv_start:row.kv_start + self.cache.lengths[slot]]

    def _reuse(self, slot, prompt):
        """Copy into row `slot` the keys and values of the longest start of prompt[:-1] (the part
        a prefill computes), in whole chunks, that a running row or a remembered sequence holds;
        its length."""
        want, best, source = list(prompt[:-1]), 0, None
        whole = lambda m: m // self.prefill_chunk * self.prefill_chunk  # noqa: E731
        for i, row in enumerate(self.rows):
            m = whole(common_prefix(self._held(row, i)[:row.prefilled], want)) if row.beam is None else 0
            if m > best:
                best, source = m, i
        for tokens, kv in self.saved.items():
            m = whole(common_prefix(tokens, want))
            if m > best:
                best, source = m, tokens
        for layer, (k, v) in enumerate(zip(self.cache.k, self.cache.v)):
            if isinstance(source, int):
                k[slot, :, :best], v[slot, :, :best] = k[source, :, :best], v[source, :, :best]
            elif source is not None:
                k[slot, :, :best], v[slot, :, :best] = self.saved[source][layer, :, :, :best]
        if isinstance(source, tuple):
            self.saved.move_to_end(source)
        return best

    def _remember(self, row, slot):
        """Keep the keys and values of a row that ends (its whole prefilled chunks, at most
        prefix_cache_tokens), for a later prompt that starts the same way; the least recently used
        go first to make room."""
        budget = self.prefix_cache_tokens // self.prefill_chunk * self.prefill_chunk
        tokens = tuple(self._held(row, slot)[:min(row.prefilled, budget)])
        if not tokens:
            return
        for held in list(self.saved):
            if common_prefix(held, tokens) == len(tokens):  # held already, in this one or a longer one
                self.saved.move_to_end(held)
                return
            if common_prefix(held, tokens) == len(held):  # a start of this one: superseded
                del self.saved[held]
        while self.saved and self.prefix_tokens_held() + len(tokens) > self.prefix_cache_tokens:
            self.saved.popitem(last=False)
        n = len(tokens)
        self.saved[tokens] = torch.stack([torch.stack((k[slot, :, :n], v[slot, :, :n]))
                                          for k, v in zip(self.cache.k, self.cache.v)])

    def prefix_tokens_held(self):
        return sum(len(tokens) for tokens in self.saved)

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
        logits = self._isolated(self._forward, rows)
        for group in {id(r.beam): r.beam for r in rows if r.beam is not None}.values():
            try:  # a fault in one beam fails its whole search
                failed = next((r.error for r in group.rows if r.error is not None), None)
                if failed is not None:
                    raise failed
                self._beam_step(group, logits[[rows.index(r) for r in group.rows]])
            except Exception as e:
                for r in group.rows:
                    r.error = r.error or e
        live = [r for r in rows if r.error is None and r.beam is None]
        sampling = [r for r in live if not r.forced]  # the others take their next forced token
        # each row's random draw, made once: a retry below must not move a row's random stream
        draws = {id(r): (r.rng or self.rng).random() for r in sampling}
        tokens = self._isolated(lambda part: self._sample(part, logits[[rows.index(r) for r in part]],
                                                          [draws[id(r)] for r in part]), sampling)
        chosen = {id(row): token for row, token in zip(sampling, tokens.tolist())}
        done = [(row, chosen[id(row)] if id(row) in chosen else row.forced.popleft()) for row in live if row.error is None]
        if self.counts is not None and done:
            slots = [self.rows.index(row) for row, _ in done]
            self.counts[slots, [token for _, token in done]] += 1
        for row, token in done:
            row.sampled.append(id(row) in chosen)
            self._append(row, token)
        for row in rows:
            if row.error is not None:
                self.finish(row, 'error')
        return rows

    def _beam_step(self, group, logits):
        """One step of a beam search (Beams) from its rows' logits (num_beams, vocab)."""
        N, V = len(group.rows), logits.size(-1)
        logprobs = logits.float().clone()
        logprobs[:, self.vocab_size:] = float('-inf')
        total = logprobs.log_softmax(-1) + torch.tensor(group.scores, device=logits.device)[:, None]
        values, ids = total.view(-1).topk(max(2, 1 + len(group.stop_tokens)) * N)
        group.generated += 1
        old = [row.tokens for row in group.rows]
        candidates = [(v, i // V, i % V) for v, i in zip(values.tolist(), ids.tolist())]
        ends = [t in group.stop_tokens or group.generated >= group.max_tokens for _, _, t in candidates]
        new = [(v / group.generated, old[beam] + [t]) for (v, beam, t), end in zip(candidates[:N], ends) if end]
        group.hypotheses = sorted(group.hypotheses + new, key=lambda h: -h[0])[:N]  # stable: earlier first on a tie
        going = [c for c, end in zip(candidates, ends) if not end][:N]
        done = all(ends) or (len(group.hypotheses) == N and going[0][0] / group.generated <= group.hypotheses[-1][0])
        if done:
            for row, (_, tokens) in zip(group.rows, group.hypotheses):
                row.tokens = tokens
            for row in group.rows:
                self.finish(row, 'stop' if row.tokens[-1] in group.stop_tokens else 'length')
            return
        slots = [self.rows.index(row) for row in group.rows]
        parents = [slots[beam] for _, beam, _ in going]
        if parents != slots:  # each beam's row takes its parent's keys and values
            length = self.cache.lengths[slots[0]]
            for k, v in zip(self.cache.k, self.cache.v):
                k[slots, :, :length], v[slots, :, :length] = k[parents, :, :length], v[parents, :, :length]
        for row, (score, beam, token) in zip(group.rows, going):
            row.tokens, row.next_token = old[beam] + [token], token
        group.scores = [score for score, _, _ in going]

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

    def _forward(self, rows):
        """The logits (n, vocab) for each row's next token, feeding each row's newest token.
        `rows` is all the rows, or one row alone (slices of the cache, contiguous either way)."""
        first = self.rows.index(rows[0])
        for i, row in enumerate(rows):
            self._make_room(first + i, row)
        view = self.cache.rows(first, first + len(rows))
        idx = torch.tensor([[row.next_token] for row in rows], device=self.device)
        x = self.model.hidden_states(idx, cache=view)
        self.cache.lengths[first:first + len(rows)] = view.lengths
        return self.model.logits(x[:, -1]).float()

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
        x = logits
        if any(r.uses_penalties for r in rows):
            rep, presence, frequency = (torch.tensor(p, device=self.device)[:, None] for p in zip(*(r.penalties for r in rows)))
            x = apply_penalties(x, self.counts[slots], rep, presence, frequency)
        if self.bias is not None:
            x = x + self.bias[slots]
        # no NaN or infinity gets to the sampler, whatever a setting did to the logits
        x = torch.nan_to_num(x, nan=-1e30).clamp(-1e30, 1e30)
        if self.vocab_size < x.size(-1):
            x[:, self.vocab_size:] = float('-inf')
        if any(r.constraint is not None for r in rows):  # a grammar's rows and free rows, in the one call below
            x = x.masked_fill(~self._allowed(rows, x.size(-1)), float('-inf'))
        setting = lambda name, dtype: torch.tensor([getattr(r, name) for r in rows], device=self.device, dtype=dtype)
        tokens = sample_tokens(x, setting('temperature', torch.float), setting('top_k', torch.long),
                               setting('top_p', torch.float), torch.tensor(draws, device=self.device))
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if wanted:
            entries = self._logprobs(logits[wanted], tokens[wanted], max(rows[i].logprobs for i in wanted))
            for i, (logprob, top) in zip(wanted, entries):
                rows[i].token_logprobs.append((logprob, top[:rows[i].logprobs]))
        return tokens

    def _allowed(self, rows, V):
        """(n, V) bools: the ids each row's constraint allows next (every id for a row without one)."""
        if self.allowed is None:
            self.allowed = torch.zeros(self.max_rows, (V + 31) // 32, dtype=torch.int32)
        words = self.allowed[:len(rows)].fill_(-1)
        for i, row in enumerate(rows):
            if row.constraint is not None:
                row.constraint.fill_bitmask(words[i].numpy())  # the numpy view shares the tensor's memory
        allowed = ((words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(len(rows), -1)[:, :V].bool()
        if not bool(allowed.any(-1).all()):
            raise ValueError("the row's grammar allows no token")
        return allowed.to(self.device)

    def _logprobs(self, logits, tokens, n):
        """(log probability of each row's token, its n most likely alternatives as [(id, logprob)]):
        the model's own distribution, log-softmax at temperature 1 before any sampling filter."""
        logprobs = logits.float().clone()
        logprobs[:, self.vocab_size:] = float('-inf')
        logprobs = logprobs.log_softmax(-1)
        picked = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        top = logprobs.topk(max(n, 1))
        return [(p, list(zip(i[:n], v[:n]))) for p, i, v in zip(picked, top.indices.tolist(), top.values.tolist())]

    @torch.inference_mode()
    def prompt_logprobs(self, prompt, n):
        """The logprobs entries of a prompt's own tokens, each given those before it: None for the
        first, and for any before the last block_size tokens (the prompt is cropped, as always)."""
        ids = prompt[-self.window:]
        x = self.model.hidden_states(torch.tensor([ids], device=self.device))
        entries = self._logprobs(self.model.logits(x[0, :-1]), torch.tensor(ids[1:], device=self.device), n)
        return [None] * (len(prompt) - len(ids) + 1) + entries

    def _append(self, row, token):
        row.tokens.append(token)
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


def apply_penalties(logits, counts, repetition_penalty, presence_penalty, frequency_penalty):
    """Discourage tokens already seen (counts: (n, vocab) occurrences; penalties: (n, 1))."""
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    logits = torch.where(seen, penalised, logits)
    return logits - presence_penalty * seen.float() - frequency_penalty * counts


def sample_tokens(logits, temperature, top_k, top_p, uniform):
    """One token per row of logits (n, vocab), each row with its own settings, given as
    tensors of n: temperature (below MIN_TEMPERATURE: greedy), top_k (0: off; tokens tied
    with the k-th stay in), top_p (1: off; the most likely token always stays) and uniform,
    the row's random draw in [0, 1). The draw picks a token by inverse transform sampling over
    the kept tokens in id order, so a row gets the same token whatever the other rows are."""
    n, V = logits.shape
    sampled = temperature >= MIN_TEMPERATURE
    if not bool(sampled.any()):
        return logits.argmax(-1)
    greedy = 0 if bool(sampled.all()) else logits.argmax(-1)  # a pass over the vocabulary, skipped when unused
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    k_max = int(k.max())
    if k_max < V and bool((top_k > 0).all()):
        # the usual case (every row has a top_k): work on the best candidates only. Twice k_max
        # of them, as logits rounded to bfloat16 often tie at the cut (9 in 10 steps of a random
        # GPT-2, top_k 200); only a tie run past the last candidate needs the slow path.
        values, ids = logits.topk(min(2 * k_max, V))
        kth = values.gather(1, (k - 1)[:, None])
        if values.size(1) == V or bool((values[:, -1:] < kth).all()):
            keep = values >= kth
            weights = _nucleus(_weights(values.masked_fill(~keep, float('-inf')), temperature), top_p)
            by_id = ids.argsort(-1)
            choice = _draw(weights.gather(1, by_id), uniform)
            return torch.where(sampled, ids.gather(1, by_id).gather(1, choice[:, None])[:, 0], greedy)
    limited = (top_k > 0) & (top_k < V)
    if bool(limited.any()):  # keep each limited row's top_k (and ties); the other rows keep everything
        k_limited = int(k[limited].max())
        kth = logits.topk(k_limited).values.gather(1, (k.clamp(max=k_limited) - 1)[:, None])
        logits = logits.masked_fill((logits < kth) & limited[:, None], float('-inf'))
    weights = _weights(logits, temperature)
    if bool((top_p < 1).any()):
        ranked, order = weights.sort(descending=True)
        weights = torch.zeros_like(weights).scatter(1, order, _nucleus(ranked, top_p))
    return torch.where(sampled, _draw(weights, uniform), greedy)


def _weights(logits, temperature):
    """Unnormalised probabilities: the row's largest logit goes to 0 before the division by the
    temperature, so nothing overflows and the most likely token has weight 1."""
    t = temperature.clamp(min=MIN_TEMPERATURE)[:, None]
    return ((logits - logits.max(-1, keepdim=True).values) / t).exp()


def _nucleus(ranked, top_p):
    """top_p on weights sorted in descending order: drop a token when the tokens ranked above it
    already reach top_p of the total."""
    if not bool((top_p < 1).any()):
        return ranked
    above = ranked.cumsum(-1) - ranked
    drop = above >= top_p[:, None] * ranked.sum(-1, keepdim=True)
    drop[:, 0] = False
    return ranked.masked_fill(drop, 0.0)


def _draw(weights, uniform):
    """The column where each row's uniform draw lands in the cumulative weights."""
    cdf = weights.cumsum(-1)
    choice = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    return choice[:, 0].clamp(max=weights.size(-1) - 1)


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
