"""Fine-tuning evaluations: completion loss, multiple-choice accuracy, exact match.

- Loss and perplexity of the completions (`steps.make_masked_eval_step`).
- Multiple choice by log-likelihood: each choice's continuation is scored by the sum of
  its tokens' log-probabilities given the prompt; the prediction is the highest sum
  (`acc`) or the highest mean per token (`acc_norm`, which does not favour short
  choices), as lm-evaluation-harness reports them.
- Exact match of greedy generations: a simple loop without a KV cache. The prompt sits
  in a fixed-length buffer (one compiled program whatever the prompt's length); each of
  `max_new_tokens` iterations runs the model over the whole buffer and writes the
  argmax after the last known token of each row. Causal attention makes the tokens after
  it irrelevant, so rows of different lengths share one batch. The cost is
  `max_new_tokens` full forward passes (no cache), which is fine for evaluating small
  models and short answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def choice_accuracy(nll: np.ndarray, count: np.ndarray, questions) -> dict[str, float]:
  """`acc` and `acc_norm` of the question-major rows' summed negative log-likelihoods
  `nll` over `count` choice tokens (`instruct.choice_rows`' order)."""
  right = right_norm = 0
  i = 0
  for q in questions:
    n = len(q.choices)
    scores = -nll[i:i + n]
    right += int(np.argmax(scores) == q.answer)
    right_norm += int(np.argmax(scores / np.maximum(count[i:i + n], 1)) == q.answer)
    i += n
  return {"mc_acc": right / len(questions), "mc_acc_norm": right_norm / len(questions)}


def make_greedy_fn(graphdef, max_new_tokens: int, eos_id: int):
  """generate(params, tokens (b, L) int32, lengths (b,)) → tokens with up to
  `max_new_tokens` greedy tokens written after each row's `lengths` prompt tokens
  (L ≥ max length + max_new_tokens); a row stops growing after it writes `eos_id`."""
  def generate(params, tokens, lengths):
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(tokens.shape[1])

    def body(i, carry):
      tokens, done = carry
      last = (lengths + i - 1)[:, None]  # the newest known token of each row
      # selections by comparison, not gathers: a batch-sharded buffer stays sharded
      here = (positions == last)[..., None]
      logits = jnp.sum(jnp.where(here, model(tokens).astype(jnp.float32), 0.0), axis=1)
      new = jnp.argmax(logits, axis=-1).astype(tokens.dtype)
      new = jnp.where(done, eos_id, new)
      tokens = jnp.where(positions == last + 1, new[:, None], tokens)
      return tokens, done | (new == eos_id)

    done = lengths < 0  # all False, laid out like the batch
    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, done))
    return tokens
  return generate


def prompt_buffer(prompts, tokenizer, length: int, max_new_tokens: int, pad_id: int):
  """(tokens (n, length), lengths (n,)): each prompt's tokens left in a buffer with room
  for `max_new_tokens` (a longer prompt keeps its end)."""
  keep = length - max_new_tokens
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, prompt in enumerate(prompts):
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if tokenizer.bos_id is not None:
      ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
    ids = ids[-keep:]
    tokens[i, :len(ids)], lengths[i] = ids, len(ids)
  return tokens, lengths


def generated_text(tokens: np.ndarray, lengths: np.ndarray, tokenizer) -> list[str]:
  """The text each row generated after its prompt, up to its end-of-text token."""
  out = []
  for row, n in zip(tokens, lengths):
    new = list(row[n:])
    if tokenizer.eos_id in new:
      new = new[:new.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(new))
  return out
