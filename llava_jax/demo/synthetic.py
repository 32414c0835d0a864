"""Built-in demo dataset: procedurally drawn shapes with their symbolic description.

Each image holds 1..max_objects large, saturated shapes (circle / square / triangle in red, green,
blue or yellow) in distinct cells of a grid on a white canvas. From the symbolic scene (captions +
boxes `category: [x1, y1, x2, y2]` normalized to 0..1, the form the paper feeds GPT-4) come:

  stage1.json  caption samples (`<image>` + a brief-description instruction -> one caption)
  stage2.json  instruction samples of the paper's three kinds: conversation (multi-turn Q/A, mostly
               one-word answers), detailed description, complex reasoning
  qa.json      held-out QA on other images: [{"id", "image", "question", "answer", "choices", "type"}],
               one-word answers scored exactly; every question text is paired with every answer equally
               often, so the text alone gives chance accuracy (meta.json: `chance_accuracy`)
  annotations/{captions,instances}_{train,qa}.json  COCO-format captions and boxes of the same images
  images/*.png, meta.json, tokenizer/ (build_demo_tokenizer: byte-level BPE, HF format)

Everything is a deterministic function of the seed; image i does not depend on how many are drawn.

  python -m llava_jax.demo.synthetic --out /tmp/demo --num-train 2000 --num-qa 192 --image-size 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import string
import sys
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.data.conversation import IMAGE_TOKEN, SYSTEM_HUMAN, SYSTEM_LLAMA_2, SYSTEM_USER

COLORS = {'red': (220, 30, 30), 'green': (30, 170, 50), 'blue': (30, 70, 230), 'yellow': (245, 205, 20)}
SHAPES = ('circle', 'square', 'triangle')
BACKGROUND = (255, 255, 255)
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SHORT_ANSWER = 'Answer the question using a single word or phrase.'

BRIEF_INSTRUCTIONS = (
    'Describe the image briefly.', 'Give a short caption for this image.', 'What does the picture show?',
    'Summarize the image in one sentence.', 'Write a brief description of the image.',
    'Provide a concise caption.')
DETAIL_INSTRUCTIONS = (
    'Describe the image in detail.', 'Give a detailed description of this picture.',
    'Explain everything you can see in the image.', 'Describe each shape in the image and where it is.')
QA_TYPES = ('color', 'shape', 'count', 'exists')
# How far off its cell's centre an object may sit, as a fraction of the room its size leaves. Small, so that a ViT
# with one patch per cell tells the shapes apart after minutes of CPU training; the size still varies.
JITTER = 0.25


@dataclasses.dataclass(frozen=True)
class Obj:
  color: str
  shape: str
  box: tuple          # (x1, y1, x2, y2) normalized to 0..1
  position: str       # 'top left', ..., or 'center'

  @property
  def name(self) -> str:
    return f'{self.color} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple

  def symbolic(self, captions: Sequence[str]) -> str:
    """The text-only view the paper gives GPT: captions, blank line, `category: [x1, y1, x2, y2]`."""
    boxes = [f'{o.name}: [' + ', '.join(f'{v:.3f}' for v in o.box) + ']' for o in self.objects]
    return '\n'.join(list(captions) + [''] + boxes)


def _grid(max_objects: int) -> int:
  return 1 if max_objects == 1 else 2 if max_objects <= 4 else 3


def _position(row: int, col: int, grid: int) -> str:
  if grid == 1:
    return 'center'
  rows = ('top', 'bottom') if grid == 2 else ('top', 'middle', 'bottom')
  cols = ('left', 'right') if grid == 2 else ('left', 'center', 'right')
  return 'center' if (rows[row], cols[col]) == ('middle', 'center') else f'{rows[row]} {cols[col]}'


def place(rng: np.random.Generator, kinds: Sequence[tuple[str, str]], max_objects: int) -> Scene:
  """Puts (color, shape) objects into distinct random grid cells, each 65-90% of its cell, near its centre."""
  grid = _grid(max_objects)
  if len(kinds) > grid * grid:
    raise ValueError(f'{len(kinds)} objects do not fit a {grid}x{grid} grid')
  cells = rng.permutation(grid * grid)[:len(kinds)]
  objects = []
  for (color, shape), cell in zip(kinds, cells):
    row, col = divmod(int(cell), grid)
    size = rng.uniform(0.65, 0.9) / grid
    free = 1 / grid - size  # room left in the cell; the object sits within JITTER * free of its centre
    x1 = col / grid + free / 2 + rng.uniform(-0.5, 0.5) * JITTER * free
    y1 = row / grid + free / 2 + rng.uniform(-0.5, 0.5) * JITTER * free
    box = tuple(round(float(v), 3) for v in (x1, y1, x1 + size, y1 + size))
    objects.append(Obj(color, shape, box, _position(row, col, grid)))
  return Scene(tuple(objects))


def random_kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  colors, shapes = list(COLORS), list(SHAPES)
  return [(colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]) for _ in range(n)]


def draw(scene: Scene, image_size: int) -> Image.Image:
  img = Image.new('RGB', (image_size, image_size), BACKGROUND)
  d = ImageDraw.Draw(img)
  for o in scene.objects:
    x1, y1, x2, y2 = (round(v * image_size) for v in o.box)
    fill = COLORS[o.color]
    if o.shape == 'circle':
      d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif o.shape == 'square':
      d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
      d.polygon(((x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)), fill=fill)
  return img


# ----------------------------------------------------------------------------- language

def _join(parts: Sequence[str]) -> str:
  return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _count(n: int, noun: str = 'shape') -> str:
  return f'{NUMBERS[n]} {noun}{"s" if n != 1 else ""}'


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _count_each(values: Sequence[str]) -> str:
  """['circle', 'square', 'circle'] -> 'two circles and a square' (in order of first appearance)."""
  parts = []
  for v in dict.fromkeys(values):
    k = values.count(v)
    parts.append(f'a {v}' if k == 1 else _count(k, v))
  return _join(parts)


def captions(scene: Scene) -> list[str]:
  """Five short captions, as COCO has five per image, naming the objects in the scene's (random) order. One
  counts the shapes by kind whatever their colour ('two circles and a square') and one names each shape before
  its colour ('a circle in red'): a captioner then has to find an object by its shape as well as by its colour."""
  names = [f'a {o.name}' for o in scene.objects]
  placed = [f'a {o.name} in the {o.position}' for o in scene.objects]
  n = len(scene.objects)
  return [f'{_cap(_join(names))}.', f'{_cap(_count(n))} on a white background: {_join(names)}.',
          f'An image of {_count_each([o.shape for o in scene.objects])}.', f'{_cap(_join(placed))}.',
          f'A simple drawing: {_join([f"a {o.shape} in {o.color}" for o in scene.objects])}.']


def _unique(scene: Scene, attr: str) -> list[Obj]:
  values = [getattr(o, attr) for o in scene.objects]
  return [o for o in scene.objects if values.count(getattr(o, attr)) == 1]


def qa_question(qtype: str, **kw) -> str:
  q = {'color': 'What color is the {shape}?', 'shape': 'What shape is the {color} object?',
       'count': 'How many shapes are there?', 'exists': 'Is there a {color} {shape}?'}[qtype]
  return q.format(**kw) + '\n' + SHORT_ANSWER


def short_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  """One short-answer question about the scene with a definite one-word answer."""
  options = ['count', 'exists']
  options += ['color'] if _unique(scene, 'shape') else []
  options += ['shape'] if _unique(scene, 'color') else []
  qtype = options[rng.integers(len(options))]
  if qtype == 'color':
    o = _unique(scene, 'shape')[rng.integers(len(_unique(scene, 'shape')))]
    return qa_question('color', shape=o.shape), o.color
  if qtype == 'shape':
    o = _unique(scene, 'color')[rng.integers(len(_unique(scene, 'color')))]
    return qa_question('shape', color=o.color), o.shape
  if qtype == 'count':
    return qa_question('count'), NUMBERS[len(scene.objects)]
  # Half the time an object of the scene, else an absent kind: a random kind would be absent ~85% of the time,
  # and a small model then learns "no" as the answer to every such question.
  present = sorted({(o.color, o.shape) for o in scene.objects})
  absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
  yes = rng.random() < 0.5
  color, shape = present[rng.integers(len(present))] if yes else absent[rng.integers(len(absent))]
  return qa_question('exists', color=color, shape=shape), 'yes' if yes else 'no'


def long_qa(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
  o = scene.objects[rng.integers(len(scene.objects))]
  if rng.random() < 0.5:
    return f'Where is the {o.name}?', f'The {o.name} is in the {o.position} of the image.'
  return (f'What is in the {o.position} of the image?',
          f'There is a {o.name} in the {o.position} of the image.')


def conversation_sample(scene: Scene, rng: np.random.Generator) -> list[dict]:
  turns = []
  for i in range(int(rng.integers(2, 5))):
    q, a = short_qa(scene, rng) if rng.random() < 0.75 else long_qa(scene, rng)
    turns += [{'from': 'human', 'value': (IMAGE_TOKEN + '\n' if i == 0 else '') + q}, {'from': 'gpt', 'value': a}]
  return turns


def detail_sample(scene: Scene, rng: np.random.Generator) -> list[dict]:
  n = len(scene.objects)
  text = [f'The image shows {_count(n)} on a white background.']
  for o in scene.objects:
    text.append(f'There is a {o.name} in the {o.position}.')
  colors = sorted({o.color for o in scene.objects})
  text.append(f'The colors in the image are {_join(colors)}.' if len(colors) > 1 else
              f'The only color in the image is {colors[0]}.')
  q = DETAIL_INSTRUCTIONS[rng.integers(len(DETAIL_INSTRUCTIONS))]
  return [{'from': 'human', 'value': f'{IMAGE_TOKEN}\n{q}'}, {'from': 'gpt', 'value': ' '.join(text)}]


def reasoning_sample(scene: Scene, rng: np.random.Generator) -> list[dict]:
  objs, n = scene.objects, len(scene.objects)
  options = ['colors']
  if n >= 2:
    options.append('remove')
    a, b = objs[0], objs[1]
    if a.box[1] != b.box[1] and a.position.split()[0] != b.position.split()[0]:
      options.append('higher')
  kind = options[rng.integers(len(options))]
  if kind == 'remove':
    o = objs[rng.integers(n)]
    rest = [f'a {x.name}' for x in objs if x is not o]
    q = f'If the {o.name} were removed, how many shapes would be left?'
    a = f'{_cap(_count(n - 1))} would be left: {_join(rest)}. Removing the {o.name} takes away one of the {_count(n)}.'
  elif kind == 'higher':
    a_obj, b_obj = objs[0], objs[1]
    top, low = (a_obj, b_obj) if a_obj.box[1] < b_obj.box[1] else (b_obj, a_obj)
    q = f'Which shape is closer to the top of the image, the {a_obj.name} or the {b_obj.name}?'
    a = (f'The {top.name} is closer to the top, because it is in the {top.position} while the '
         f'{low.name} is in the {low.position}.')
  else:
    colors = sorted({o.color for o in objs})
    q = 'How many different colors appear in the image, and which are they?'
    a = (f'There {"is" if len(colors) == 1 else "are"} {_count(len(colors), "color")} in the image: '
         f'{_join(colors)}. Counting each shape once: ' + ', '.join(o.name for o in objs) + '.')
  return [{'from': 'human', 'value': f'{IMAGE_TOKEN}\n{q}'}, {'from': 'gpt', 'value': a}]


def caption_sample(scene: Scene, rng: np.random.Generator) -> list[dict]:
  q = BRIEF_INSTRUCTIONS[rng.integers(len(BRIEF_INSTRUCTIONS))]
  caps = captions(scene)
  return [{'from': 'human', 'value': f'{IMAGE_TOKEN}\n{q}'}, {'from': 'gpt', 'value': caps[rng.integers(len(caps))]}]


# ----------------------------------------------------------------------------- held-out QA

def _qa_combos(qtype: str, max_objects: int) -> list[tuple]:
  colors = list(COLORS)
  if qtype == 'color':
    return [(s, c) for s in SHAPES for c in colors]
  if qtype == 'shape':
    return [(c, s) for c in colors for s in SHAPES]
  if qtype == 'count':
    return [(n,) for n in range(1, max_objects + 1)]
  return [(c, s, ans) for c in colors for s in SHAPES for ans in ('yes', 'no')]


def qa_scene(rng: np.random.Generator, qtype: str, combo: tuple, max_objects: int) -> tuple[Scene, dict]:
  """A scene built so the answer to the question is the one in `combo`."""
  n = int(rng.integers(1, max_objects + 1))
  colors = list(COLORS)
  if qtype == 'color':
    shape, color = combo
    others = [(colors[rng.integers(4)], s) for s in rng.choice([x for x in SHAPES if x != shape], size=n - 1)]
    kinds = [(color, shape)] + [(c, str(s)) for c, s in others]
    item = dict(question=qa_question('color', shape=shape), answer=color, choices=colors)
  elif qtype == 'shape':
    color, shape = combo
    others = [(str(c), SHAPES[rng.integers(3)]) for c in rng.choice([x for x in colors if x != color], size=n - 1)]
    kinds = [(color, shape)] + others
    item = dict(question=qa_question('shape', color=color), answer=shape, choices=list(SHAPES))
  elif qtype == 'count':
    n = combo[0]
    kinds = random_kinds(rng, n)
    item = dict(question=qa_question('count'), answer=NUMBERS[n], choices=list(NUMBERS[1:max_objects + 1]))
  else:
    color, shape, ans = combo
    kinds = [k for k in random_kinds(rng, 3 * max_objects) if k != (color, shape)][:n]
    if ans == 'yes':
      kinds = [(color, shape)] + kinds[:n - 1]
    elif n >= 1 and rng.random() < 0.5:  # a near miss: same colour or same shape
      kinds[0] = (color, SHAPES[(SHAPES.index(shape) + 1) % 3]) if rng.random() < 0.5 else \
          (colors[(colors.index(color) + 1) % 4], shape)
    item = dict(question=qa_question('exists', color=color, shape=shape), answer=ans, choices=['yes', 'no'])
  order = rng.permutation(len(kinds))
  return place(rng, [kinds[i] for i in order], max_objects), dict(item, type=qtype)


def qa_plan(num_qa: int, max_objects: int, seed: int) -> list[tuple[str, tuple]]:
  """(type, answer combo) per item: types in turn, each cycling through a shuffled list of all its
  combos, so every question text meets every answer equally often per full cycle."""
  types = [t for t in QA_TYPES if t != 'count' or max_objects >= 2]
  rng = np.random.default_rng([seed, 3])
  cycles = {t: [] for t in types}
  plan = []
  for i in range(num_qa):
    t = types[i % len(types)]
    if not cycles[t]:
      combos = _qa_combos(t, max_objects)
      cycles[t] = [combos[j] for j in rng.permutation(len(combos))]
    plan.append((t, cycles[t].pop()))
  return plan


def normalize_answer(text: str) -> str:
  """Lower-case first word without punctuation: how QA predictions are compared to `answer`."""
  words = text.strip().lower().translate(str.maketrans('', '', string.punctuation)).split()
  return words[0] if words else ''


def text_only_accuracy(items: Sequence[dict]) -> float:
  """Best accuracy from the question text alone (majority answer per question on this set)."""
  by_q = {}
  for it in items:
    by_q.setdefault(it['question'], []).append(it['answer'])
  best = sum(max(answers.count(a) for a in set(answers)) for answers in by_q.values())
  return best / max(1, len(items))


# ----------------------------------------------------------------------------- writing

def _coco(scenes: Sequence[tuple[int, str, Scene, list]], image_size: int) -> tuple[dict, dict]:
  categories = [dict(id=i + 1, name=f'{c} {s}', supercategory=s)
                for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES)]
  cat_id = {c['name']: c['id'] for c in categories}
  images = [dict(id=i, file_name=f, width=image_size, height=image_size) for i, f, _, _ in scenes]
  caps, boxes = [], []
  for image_id, _, scene, caption_list in scenes:
    caps += [dict(id=len(caps) + 1, image_id=image_id, caption=c) for c in caption_list]
    for o in scene.objects:
      x1, y1, x2, y2 = (v * image_size for v in o.box)
      boxes.append(dict(id=len(boxes) + 1, image_id=image_id, category_id=cat_id[o.name],
                        bbox=[round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        area=round((x2 - x1) * (y2 - y1), 2), iscrowd=0,
                        segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]]))
  info = dict(description='llava_jax synthetic shapes', version='1.0')
  return (dict(info=info, images=images, annotations=caps),
          dict(info=info, images=images, annotations=boxes, categories=categories))


def _dump(obj, path: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)


def sample_kind(sample_id: str) -> str:
  """A stage-2 sample's kind from its id (as write_demo names them): 'train_000012_conversation1' -> 'conversation'."""
  return sample_id.split('_', 2)[2].rstrip('0123456789')


def write_demo(out_dir: str, *, num_train: int = 1000, num_qa: int = 192, image_size: int = 64,
               max_objects: int = 3, seed: int = 0, conversations_per_image: int = 1, tokenizer: bool = True,
               vocab_size: int = 1024, progress_every: int = 1000) -> dict:
  """Writes the demo dataset (see module docstring) and returns paths + counts + chance accuracy.

  Stage 2 gets, per training image, `conversations_per_image` conversation samples (each with fresh
  random questions) plus one detailed description and one complex reasoning sample.
  """
  if not 1 <= max_objects <= 9:
    raise ValueError(f'max_objects must be in 1..9, got {max_objects}')
  if conversations_per_image < 0:
    raise ValueError(f'conversations_per_image must be >= 0, got {conversations_per_image}')
  if image_size < 8:
    raise ValueError(f'image_size must be >= 8, got {image_size}')
  image_dir = os.path.join(out_dir, 'images')
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)
  stage1, stage2, train_scenes = [], [], []
  kinds = (('conversation', conversation_sample), ('detail', detail_sample), ('reasoning', reasoning_sample))
  for i in range(num_train):
    rng = np.random.default_rng([seed, 0, i])
    scene = place(rng, random_kinds(rng, int(rng.integers(1, max_objects + 1))), max_objects)
    fname = f'train_{i:06d}.png'
    draw(scene, image_size).save(os.path.join(image_dir, fname))
    train_scenes.append((i + 1, fname, scene, captions(scene)))
    text_rng = np.random.default_rng([seed, 2, i])
    stage1.append(dict(id=f'train_{i:06d}', image=fname, conversations=caption_sample(scene, text_rng)))
    for kind, make in kinds:
      for k in range(conversations_per_image if kind == 'conversation' else 1):
        suffix = f'{kind}{k}' if k else kind
        stage2.append(dict(id=f'train_{i:06d}_{suffix}', image=fname, conversations=make(scene, text_rng)))
    if progress_every and (i + 1) % progress_every == 0:
      print(f'[synthetic] {i + 1}/{num_train} train images', flush=True)
  qa, qa_scenes = [], []
  for i, (qtype, combo) in enumerate(qa_plan(num_qa, max_objects, seed)):
    scene, item = qa_scene(np.random.default_rng([seed, 1, i]), qtype, combo, max_objects)
    fname = f'qa_{i:06d}.png'
    draw(scene, image_size).save(os.path.join(image_dir, fname))
    qa_scenes.append((i + 1, fname, scene, captions(scene)))
    qa.append(dict(id=f'qa_{i:06d}', image=fname, **item))
  paths = dict(images=image_dir, stage1=os.path.join(out_dir, 'stage1.json'),
               stage2=os.path.join(out_dir, 'stage2.json'), qa=os.path.join(out_dir, 'qa.json'))
  _dump(stage1, paths['stage1'])
  _dump(stage2, paths['stage2'])
  _dump(qa, paths['qa'])
  for split, scenes in (('train', train_scenes), ('qa', qa_scenes)):
    caps, inst = _coco(scenes, image_size)
    paths[f'captions_{split}'] = os.path.join(out_dir, 'annotations', f'captions_{split}.json')
    paths[f'instances_{split}'] = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
    _dump(caps, paths[f'captions_{split}'])
    _dump(inst, paths[f'instances_{split}'])
  chance = float(np.mean([1 / len(it['choices']) for it in qa])) if qa else 0.0
  if tokenizer:
    paths['tokenizer'] = os.path.join(out_dir, 'tokenizer')
    build_demo_tokenizer(paths['tokenizer'], texts=demo_texts(stage1 + stage2, qa), vocab_size=vocab_size)
  meta = dict(config=dict(num_train=num_train, num_qa=num_qa, image_size=image_size, max_objects=max_objects,
                          seed=seed, conversations_per_image=conversations_per_image, vocab_size=vocab_size),
              paths=paths, num_stage1=len(stage1), num_stage2=len(stage2), num_qa=len(qa),
              chance_accuracy=chance, text_only_accuracy=text_only_accuracy(qa),
              qa_types={t: sum(it['type'] == t for it in qa) for t in QA_TYPES})
  _dump(meta, os.path.join(out_dir, 'meta.json'))
  return meta


# ----------------------------------------------------------------------------- tokenizer

def template_strings() -> list[str]:
  return [SYSTEM_USER + ' USER: ASSISTANT:', SYSTEM_HUMAN + '###Human: ###Assistant:',
          '[INST] <<SYS>>\n' + SYSTEM_LLAMA_2 + '\n<</SYS>>\n\n [/INST]', SHORT_ANSWER]


def demo_texts(samples: Iterable[dict] = (), qa: Iterable[dict] = ()) -> list[str]:
  """Training corpus of the demo tokenizer: every turn and QA question/answer + template strings.
  Without samples, texts of 300 default scenes are used."""
  samples, qa = list(samples), list(qa)
  if not samples:
    for i in range(300):
      rng = np.random.default_rng([0, 0, i])
      scene = place(rng, random_kinds(rng, int(rng.integers(1, 4))), 3)
      samples += [dict(conversations=f(scene, rng)) for f in
                  (caption_sample, conversation_sample, detail_sample, reasoning_sample)]
  texts = [t['value'].replace(IMAGE_TOKEN, '') for s in samples for t in s['conversations']]
  texts += [f'{it["question"]} {it["answer"]}' for it in qa]
  # Template strings occur in every training sequence: weight them so BPE merges them.
  weight = max(20, len(texts) // 20)
  return texts + template_strings() * weight + list(BRIEF_INSTRUCTIONS) + list(DETAIL_INSTRUCTIONS)


SPECIAL_TOKENS = ('<unk>', '<s>', '</s>', '<pad>', IMAGE_TOKEN)


def build_demo_tokenizer(out_dir: str, *, texts: Optional[Sequence[str]] = None, vocab_size: int = 1024):
  """Trains a byte-level BPE on `texts` (default: demo_texts()) and saves it as an HF tokenizer
  folder. Ids: <unk> 0, <s> 1, </s> 2, <pad> 3, <image> 4. Encoding adds <s> like LLaMA's."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(texts if texts is not None else demo_texts()), trainer)
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                     special_tokens=[('<s>', tok.token_to_id('<s>'))])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                               pad_token='<pad>')
  os.makedirs(out_dir, exist_ok=True)
  hf.save_pretrained(out_dir)
  return hf


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m llava_jax.demo.synthetic', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--num-train', type=int, default=1000, help='training images (3 stage-2 samples each)')
  p.add_argument('--num-qa', type=int, default=192, help='held-out QA items (multiples of 192 balance exactly)')
  p.add_argument('--image-size', type=int, default=64)
  p.add_argument('--max-objects', type=int, default=3, help='shapes per image: 1..N')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--conversations-per-image', type=int, default=1,
                 help='stage-2 conversation samples per image (more short Q/A for the demo QA task)')
  p.add_argument('--vocab-size', type=int, default=1024, help="demo tokenizer vocabulary")
  p.add_argument('--no-tokenizer', action='store_true', help='do not train the demo tokenizer')
  args = p.parse_args(argv)
  try:
    meta = write_demo(args.out, num_train=args.num_train, num_qa=args.num_qa, image_size=args.image_size,
                      max_objects=args.max_objects, seed=args.seed,
                      conversations_per_image=args.conversations_per_image, tokenizer=not args.no_tokenizer,
                      vocab_size=args.vocab_size)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {meta["num_stage1"]} stage-1, {meta["num_stage2"]} stage-2 samples and {meta["num_qa"]} QA items '
        f'to {args.out} (QA chance accuracy {meta["chance_accuracy"]:.3f}, text-only best '
        f'{meta["text_only_accuracy"]:.3f})')
  print('next: python -m llava_jax.data.build --json ' + meta['paths']['stage1'] +
        f' --images {meta["paths"]["images"]} --out DATA_DIR --name demo_stage1')
  print('      python -m llava_jax.data.build --json ' + meta['paths']['stage2'] +
        f' --images {meta["paths"]["images"]} --out DATA_DIR --name demo_stage2')
  return 0


if __name__ == '__main__':
  sys.exit(main())
