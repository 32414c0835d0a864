"""LLaVA conversation templates (LLAVA.md §2), rendered as (text, supervised) pieces.

A template renders a conversation into pieces whose concatenation is the exact training string; the
`supervised` flag marks the characters the model learns to produce (LLAVA.md §3). Tokenization then
maps these character spans to tokens, so masks never depend on how a tokenizer splits substrings.

Turns come from LLaVA JSON (`{"from": "human"|"gpt", "value": ...}`) and are normalized first:
roles checked, a leading assistant turn dropped (as the original does), and the image placeholder
moved to the front of the first user turn as `<image>\\n{question}`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

IMAGE_TOKEN = '<image>'
USER, ASSISTANT = 'user', 'assistant'
_ROLE_OF = {'human': USER, 'user': USER, 'gpt': ASSISTANT, 'assistant': ASSISTANT}

SYSTEM_USER = ('A chat between a curious user and an artificial intelligence assistant. '
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = ('A chat between a curious human and an artificial intelligence assistant. '
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_LLAMA_2 = ('You are a helpful language and vision assistant. You are able to understand the visual '
                  'content that the user provides, and assist the user with a variety of tasks using natural '
                  'language.')


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format. `style` picks the layout, as the original's SeparatorStyle does.

  plain:   `<image>` + answer + sep (user text dropped; stage-1 captioning; more turns: each answer + sep).
  single:  `{system}{sep}{R0}: {q}{sep}{R1}: {a}{sep}...`            (llava_v0, sep '###').
  two:     `{system} {R0}: {q} {R1}: {a}{eos}{R0}: ...`               (vicuna_v1 / llava_v1).
  llama_2: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} {eos}{bos}[INST] ...`.
  """
  name: str
  style: str
  system: str = ''
  roles: tuple = ('USER', 'ASSISTANT')
  sep: str = ''


TEMPLATES = {
    'plain': Template('plain', 'plain', sep='\n'),
    'llava_v0': Template('llava_v0', 'single', SYSTEM_HUMAN, ('Human', 'Assistant'), '###'),
    'vicuna_v1': Template('vicuna_v1', 'two', SYSTEM_USER, ('USER', 'ASSISTANT'), ' '),
    'llava_v1': Template('llava_v1', 'two', SYSTEM_HUMAN, ('USER', 'ASSISTANT'), ' '),
    'llava_llama_2': Template('llava_llama_2', 'llama_2', SYSTEM_LLAMA_2, ('USER', 'ASSISTANT')),
}

Pieces = list  # [(text, supervised: bool), ...]


def get_template(template: Union[str, Template]) -> Template:
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise ValueError(f'unknown template {template!r}; choose one of {sorted(TEMPLATES)}')
  return TEMPLATES[template]


def normalize_turns(conversations: Sequence[dict]) -> tuple[list[tuple[str, str]], bool]:
  """LLaVA JSON turns -> ([(role, text)], has_image), with `<image>` moved to the first user turn.

  Raises ValueError naming the bad turn when roles are unknown, turns are not strings or do not
  alternate user/assistant.
  """
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ValueError('conversations must be a non-empty list of {"from", "value"} turns')
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get('value'), str) or 'from' not in turn:
      raise ValueError(f'turn {i} is not a {{"from": str, "value": str}} object: {turn!r:.200}')
    role = _ROLE_OF.get(turn['from'])
    if role is None:
      raise ValueError(f'turn {i} has unknown role {turn["from"]!r}; expected one of {sorted(_ROLE_OF)}')
    turns.append([role, turn['value']])
  if turns[0][0] == ASSISTANT:  # the original skips a leading assistant turn
    turns = turns[1:]
  for i, (role, _) in enumerate(turns):
    if role != (USER, ASSISTANT)[i % 2]:
      raise ValueError(f'turns must alternate user/assistant starting with user; turn {i} is {role}')
  if not turns:
    raise ValueError('conversation has no user turn')
  num_images = sum(text.count(IMAGE_TOKEN) for _, text in turns)
  if num_images > 1:
    raise ValueError(f'{num_images} {IMAGE_TOKEN} placeholders; one image per sample is supported')
  if num_images:
    for turn in turns:
      if IMAGE_TOKEN in turn[1]:
        turn[1] = turn[1].replace(IMAGE_TOKEN, '').strip()
    # As the original: `<image>\n` + question, stripped (a bare image stays `<image>`).
    turns[0][1] = (IMAGE_TOKEN + '\n' + turns[0][1]).strip()
  return [tuple(t) for t in turns], bool(num_images)


def render_pieces(turns: Sequence[tuple[str, str]], template: Union[str, Template], *,
                  add_generation_prompt: bool = False, bos: str = '<s>', eos: str = '</s>') -> Pieces:
  """Normalized turns -> [(text, supervised)]. With `add_generation_prompt` the turns must end with a
  user turn and the result ends with the assistant role marker (`ASSISTANT:`, `[/INST]`, ...)."""
  t = get_template(template)
  if add_generation_prompt and (not turns or turns[-1][0] != USER):
    raise ValueError('a generation prompt needs the conversation to end with a user turn')
  user, assistant = t.roles
  pieces = []
  if t.style == 'plain':
    for role, text in turns:
      if role == USER:
        pieces += [(IMAGE_TOKEN, False)] if text.startswith(IMAGE_TOKEN) else []
      else:
        pieces.append((text + t.sep, True))
  elif t.style in ('single', 'two'):
    pieces.append((t.system + t.sep, False))
    end_of_answer = t.sep if t.style == 'single' else eos
    for role, text in turns:
      if role == USER:
        pieces.append((f'{user}: {text}{t.sep}', False))
      else:
        pieces += [(f'{assistant}:', False), (f' {text}{end_of_answer}', True)]
    if add_generation_prompt:
      pieces.append((f'{assistant}:', False))
  elif t.style == 'llama_2':
    for i, (role, text) in enumerate(turns):
      if role == USER:
        if i == 0 and t.system:
          text = f'<<SYS>>\n{t.system}\n<</SYS>>\n\n{text}'
        pieces.append((f'{bos if i else ""}[INST] {text} [/INST]', False))
      else:
        pieces.append((f' {text} {eos}', True))
  else:
    raise ValueError(f'template {t.name!r} has unknown style {t.style!r}')
  return [(text, sup) for text, sup in pieces if text]


def render(conversations: Sequence[dict], template: Union[str, Template], *,
           add_generation_prompt: bool = False, bos: str = '<s>', eos: str = '</s>') -> str:
  """LLaVA JSON turns -> the exact training (or generation-prompt) string of `template`."""
  turns, _ = normalize_turns(conversations)
  pieces = render_pieces(turns, template, add_generation_prompt=add_generation_prompt, bos=bos, eos=eos)
  return ''.join(text for text, _ in pieces)
