"""Load a model for inference and answer a question JSONL in batches (the original release's answers JSONL).

Questions: one JSON object per line with `question_id`, `text` and optionally `image` (relative to the image
folder). `<image>\\n` goes in front of the text when there is an image, as the original `model_vqa*` scripts do.
Answers: `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per line, appended batch by
batch; a rerun skips the question_ids already answered, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from typing import Any, Optional

import numpy as np

from llava_jax.data import conversation, image as image_lib, tokenize
from llava_jax.generate import Sampler, SamplingParams, pad_batch

DEFAULT_TEMPLATE = 'vicuna_v1'


@dataclasses.dataclass
class InferenceModel:
  sampler: Sampler
  tokenizer: Any
  template: str
  image_aspect: str
  path: str

  @property
  def config(self):
    return self.sampler.config


def check_tokenizer(tokenizer, config, where: str) -> None:
  """Raises ValueError when the tokenizer cannot drive this model (no `<image>` token, other id, larger vocab)."""
  added = tokenizer.get_added_vocab()
  if conversation.IMAGE_TOKEN not in added:
    raise ValueError(f'{where}: the tokenizer has no {conversation.IMAGE_TOKEN!r} token; it does not belong to '
                     f'this LLaVA checkpoint (expected image_token_id {config.image_token_id})')
  if added[conversation.IMAGE_TOKEN] != config.image_token_id:
    raise ValueError(f'{where}: tokenizer maps {conversation.IMAGE_TOKEN!r} to id '
                     f'{added[conversation.IMAGE_TOKEN]} but the model expects {config.image_token_id}: '
                     'checkpoint/tokenizer mismatch')
  if len(tokenizer) > config.text.vocab_size:
    raise ValueError(f'{where}: tokenizer has {len(tokenizer)} tokens but the model vocabulary is '
                     f'{config.text.vocab_size}: checkpoint/tokenizer mismatch')


def load_inference_model(path: str, *, tokenizer_path: Optional[str] = None, template: Optional[str] = None,
                         image_aspect: Optional[str] = None, dtype: Optional[str] = None,
                         mesh=None) -> InferenceModel:
  """An exported llava_jax model dir (`llava_jax.checkpoint`) or an HF LLaVA dir -> InferenceModel.

  Template: argument, else the one saved with the model, else 'vicuna_v1'. Image aspect: argument, else
  `image_aspect` in model_config.json when present, else 'square'.
  """
  from llava_jax import checkpoint  # orbax; imported only when loading
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory not found: {path}')
  saved_aspect = None
  if checkpoint.is_model_dir(path):
    shardings = None
    if mesh is not None:  # restore straight onto the mesh rather than through one device
      from llava_jax import sharding
      from llava_jax.models.llava import abstract_params, param_logical_axes
      config = checkpoint.load_config(path)[0]
      shardings = sharding.logical_to_mesh(param_logical_axes(config), abstract_params(config), mesh)
    config, params, tokenizer, saved_template = checkpoint.load_model(path, shardings=shardings, dtype=dtype)
    with open(os.path.join(path, checkpoint.CONFIG_FILE)) as f:
      saved_aspect = json.load(f).get('image_aspect')
    from llava_jax.models.llava import Llava
    model = Llava(config)
  elif os.path.isfile(os.path.join(path, 'config.json')):
    from llava_jax.convert.hf_to_flax import load_hf_llava
    model, params = load_hf_llava(path, dtype=dtype)
    config, saved_template, tokenizer = model.config, None, None
    if any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'tokenizer.model')):
      import transformers
      tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  else:
    raise FileNotFoundError(f'{path} is neither an exported llava_jax model dir (model_config.json + params/) '
                            'nor an HF LLaVA dir (config.json)')
  if tokenizer_path is not None:
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
  if tokenizer is None:
    raise ValueError(f'{path} holds no tokenizer; pass one with --tokenizer DIR')
  check_tokenizer(tokenizer, config, tokenizer_path or path)
  template = template or saved_template or DEFAULT_TEMPLATE
  conversation.get_template(template)  # fails early naming the allowed templates
  image_aspect = image_aspect or saved_aspect or 'square'
  if image_aspect not in image_lib.ASPECTS:
    raise ValueError(f'image aspect {image_aspect!r}; allowed: {image_lib.ASPECTS}')
  return InferenceModel(Sampler(model, params, mesh=mesh), tokenizer, template, image_aspect, path)


def stop_strings_for(template: str) -> tuple[str, ...]:
  """Text that ends an answer besides EOS: the turn separator of `###` / plain templates (as the original)."""
  t = conversation.get_template(template)
  if t.style == 'single':
    return (t.sep,)
  if t.style == 'plain':
    return ('\n',)
  return ()


def prompt_ids(im: InferenceModel, messages) -> np.ndarray:
  """LLaVA JSON turns ending with a user turn -> generation-prompt token ids int32[n]."""
  return tokenize.tokenize_prompt(messages, im.tokenizer, im.template, im.config.num_image_tokens)


def load_pixels(im: InferenceModel, path: str) -> np.ndarray:
  """Image file -> float32 [H, W, 3] preprocessed for this model."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image not found: {path}')
  return image_lib.preprocess_image(image_lib.load_image(path), im.config.vision.image_size, im.image_aspect)


def generate_batch(im: InferenceModel, prompts, pixels, *, max_new_tokens: int, sampling: SamplingParams,
                   seed: int = 0, batch_size: Optional[int] = None, stream=None, pad_multiple: int = 64):
  """Token-id prompts (+ per-prompt pixels or None) -> GenerateOutput for the real prompts.

  Prompts are left-padded to a multiple of `pad_multiple` and the batch is filled up to `batch_size` with copies
  of the first prompt, so a run compiles only a few shapes.
  """
  n = len(prompts)
  batch_size = max(batch_size or n, n)
  prompts = list(prompts) + [prompts[0]] * (batch_size - n)
  pixels = list(pixels) + [pixels[0]] * (batch_size - n)
  tok = im.tokenizer
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  ids, mask = pad_batch(prompts, pad_id, pad_multiple)
  size = im.config.vision.image_size
  pixel_values = np.stack([p if p is not None else image_lib.blank_image(size) for p in pixels])
  out = im.sampler(ids, mask, pixel_values, max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_token_id=tok.eos_token_id, pad_token_id=pad_id, stop_strings=stop_strings_for(im.template),
                   tokenizer=tok, seed=seed, stream=stream)
  out.tokens, out.lengths = out.tokens[:n], out.lengths[:n]
  out.finish_reasons, out.texts = out.finish_reasons[:n], out.texts[:n]
  return out


def read_questions(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'question file not found: {path}')
  questions, seen = [], set()
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        q = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_no}: invalid JSON ({e})') from e
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


def answer_questions(model_dir_or_hf, questions_jsonl: str, image_folder: Optional[str], out_jsonl: str, *,
                     template: Optional[str] = None, batch_size: int = 8, max_new_tokens: int = 1024,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     model_id: Optional[str] = None, tokenizer_path: Optional[str] = None,
                     image_aspect: Optional[str] = None, mesh=None, log=None) -> dict:
  """Answers every question of `questions_jsonl` not yet in `out_jsonl`; returns counts.

  `model_dir_or_hf`: a path, or an already loaded InferenceModel. Questions whose image file is missing are
  not answered (so a rerun retries them) and are counted under `missing_image`.
  """
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
