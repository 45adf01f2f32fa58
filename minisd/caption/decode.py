"""Greedy and beam-search decoding, token for token what transformers' `generate` does (transformers 5:
`GenerationMixin._sample` with do_sample=False, `_beam_search`), for any autoregressive decoder.

The decoder is a function `step(ids_new, cache) -> (logits, cache)`:
- `ids_new` (N, n): the tokens not yet fed: the whole prompt on the first call, then one token per row;
- `cache`: a list of tensors with the batch in dim 0 (the image features the decoder cross-attends to, keys and
  values of the positions already fed, ...), whatever the step needs; `generate` never looks inside: beam
  search feeds the prompts once, repeats each row of the returned cache `num_beams` times, and reorders rows
  (`t[rows]`) when beams are re-ranked;
- `logits` (N, V): the scores of the next token after the last position.
Beam search keeps the k beams of prompt i in rows i*k .. i*k+k-1 throughout (reordering moves rows only within
a prompt's group), so a step may keep per-prompt tensors (B rows) outside the cache and map row r to r // k.

Lengths count the prompt: `max_length` and `min_length` are lengths of the whole sequence, prompt included (as
transformers' `max_length` / `min_length`). Processing of the scores (transformers' LogitsProcessor order):
repetition penalty (Keskar et al. 2019: a seen token's score s becomes s/p if s > 0, else s*p), then the
minimum length (the end tokens get -inf while the sequence is shorter than `min_length`).

Greedy: next = argmax of the processed logits; a row that has ended (an end token, or `max_length` reached)
gets `pad_token_id` from then on; stop when every row has ended.

Beam search (the vectorised form of transformers 5; Graves 2012, Sutskever et al. 2014 for the idea). Each
prompt keeps k = num_beams running hypotheses with scores s = sum of log-probabilities, and k finished ones.
Per step:
1. log p = log_softmax(logits) (then processed), candidate score s + log p over all k*V continuations; keep the
   best K = max(2, 1 + #end tokens) * k (enough that k can go on even if k of them end).
2. A candidate "ends" if its token is an end token or its length reaches max_length. The best k candidates that
   do not end are next step's running beams.
3. Ending candidates among the top k (by rank) are scored s / (generated length)^length_penalty and merged with
   the finished list, which keeps the best k. None are added once "no improvement is possible" (below), or
   once all k are finished when early_stopping is True.
4. "Improvement possible" (early_stopping False): the best running score divided by the current generated
   length^length_penalty still beats the worst finished score (or fewer than k are finished). ("never" with a
   positive length penalty uses max_length instead of the current length.)
5. Stop when no prompt can improve, or (early_stopping True) all are full, or every candidate ended.
The answer is each prompt's best finished hypothesis, all cut to the longest one returned; the tail after a
hypothesis' end is filled with pad_token_id, or with the first end token when pad_token_id is 0 (transformers
writes `pad_token_id or eos_token_id`, and 0 is falsy: BLIP's beam outputs end in [SEP]s, its greedy ones in
[PAD]s). Scores outside the candidates are -1e9 and the arithmetic is float32 in transformers' order, so ties
and near-ties fall the same way.
"""
import torch
import torch.nn.functional as F

NEG = -1.0e9        # transformers' "minus infinity" for beam bookkeeping (a float, not -inf: it must add)


def process_scores(ids, scores, eos, min_length, repetition_penalty):
    """transformers' RepetitionPenaltyLogitsProcessor then MinLengthLogitsProcessor, on (N, V) scores."""
    if repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, ids)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, ids, seen)
    if ids.shape[-1] < min_length:
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)
        scores = torch.where(is_eos, float("-inf"), scores)
    return scores


@torch.no_grad()
def generate(step, input_ids, *, num_beams=1, max_length=20, min_length=0, eos_token_id, pad_token_id,
             cache=(), length_penalty=1.0, early_stopping=False, repetition_penalty=1.0):
    """Prompts (B, L) -> (B, L + generated) token ids. `eos_token_id` is an int or a list of ints; `cache` is the
    step's initial cache, one row per prompt (it is repeated for the beams)."""
    if not (isinstance(num_beams, int) and num_beams >= 1):
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not (isinstance(max_length, int) and max_length > input_ids.shape[1]):
        raise ValueError(f"max_length {max_length!r} leaves no room after a prompt of {input_ids.shape[1]} tokens")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       device=input_ids.device)
    settings = dict(max_length=max_length, min_length=min_length, eos=eos, pad=pad_token_id,
                    repetition_penalty=repetition_penalty)
    if num_beams == 1:
        return _greedy(step, input_ids, list(cache), **settings)
    return _beam_search(step, input_ids, list(cache), num_beams, length_penalty, early_stopping, **settings)


def _greedy(step, ids, cache, max_length, min_length, eos, pad, repetition_penalty):
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    logits, cache = step(ids, cache)
    while True:
        scores = process_scores(ids, logits.float(), eos, min_length, repetition_penalty)
        token = torch.where(unfinished, scores.argmax(dim=-1), pad)                      # (B,)
        ids = torch.cat([ids, token[:, None]], dim=1)
        unfinished &= ~torch.isin(token, eos) & (ids.shape[1] < max_length)
        if not unfinished.any():
            return ids
        logits, cache = step(token[:, None], cache)


def _beam_search(step, input_ids, cache, k, length_penalty, early_stopping, max_length, min_length, eos, pad,
                 repetition_penalty):
    B, prompt_len = input_ids.shape
    device = input_ids.device
    keep = max(2, 1 + len(eos)) * k
    in_top_k = torch.arange(keep, device=device) < k                  # rank among the kept candidates
    fill = pad if pad else int(eos[0])                                # transformers' `pad_token_id or eos`
    rows = torch.arange(B, device=device)[:, None]

    running = torch.full((B, k, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None]
    running_scores = torch.zeros(B, k, device=device)
    running_scores[:, 1:] = NEG                                       # all beams start equal: expand beam 0 only
    finished = running.clone()                                        # the k best finished hypotheses
    finished_scores = torch.full((B, k), NEG, device=device)
    finished_len = torch.zeros(B, k, dtype=torch.long, device=device)  # tokens generated in each
    is_finished = torch.zeros(B, k, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)

    # The k beams of a prompt start as the same sequence: the prompt is fed once per prompt and its logits and
    # cache are repeated (transformers feeds k copies; the same numbers, k times the work).
    logits, cache = step(input_ids, list(cache))
    logits, cache = logits.repeat_interleave(k, dim=0), [t.repeat_interleave(k, dim=0) for t in cache]
    cur_len = prompt_len
    while True:
        V = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process_scores(running[:, :, :cur_len].reshape(B * k, cur_len), log_probs, eos, min_length,
                                   repetition_penalty)
        log_probs = (log_probs.view(B, k, V) + running_scores[:, :, None]).view(B, k * V)

        # 1. the best `keep` continuations over all beams
        top_scores, top_index = torch.topk(log_probs, keep)                      # (B, keep)
        top_beam, top_token = top_index // V, top_index % V
        candidates = running[rows, top_beam]                                     # (B, keep, max_length)
        candidates[:, :, cur_len] = top_token
        ends = torch.isin(top_token, eos) | (cur_len + 1 >= max_length)          # (B, keep)

        # 2. the best k that go on
        alive_scores = top_scores + ends.to(torch.float32) * NEG
        best = torch.topk(alive_scores, k)[1]
        running, running_scores = candidates[rows, best], alive_scores[rows, best]
        parent = top_beam[rows, best]                                            # (B, k) beam each came from

        # 3. the ones that end, among the top k, join the finished list if they beat it
        just_finished = ends & in_top_k
        final_scores = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        final_scores += full.to(torch.float32) * NEG
        final_scores += (~can_improve).to(torch.float32) * NEG
        final_scores += (~just_finished) * NEG
        merged_scores = torch.cat([finished_scores, final_scores], dim=1)
        best = torch.topk(merged_scores, k)[1]
        finished = torch.cat([finished, candidates], dim=1)[rows, best]
        finished_scores = merged_scores[rows, best]
        new_len = torch.full_like(top_token, cur_len + 1 - prompt_len)
        finished_len = torch.cat([finished_len, new_len], dim=1)[rows, best]
        is_finished = torch.cat([is_finished, just_finished], dim=1)[rows, best]

        # 4. can the running beams still beat the worst finished one?
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_possible = running_scores[:, :1] / (best_length ** length_penalty)
        worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG)
        can_improve = can_improve & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)

        # 5. stop?
        if not (can_improve.any() and not (is_finished.all() and early_stopping is True) and not ends.all()):
            break
        order = (parent + rows * k).reshape(-1)                                  # rows of the flat cache
        cache = [t[order] for t in cache]
        logits, cache = step(running[:, :, cur_len - 1].reshape(B * k, 1), cache)

    longest = int(finished_len[:, 0].max())
    return finished[:, 0, :prompt_len + longest]
