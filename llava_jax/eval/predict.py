"""Answer a question JSONL in batches with a model (the original release's answers JSONL).

Questions: one JSON object per line with `question_id`, `text` and optionally `image` (relative to the image
folder). `<image>\\n` goes in front of the text when there is an image, as the original `model_vqa*` scripts do.
Answers: `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per line, appended batch by
batch; a rerun skips the question_ids already answered, so a killed run resumes where it stopped.
jax and the model are imported only when answering, so that the evals' other commands start fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from typing import Any, Iterator, Optional

from llava_jax.data import conversation


def jsonl_records(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed line) of every non-empty line; ValueError naming `path:line` on bad JSON."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'file not found: {path}')
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_no}: not valid JSON ({e})') from None


def read_questions(path: str) -> list[dict]:
  questions, seen = [], set()
  for line_no, q in jsonl_records(path):
    if not isinstance(q, dict) or 'question_id' not in q or not isinstance(q.get('text'), str):
      raise ValueError(f'{path}:{line_no}: a question needs question_id and text')
    if q['question_id'] in seen:
      raise ValueError(f'{path}:{line_no}: duplicate question_id {q["question_id"]!r}')
    seen.add(q['question_id'])
    questions.append(q)
  return questions


def read_finished(path: str) -> set:
  """question_ids already in an answers file. A torn last line (killed mid-write) is cut off the file."""
  if not os.path.exists(path):
    return set()
  done, good, torn = set(), [], 0
  with open(path) as f:
    for line in f:
      try:
        done.add(json.loads(line)['question_id'])
        good.append(line if line.endswith('\n') else line + '\n')
      except (json.JSONDecodeError, KeyError, TypeError):
        torn += 1
  if torn:
    print(f'{path}: dropping {torn} unreadable line(s) from an interrupted run; they will be answered again',
          file=sys.stderr)
    with open(path, 'w') as f:
      f.writelines(good)
  return done


def add_answer_args(p, questions_help: Optional[str] = None) -> None:
  """The flags every 'answer a question JSONL with a model' command shares (LLaVA-Bench, ScienceQA)."""
  p.add_argument('--checkpoint', required=True, help='exported llava_jax model dir or HF LLaVA dir')
  p.add_argument('--questions', required=True, help=questions_help)
  p.add_argument('--image-folder', required=True)
  p.add_argument('--out', required=True, help='answers JSONL; finished question_ids are skipped on rerun')
  p.add_argument('--template', help="conversation template (default: the checkpoint's)")
  p.add_argument('--batch-size', type=int, default=8)
  p.add_argument('--max-new-tokens', type=int, default=1024)
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (as the original eval)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--model-id', help='model_id written to each answer (default: checkpoint dir name)')


def answer_questions(model_dir_or_hf, questions_jsonl: str, image_folder: Optional[str], out_jsonl: str, *,
                     template: Optional[str] = None, batch_size: int = 8, max_new_tokens: int = 1024,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     model_id: Optional[str] = None, tokenizer_path: Optional[str] = None,
                     image_aspect: Optional[str] = None, mesh=None, log=None) -> dict:
  """Answers every question of `questions_jsonl` not yet in `out_jsonl`; returns counts.

  `model_dir_or_hf`: a path, or an already loaded InferenceModel. Questions whose image file is missing are
  not answered (so a rerun retries them) and are counted under `missing_image`.
  """
  from llava_jax.generate import SamplingParams
  from llava_jax.inference import InferenceModel, generate_batch, load_inference_model, load_pixels, prompt_ids
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  im = model_dir_or_hf if isinstance(model_dir_or_hf, InferenceModel) else load_inference_model(
      model_dir_or_hf, tokenizer_path=tokenizer_path, template=template, image_aspect=image_aspect, mesh=mesh)
  if isinstance(model_dir_or_hf, InferenceModel) and template is not None:
    im = dataclasses.replace(im, template=template)
  model_id = model_id or os.path.basename(os.path.normpath(im.path))
  questions = read_questions(questions_jsonl)
  finished = read_finished(out_jsonl)
  todo = [q for q in questions if q['question_id'] not in finished]
  stats = {'questions': len(questions), 'already_answered': len(questions) - len(todo), 'answered': 0,
           'missing_image': 0}
  log(f'{questions_jsonl}: {len(questions)} questions, {stats["already_answered"]} already in {out_jsonl}, '
      f'{len(todo)} to answer (batch {batch_size}, template {im.template})')
  sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
  os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
  start, new_tokens = time.time(), 0
  with open(out_jsonl, 'a') as out:
    for b0 in range(0, len(todo), batch_size):
      batch, prompts, pixels, shown = [], [], [], []
      for q in todo[b0:b0 + batch_size]:
        text = q['text'].replace(conversation.IMAGE_TOKEN, '').strip()
        pix = None
        if q.get('image'):
          if image_folder is None:
            raise ValueError(f'question {q["question_id"]!r} has an image but no image folder was given')
          try:
            pix = load_pixels(im, os.path.join(image_folder, q['image']))
          except (OSError, ValueError) as e:
            stats['missing_image'] += 1
            log(f'skipping question {q["question_id"]!r}: {e}')
            continue
          text = conversation.IMAGE_TOKEN + '\n' + text
        batch.append(q)
        prompts.append(prompt_ids(im, [{'from': 'human', 'value': text}]))
        pixels.append(pix)
        shown.append(text)
      if not batch:
        continue
      out_batch = generate_batch(im, prompts, pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                                 seed=seed + b0, batch_size=batch_size)
      for q, prompt, answer in zip(batch, shown, out_batch.texts):
        out.write(json.dumps({'question_id': q['question_id'], 'prompt': prompt, 'text': answer.strip(),
                              'answer_id': uuid.uuid4().hex, 'model_id': model_id, 'metadata': {}}) + '\n')
      out.flush()
      stats['answered'] += len(batch)
      new_tokens += int(out_batch.lengths.sum())
      elapsed = time.time() - start
      log(f'[{stats["already_answered"] + min(b0 + batch_size, len(todo))}/{len(questions)}] '
          f'{new_tokens / elapsed:.1f} new tokens/s')
  if stats['missing_image']:
    log(f'warning: {stats["missing_image"]} question(s) skipped for a missing/unreadable image; rerun after '
        'fixing them to answer the rest')
  log(json.dumps(stats))
  return stats

