"""Score an exported model on the demo's held-out QA (llava_jax.demo.synthetic `qa.json`).

  python -m llava_jax.demo.qa --model workdir/demo/stage2/model --qa workdir/demo/data/qa.json \\
      --images workdir/demo/data/images [--out scores.json]

Each question is asked in the model's template with its image, answered greedily and compared after
`synthetic.normalize_answer` (lower-case first word) with the one-word answer. The same is done with every image
replaced by a blank one ("blind"): a model that looks at the image scores far above the chance level of the
questions (the mean of 1 / number of choices); blind, it cannot beat chance, because every question text is
paired with every answer equally often.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable, Optional

import numpy as np


def load_items(qa_file: str) -> list[dict]:
  with open(qa_file, encoding='utf-8') as f:
    items = json.load(f)
  for i, it in enumerate(items):
    missing = [k for k in ('image', 'question', 'answer', 'choices') if k not in it]
    if missing:
      raise ValueError(f'{qa_file}: item {i} lacks {missing}')
  return items


def chance_accuracy(items) -> float:
  return float(np.mean([1.0 / len(it['choices']) for it in items])) if items else 0.0


def answer_all(m, sampler, items: list[dict], image_dir: str, *, blind: bool, batch_size: int,
               max_new_tokens: int, log: Callable[[str], None] = print) -> list[str]:
  """Greedy answers (decoded text) for every item; images preprocessed like training (or blank when blind).

  `m`: the model_dir.LoadedModel, `sampler`: its Sampler (shared by both passes: one compiled program)."""
  from llava_jax.data.image import blank_image, load_image, preprocess_image
  from llava_jax.data.tokenize import tokenize_prompt
  from llava_jax.generate import pad_batch

  config, tokenizer, template = m.config, m.tokenizer, m.template
  size = config.vision.image_size
  prompts = [tokenize_prompt([{'from': 'human', 'value': '<image>\n' + it['question']}], tokenizer, template,
                             config.num_image_tokens) for it in items]
  longest = max(len(p) for p in prompts)  # one prompt length for all batches: one compiled program
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  answers = []
  for start in range(0, len(items), batch_size):
    chunk = list(range(start, min(start + batch_size, len(items))))
    rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed batch shape
    ids, mask = pad_batch([prompts[i] for i in rows], pad_id)
    if ids.shape[1] < longest:
      extra = longest - ids.shape[1]
      ids = np.concatenate([np.full((len(rows), extra), pad_id, np.int32), ids], axis=1)
      mask = np.concatenate([np.zeros((len(rows), extra), np.int32), mask], axis=1)
    if blind:
      pixels = np.stack([blank_image(size)] * len(rows))
    else:
      pixels = np.stack([preprocess_image(load_image(os.path.join(image_dir, items[i]['image'])), size)
                         for i in rows])
    out = sampler(ids, mask, pixels, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=pad_id, tokenizer=tokenizer)
    answers += out.texts[:len(chunk)]
    log(f'demo qa{" (blind)" if blind else ""}: {len(answers)}/{len(items)} answered')
  return answers


def score(items: list[dict], answers: list[str]) -> dict:
  from llava_jax.demo.synthetic import normalize_answer
  correct = [normalize_answer(a) == it['answer'] for it, a in zip(items, answers)]
  by_type = collections.defaultdict(list)
  for it, ok in zip(items, correct):
    by_type[it.get('type', 'all')].append(ok)
  return {'accuracy': float(np.mean(correct)) if correct else 0.0,
          'by_type': {t: round(float(np.mean(v)), 4) for t, v in sorted(by_type.items())}}


def evaluate(path: str, qa_file: str, image_dir: str, *, batch_size: int = 64, max_new_tokens: int = 4,
             log: Callable[[str], None] = print, examples: int = 5) -> dict:
  """accuracy, blind_accuracy (blank images), chance_accuracy, per question type, a few example answers."""
  from llava_jax import model_dir
  from llava_jax.generate import Sampler
  from llava_jax.models.llava import Llava
  items = load_items(qa_file)
  m = model_dir.load_model(path, require_tokenizer=True)
  if m.template is None:
    raise ValueError(f'{path}: the exported model needs its template to be scored')
  sampler = Sampler(Llava(m.config), m.params)
  seen, blind = (answer_all(m, sampler, items, image_dir, blind=b, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, log=log) for b in (False, True))
  s, b = score(items, seen), score(items, blind)
  return {'accuracy': round(s['accuracy'], 4), 'blind_accuracy': round(b['accuracy'], 4),
          'chance_accuracy': round(chance_accuracy(items), 4), 'num_questions': len(items),
          'accuracy_by_type': s['by_type'], 'blind_accuracy_by_type': b['by_type'], 'model': path,
          'examples': [{'question': it['question'].split('\n')[0], 'answer': it['answer'], 'predicted': p,
                        'predicted_blind': q} for it, p, q in list(zip(items, seen, blind))[:examples]]}


def main(argv: Optional[list[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m llava_jax.demo.qa', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', required=True, help='exported model directory (with tokenizer/ and template)')
  p.add_argument('--qa', required=True, help='qa.json written by llava_jax.demo.synthetic')
  p.add_argument('--images', required=True, help='folder the qa.json image names are relative to')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--max-new-tokens', type=int, default=4)
  p.add_argument('--out', default=None, help='write the scores here as JSON')
  args = p.parse_args(argv)
  for flag, path in (('--model', args.model), ('--qa', args.qa), ('--images', args.images)):
    if not os.path.exists(path):
      print(f'error: {flag} {path}: no such file or directory', file=sys.stderr)
      return 1
  try:
    result = evaluate(args.model, args.qa, args.images, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
