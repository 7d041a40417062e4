"""Instruction data for fine-tuning: jsonl records → token rows with a loss mask.

Three kinds of jsonl file, one JSON object per line:

- training and loss evaluation: `{"prompt": ..., "completion": ...}` (the text is
  prompt + completion, the loss on the completion and the end-of-text token after it),
  or `{"messages": [{"role": ..., "content": ...}, ...]}` (a chat, rendered as
  `"{role}: {content}\\n"` per message, the loss on the assistant messages' content,
  their newline, and the end-of-text token when the chat ends with one);
- multiple choice: `{"question" or "prompt": ..., "choices": [...], "answer": index or
  letter}`; a `question` is rendered `"{question}\\nAnswer:"` and each choice continues
  it as `" {choice}"` (lm-evaluation-harness's MMLU format), a `prompt` is used as it is
  and each choice continues it verbatim;
- generation (exact match): `{"prompt": ..., "answer": ...}`.

Rows are padded (each example alone in its row, right-padded; exact under causal
attention, since no real token attends to a later pad) or packed (examples joined
end to end, cut into rows: no padding, but attention is not reset at example
boundaries, so an example also sees the end of the one before it).

`python -m train.instruct build --out data/stdlib_mc` writes the offline example set:
the standard library's module docstrings, each to be matched with its module's name.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sysconfig
from typing import Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class InstructError(ValueError):
  """A record that cannot be used; the message names the file, the line and the field."""


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, object) of each non-empty line of `path`."""
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise InstructError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno})"
                              ) from None
        if not isinstance(record, dict):
          raise InstructError(f"{path}:{number}: expected a JSON object")
        out.append((number, record))
  except (OSError, UnicodeDecodeError) as e:
    raise InstructError(f"{path}: cannot read ({e})") from None
  if not out:
    raise InstructError(f"{path}: no records (the file is empty)")
  return out


def _text(record: dict, field: str, where: str) -> str:
  value = record.get(field)
  if not isinstance(value, str):
    raise InstructError(f"{where}: field \"{field}\" must be a string, got "
                        f"{type(value).__name__ if field in record else 'nothing'}")
  return value


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def example(record: dict, tokenizer, where: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, target mask) of a prompt/completion or messages record; `mask[i]` says
  whether token `i` is trained on (predicted from the tokens before it)."""
  pieces: list[tuple[str, bool]] = []
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise InstructError(f"{where}: field \"messages\" must be a non-empty list")
    for i, message in enumerate(messages):
      at = f"{where}: messages[{i}]"
      if not isinstance(message, dict):
        raise InstructError(f"{at} must be an object with \"role\" and \"content\"")
      role, content = _text(message, "role", at), _text(message, "content", at)
      if role not in ROLES:
        raise InstructError(f"{at}: field \"role\" must be one of {', '.join(ROLES)}, "
                            f"got {role!r}")
      pieces += [(f"{role}: ", False), (content + "\n", role == "assistant")]
    if not any(m["role"] == "assistant" for m in messages):
      raise InstructError(f"{where}: field \"messages\" has no assistant message to "
                          "train on")
    last = messages[-1]["role"] == "assistant"
  elif "prompt" in record or "completion" in record:
    pieces = [(_text(record, "prompt", where), False),
              (_text(record, "completion", where), True)]
    if not pieces[1][0]:
      raise InstructError(f"{where}: field \"completion\" is empty")
    last = True
  else:
    raise InstructError(f"{where}: expected fields \"prompt\" and \"completion\", or "
                        f"\"messages\"; got {sorted(record)}")
  tokens, mask = [], []
  if tokenizer.bos_id is not None:
    tokens.append(np.asarray([tokenizer.bos_id], np.int32))
    mask.append(np.zeros(1, bool))
  for text, trained in pieces:
    ids = _encode(tokenizer, text)
    tokens.append(ids)
    mask.append(np.full(len(ids), trained))
  tokens.append(np.asarray([tokenizer.eos_id], np.int32))
  mask.append(np.asarray([last]))
  return np.concatenate(tokens), np.concatenate(mask)


@dataclasses.dataclass
class Rows:
  """Token rows (n, T+1) and their loss mask (n, T) on the predicted tokens."""
  tokens: np.ndarray
  mask: np.ndarray
  truncated: int = 0  # examples cut short by the row length

  def __len__(self) -> int:
    return len(self.tokens)


def pad_rows(examples, length: int, pad_id: int) -> Rows:
  """One example per row of `length + 1` tokens, right-padded with `pad_id` (masked
  out); a longer example keeps its last `length + 1` tokens (the prompt is cut from the
  left, so the completion survives)."""
  tokens = np.full((len(examples), length + 1), pad_id, np.int32)
  mask = np.zeros((len(examples), length + 1), bool)
  truncated = 0
  for i, (ids, trained) in enumerate(examples):
    if len(ids) > length + 1:
      ids, trained, truncated = ids[-(length + 1):], trained[-(length + 1):], truncated + 1
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, trained
  return Rows(tokens, mask[:, 1:], truncated)


def pack_rows(examples, length: int, pad_id: int) -> Rows:
  """The examples joined end to end (each ends with end-of-text) and cut into rows of
  `length + 1` tokens that overlap by one (each row predicts `length` new tokens); the
  last row is padded. Attention is not reset at example boundaries."""
  ids = np.concatenate([e[0] for e in examples])
  trained = np.concatenate([e[1] for e in examples])
  n = max(1, -(-(len(ids) - 1) // length))
  total = n * length + 1
  ids = np.concatenate([ids, np.full(total - len(ids), pad_id, np.int32)])
  trained = np.concatenate([trained, np.zeros(total - len(trained), bool)])
  index = np.arange(n)[:, None] * length + np.arange(length + 1)
  return Rows(ids[index], trained[index][:, 1:])


def load_examples(path: str, tokenizer):
  """(tokens, target mask) of every prompt/completion or messages record of `path`."""
  return [example(record, tokenizer, f"{path}:{number}")
          for number, record in read_jsonl(path)]


def sample_rows(rows: Rows, seed: int, step: int, batch_size: int):
  """Training batch `step`: `batch_size` rows drawn as a pure function of
  `(seed, step)` (a resumed run sees the same batches)."""
  pick = np.random.default_rng([seed, step]).integers(0, len(rows), size=batch_size)
  return rows.tokens[pick], rows.mask[pick]


@dataclasses.dataclass
class Choice:
  """A multiple-choice question: the prompt, the continuations, the right one's index."""
  prompt: str
  choices: list[str]
  answer: int


def load_choices(path: str) -> list[Choice]:
  out = []
  for number, record in read_jsonl(path):
    where = f"{path}:{number}"
    if "question" in record:
      prompt, space = _text(record, "question", where) + "\nAnswer:", " "
    elif "prompt" in record:
      prompt, space = _text(record, "prompt", where), ""
    else:
      raise InstructError(f"{where}: expected field \"question\" or \"prompt\"")
    choices = record.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)):
      raise InstructError(f"{where}: field \"choices\" must be a list of at least two "
                          "non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
      answer = ord(answer.upper()) - ord("A")
    if isinstance(answer, bool) or not isinstance(answer, int) or not (
        0 <= answer < len(choices)):
      raise InstructError(f"{where}: field \"answer\" must be an index in [0, "
                          f"{len(choices) - 1}] or a letter A-{chr(64 + len(choices))}, "
                          f"got {record.get('answer')!r}")
    out.append(Choice(prompt, [space + c for c in choices], answer))
  return out


def choice_rows(questions: Sequence[Choice], tokenizer, length: int, pad_id: int) -> Rows:
  """One row per (question, choice), question-major: the prompt then the choice, the
  mask on the choice's tokens (its log-likelihood is the score)."""
  examples = []
  for q in questions:
    prompt = _encode(tokenizer, q.prompt)
    if tokenizer.bos_id is not None:
      prompt = np.concatenate([[tokenizer.bos_id], prompt]).astype(np.int32)
    for c in q.choices:
      ids = _encode(tokenizer, c)
      examples.append((np.concatenate([prompt, ids]),
                       np.concatenate([np.zeros(len(prompt), bool), np.ones(len(ids), bool)])))
  return pad_rows(examples, length, pad_id)


def load_generations(path: str) -> list[tuple[str, str]]:
  """(prompt, answer) of each record of a generation (exact-match) file."""
  return [(_text(r, "prompt", f"{path}:{n}"), _text(r, "answer", f"{path}:{n}"))
          for n, r in read_jsonl(path)]


def final_answer(text: str) -> str:
  """The part compared by exact match: after the last `####` if there is one (GSM8K's
  answer mark), whitespace collapsed."""
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  return " ".join(text.split())


# The offline example: "which module does this docstring describe?"

def stdlib_docstrings(max_chars: int = 100) -> list[tuple[str, str]]:
  """(module name, first paragraph of its docstring) for the standard library's pure-
  Python modules (parsed, never imported), sorted by name; docstrings under 40
  characters and private modules are left out."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in (
        "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
        "idlelib", "turtledemo", "lib2to3", "ensurepip"))
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].replace(os.sep, ".")
      module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
      if any(part.startswith("_") for part in module.split(".")):
        continue
      try:
        with open(os.path.join(dirpath, name), "rb") as f:
          doc = ast.get_docstring(ast.parse(f.read()))
      except (SyntaxError, ValueError):
        continue
      paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
      if len(paragraph) >= 40:
        out.append((module, paragraph[:max_chars]))
  return sorted(out)


def _is_validation(module: str, fraction: float) -> bool:
  digest = hashlib.sha256(module.encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def build_stdlib(out: str, *, val_fraction: float = 0.25, seed: int = 0,
                 variants: tuple[int, int] = (4, 2)) -> dict:
  """Writes the stdlib multiple-choice set to `out/`: `train.jsonl` (prompt/completion),
  and for the held-out modules `val.jsonl` (the same format, for the loss),
  `val_mc.jsonl` (four choices) and `val_gen.jsonl` (exact match of the name). Modules
  are split by a hash of their name; each question lists four names of its own split,
  the right one at a random place; each module is asked `variants` (train, val) times
  with other wrong choices. Returns the counts of modules and questions."""
  docs = stdlib_docstrings()
  rng = random.Random(seed)
  split = {"train": [d for d in docs if not _is_validation(d[0], val_fraction)],
           "val": [d for d in docs if _is_validation(d[0], val_fraction)]}
  os.makedirs(out, exist_ok=True)
  counts = {}
  with contextlib.ExitStack() as stack:
    files = {name: stack.enter_context(open(os.path.join(out, name), "w")) for name in
             ("train.jsonl", "val.jsonl", "val_mc.jsonl", "val_gen.jsonl")}
    for (part, items), repeat in zip(split.items(), variants):
      names = [m for m, _ in items]
      counts[part] = len(items)
      for _ in range(repeat):
        for module, doc in items:
          choices = rng.sample([m for m in names if m != module], 3)
          choices.insert(rng.randrange(4), module)
          prompt = (f"Which module does this docstring describe?\n{doc}\n"
                    f"Choices: {', '.join(choices)}\nModule:")
          files[f"{part}.jsonl"].write(
              json.dumps({"prompt": prompt, "completion": f" {module}"}) + "\n")
          if part == "val":
            files["val_mc.jsonl"].write(json.dumps(
                {"prompt": prompt, "choices": [f" {c}" for c in choices],
                 "answer": choices.index(module)}) + "\n")
            files["val_gen.jsonl"].write(json.dumps(
                {"prompt": prompt, "answer": module}) + "\n")
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m train.instruct",
                              description="Builds the offline stdlib instruction set.")
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser("build", help="docstring → module name, four choices")
  b.add_argument("--out", default="data/stdlib_mc")
  b.add_argument("--val-fraction", type=float, default=0.25)
  b.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not 0 < args.val_fraction < 1:
    p.error(f"--val-fraction: must be in (0, 1), got {args.val_fraction}")
  counts = build_stdlib(args.out, val_fraction=args.val_fraction, seed=args.seed)
  print(f"{args.out}: {counts['train']} training and {counts['val']} held-out modules "
        "(train.jsonl, val.jsonl, val_mc.jsonl, val_gen.jsonl)")


if __name__ == "__main__":
  main()
