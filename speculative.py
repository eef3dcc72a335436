"""
Speculative decoding, the engine's (engine.py alone imports this). A row with a draft proposes the tokens
it guesses come next, and the step's one forward checks them all: the engine feeds the row's newest token
and its K proposals (K+1 positions of its KV cache), the row keeps the proposals the model agrees with and
one token of the model's own, and the engine takes the cache back to what was kept. At batch 1 a step is
bound by reading the weights, so K+1 positions cost about what one does: every accepted proposal is a
token for free.

The proposers: 'ngram' (prompt lookup): the most recent earlier occurrence of the context's last 3 tokens
(else 2, else 1) proposes the tokens that followed it. No second model; it pays where the answer repeats
its context (quoting, editing, continuing a list). 'model': a smaller model with the same tokenizer (the
engine's draft_model) proposes its greedy continuation, K steps of its own per step of the model's.

Checking keeps the model's distribution. A greedy row takes a proposal while it is the argmax. A sampled
row takes proposal x with probability p(x), p being the distribution plain sampling draws from (after the
penalties, logit_bias, top_k, temperature and top_p, sampling.probabilities), and on a rejection draws from
p with x removed and renormalised: the accept/reject rule of speculative sampling (Leviathan et al. 2023;
Chen et al. 2023) for a proposer that puts all its probability on x. Each position's penalties count the
tokens taken before it, as one token a step would.
"""
import torch

from sampling import MIN_TEMPERATURE, draw, logprobs_of, probabilities

DRAFTS = ('', 'ngram', 'model')  # '' is off; 'model': the engine's draft model


class Proposer:
    """A row's proposer. How many it proposes adapts: 2 more after a run taken whole (up to the row's
    draft_tokens), 1 fewer after one cut short. A run the model refuses whole makes the row skip the next
    1, 2, 4, ... 16 steps' proposals (one taken resets it): where nothing is guessed right, a step then
    almost never pays for the extra positions (or the draft model's steps)."""
    misses = wait = size = 0  # runs refused in a row; steps still to skip; tokens to propose (0: draft_tokens)

    def settle(self, proposed, accepted, most):
        """After a run was checked: how many it proposed, how many of them the model took, the row's draft_tokens."""
        self.size = min(proposed + 2, most) if accepted == proposed else max(1, proposed - 1)
        self.misses = 0 if accepted else self.misses + 1
        self.wait = 0 if accepted else min(2 ** (self.misses - 1), 16)


class ModelDraft(Proposer):
    """A smaller model with the same tokenizer proposes its greedy continuation (a deterministic proposer:
    verify's rule stays exact). It keeps the row's keys and values in a cache of its own, taken back each
    step to what the row's context still shares with what it held."""

    def __init__(self, model, cache, vocab_size):
        self.model, self.cache, self.vocab_size = model, cache, vocab_size
        self.held = []  # the ids whose keys and values the cache holds, at positions 0, 1, ...

    def propose(self, context, k):
        cfg = self.model.config
        room = (min(self.cache.max_len, cfg.block_size) if cfg.learned_positions else self.cache.max_len) - k
        if len(context) > room:  # past the draft's cache: a window of the latest tokens, prefilled afresh
            context, self.held = context[-(room // 2):], []
        n = 0
        while n < min(len(self.held), len(context) - 1) and self.held[n] == context[n]:
            n += 1
        self.cache.lengths = [n]
        feed, out = context[n:], []
        with torch.inference_mode():
            for _ in range(k):
                x = self.model.hidden_states(torch.tensor([feed], device=self.cache.k[0].device), cache=self.cache)
                feed = [int(self.model.logits(x[0, -1])[:self.vocab_size].argmax())]
                out += feed
        self.held = context + out[:-1]
        return out


class PromptLookup(Proposer):
    """One row's index of the n-grams (1 to 3 ids) of its context, grown as its tokens come."""

    def __init__(self):
        self.latest = {}  # n-gram -> the position just after its latest occurrence that something followed
        self.seen = 1  # positions 1..seen-1 are indexed (as the position after an n-gram)

    def propose(self, context, k):
        """k ids (none when nothing matches): those that followed the latest earlier occurrence of the context's
        last 3, 2 or 1 ids."""
        for end in range(self.seen, len(context)):
            for n in (1, 2, 3):
                if end >= n:
                    self.latest[tuple(context[end - n:end])] = end
        self.seen = max(self.seen, len(context))
        for n in (3, 2, 1):
            end = self.latest.get(tuple(context[-n:])) if len(context) >= n else None
            if end is not None:  # a copy that runs into the present goes on copying itself (a period shorter than k)
                copy = context[end:end + k]
                while len(copy) < k:
                    copy.append(copy[len(copy) - (len(context) - end)])
                return copy
        return []


def plan(engine, rows):
    """{id(row): the ids it proposes now} for the rows that speculate this step: a draft set, no forced
    tokens queued, and room for the run in its max_tokens and in every row's cache (a step feeds all its
    rows the same number of positions: rows without a run are padded, their extra positions dropped)."""
    for row in rows:
        row.drafted = (0, 0)  # (proposed, accepted) this step: serve.py's /metrics counts them
    wanting = [r for r in rows if r.draft and not r.forced and r.beam is None and r.error is None]
    if not wanting:
        return {}
    top = engine.cache.max_len - 1  # a full row slides back to here before it is fed (Engine._make_room)
    room = top - max(min(n, top) for n in engine.cache.lengths[:len(engine.rows)])
    runs = {}
    for row in wanting:
        k = min(row.proposer.size if row.proposer and row.proposer.size else row.draft_tokens,
                row.max_tokens - len(row.tokens) - 1, room)
        if row.proposer is None:
            model, cache = engine.draft or (None, None)
            row.proposer = PromptLookup() if row.draft == 'ngram' else ModelDraft(model, cache(), engine.vocab_size)
        if row.proposer.wait:
            row.proposer.wait -= 1
        elif k > 0:
            try:  # a draft model's fault stays in its row
                ids = row.proposer.propose(row.prompt + row.tokens, k)
            except Exception as e:
                row.error, ids = e, []
            if ids:
                runs[id(row)] = ids
    return runs


def verify(engine, rows, logits, runs, draws):
    """{id(row): the tokens it takes} for the speculating rows, from their logits (n, width, vocab) at each
    fed position and their random draws (two a position); their logprobs entries go on the rows, and each
    row's cache keeps the positions of the proposals it took (the forward left width). A fault is retried
    row by row; the rows that still fail get row.error and no entry."""
    try:
        out = _verify(engine, rows, logits, runs, draws)
    except Exception:  # find the rows at fault
        out = {}
        for i, row in enumerate(rows):
            try:
                out.update(_verify(engine, [row], logits[i:i + 1], runs, draws))
            except Exception as e:
                row.error = e
    for row in rows:
        if id(row) in out:
            tokens, entries, accepted = out[id(row)]
            engine.cache.lengths[engine.rows.index(row)] += len(tokens) - logits.size(1)
            row.token_logprobs += entries
            row.drafted = (len(runs[id(row)]), accepted)
            row.proposer.settle(len(runs[id(row)]), accepted, row.draft_tokens)
    return {key: tokens for key, (tokens, _, _) in out.items()}


def _verify(engine, rows, logits, runs, draws):
    device = logits.device
    taken, entries, counted, accepted = [[] for _ in rows], [[] for _ in rows], [], [0] * len(rows)
    going = list(range(len(rows)))  # rows still taking: each position after one accepted proposal
    try:
        for j in range(logits.size(1)):
            if not going:
                break
            part = [rows[i] for i in going]
            slots = [engine.rows.index(r) for r in part]
            x = engine.tables.adjust(part, torch.tensor(slots, device=device), logits[going, j], engine.vocab_size)
            run = [runs[id(r)] for r in part]
            proposed = torch.tensor([ids[j] if j < len(ids) else -1 for ids in run], device=device)
            if all(r.temperature < MIN_TEMPERATURE for r in part):  # greedy: the argmax, taken or not
                best = x.argmax(-1)
                accept, tokens = proposed == best, best.tolist()
            else:
                setting = lambda name, dtype: torch.tensor([getattr(r, name) for r in part], device=device, dtype=dtype)  # noqa: E731
                p = probabilities(x, setting('temperature', torch.float), setting('top_k', torch.long),
                                  setting('top_p', torch.float))
                u = torch.tensor([draws[id(r)][2 * j:2 * j + 2] for r in part], device=device, dtype=torch.float)
                at = proposed.clamp(min=0)[:, None]
                accept = (proposed >= 0) & (u[:, 0] < p.gather(1, at)[:, 0])
                rest = torch.where((proposed >= 0)[:, None], p.scatter(1, at, 0.0), p)  # a refused x is not drawn again
                tokens = torch.where(accept, proposed, draw(rest, u[:, 1])).tolist()
            engine.tables.count(slots, tokens)
            counted.append((slots, tokens))
            wanted = [i for i, r in enumerate(part) if r.logprobs is not None]
            if wanted:
                found = logprobs_of(logits[[going[i] for i in wanted], j], torch.tensor([tokens[i] for i in wanted]),
                                    max(part[i].logprobs for i in wanted), engine.vocab_size)
                for i, (logprob, top) in zip(wanted, found):
                    entries[going[i]].append((logprob, top[:part[i].logprobs]))
            still = []
            for i, row, token, ok in zip(going, part, tokens, accept.tolist()):
                taken[i].append(token)
                accepted[i] += ok
                if ok and token not in row.stop_tokens and token not in row.pause_tokens:
                    still.append(i)
            going = still
    finally:  # each position's penalties counted the tokens taken before it; the engine counts them for good
        for slots, tokens in reversed(counted):
            engine.tables.count(slots, tokens, by=-1)
    return {id(row): out for row, *out in zip(rows, taken, entries, accepted)}
