"""LLaVA conversation templates (LLAVA.md §2), rendered as (text, supervised) pieces.

A template renders a conversation into pieces whose concatenation is the exact training string; the
`supervised` flag marks the characters the model learns to produce (LLAVA.md §3). Tokenization then
maps these character spans to tokens, so masks never depend on how a tokenizer splits substrings.

Templates: every key of the original release's `conv_templates` (aliases included), rendering byte for byte as its
`Conversation.get_prompt()` does on the turns its training reads, plus `llama_3` and `qwen_2`, which render as those
models' own HF chat templates (Llama-3 after its BOS). tests/test_data_templates.py holds both oracles.

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
SYSTEM_LLAMA_2_CHAT = (
    'You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  '
    'Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. '
    'Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not '
    'make any sense, or is not factually coherent, explain why instead of answering something not correct. If you '
    "don't know the answer to a question, please don't share false information.")
SYSTEM_MMTAG = ('A chat between a curious user and an artificial intelligence assistant. The assistant is able to '
                'understand the visual content that the user provides, and assist the user with a variety of tasks '
                'using natural language.The visual content will be provided with the following format: '
                '<Image>visual content</Image>.')
SYSTEM_MPT = ('A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest '
              'answers.')
# vicuna_v0's in-context example turn (the original's `conv_vicuna_v0.messages`), rendered before every conversation.
VICUNA_V0_EXAMPLE = (
    'What are the key differences between renewable and non-renewable energy sources?',
    'Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such '
    'as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and '
    'will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable '
    'and non-renewable energy sources:\n'
    '1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are '
    'finite and will eventually run out.\n'
    '2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable '
    'sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n'
    '3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower '
    'operational costs than non-renewable sources.\n'
    '4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than '
    'non-renewable sources.\n'
    '5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and '
    'needs, while non-renewable sources are more rigid and inflexible.\n'
    '6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable sources '
    'are not, and their depletion can lead to economic and social instability.\n')


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format. `style` picks the layout, as the original's SeparatorStyle does.

  plain:   `<image>` + answer + sep (user text dropped but its images kept; stage-1 captioning; more turns: each
           answer + sep).
  single:  `{system}{sep}{R0}: {q}{sep}{R1}: {a}{sep}...`            (llava_v0, sep '###').
  two:     `{system} {R0}: {q} {R1}: {a}{eos}{R0}: ...`               (vicuna_v1 / llava_v1).
  llama_2: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} {eos}{bos}[INST] ...` (no `<<SYS>>` block
           for an empty system; `round_bos=False` drops the `{bos}` between rounds, as mistral_instruct).
  mpt:     `{system}{sep}{R0}{q}{sep}{R1}{a}{sep}...` with the roles carrying their own markers (ChatML, Llama-3).
           `stop` is the supervised end of an answer: the part of `sep` the model must learn to emit.

  examples: (question, answer) turns rendered before the conversation, never supervised (vicuna_v0).
  mmtag: the image is wrapped as `<Image><image></Image>` (v0_mmtag, v1_mmtag).
  strip: turn texts are stripped, as Llama-3's chat template does (`| trim`).
  special_tokens: strings the tokenizer must hold as single tokens (`check_template_tokens`).
  """
  name: str
  style: str
  system: str = ''
  roles: tuple = ('USER', 'ASSISTANT')
  sep: str = ''
  stop: str = ''
  round_bos: bool = True
  examples: tuple = ()
  mmtag: bool = False
  strip: bool = False
  special_tokens: tuple = ()


def _chatml(name, system, sep):
  return Template(name, 'mpt', f'<|im_start|>system\n{system}', ('<|im_start|>user\n', '<|im_start|>assistant\n'),
                  sep, '<|im_end|>', special_tokens=('<|im_start|>', '<|im_end|>'))


def _llama_3_header(role):
  return f'<|start_header_id|>{role}<|end_header_id|>\n\n'


_TEMPLATES = (
    Template('plain', 'plain', sep='\n'),
    Template('vicuna_v0', 'single', SYSTEM_HUMAN, ('Human', 'Assistant'), '###', examples=(VICUNA_V0_EXAMPLE,)),
    Template('llava_v0', 'single', SYSTEM_HUMAN, ('Human', 'Assistant'), '###'),
    Template('v0_mmtag', 'single', SYSTEM_MMTAG, ('Human', 'Assistant'), '###', mmtag=True),
    Template('vicuna_v1', 'two', SYSTEM_USER, ('USER', 'ASSISTANT'), ' '),
    Template('llava_v1', 'two', SYSTEM_HUMAN, ('USER', 'ASSISTANT'), ' '),
    Template('v1_mmtag', 'two', SYSTEM_MMTAG, ('USER', 'ASSISTANT'), ' ', mmtag=True),
    Template('llama_2', 'llama_2', SYSTEM_LLAMA_2_CHAT),
    Template('llava_llama_2', 'llama_2', SYSTEM_LLAMA_2),
    Template('mistral_instruct', 'llama_2', '', round_bos=False),
    _chatml('mpt', SYSTEM_MPT, '<|im_end|>'),
    _chatml('chatml_direct', 'Answer the questions.', '<|im_end|>'),
    # Today's LLMs, exactly as their own HF chat templates render (Qwen2-Instruct; Llama-3-Instruct after BOS).
    _chatml('qwen_2', 'You are a helpful assistant.', '<|im_end|>\n'),
    Template('llama_3', 'mpt', _llama_3_header('system') + SYSTEM_LLAMA_2,
             (_llama_3_header('user'), _llama_3_header('assistant')), '<|eot_id|>', '<|eot_id|>', strip=True,
             special_tokens=('<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>')),
)
# The original's `conv_templates` keys, aliases included.
ALIASES = {'default': 'vicuna_v0', 'v0': 'vicuna_v0', 'v1': 'vicuna_v1', 'v0_plain': 'plain',
           'mistral_direct': 'chatml_direct'}
TEMPLATES = {t.name: t for t in _TEMPLATES}
TEMPLATES.update({alias: TEMPLATES[name] for alias, name in ALIASES.items()})

Pieces = list  # [(text, supervised: bool), ...]


def get_template(template: Union[str, Template]) -> Template:
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise ValueError(f'unknown template {template!r}; choose one of {sorted(TEMPLATES)}')
  return TEMPLATES[template]


def normalize_turns(conversations: Sequence[dict]) -> tuple[list[tuple[str, str]], int]:
  """LLaVA JSON turns -> ([(role, text)], number of images). One `<image>` moves to the front of the
  first user turn (as the original); several stay where they are (interleaved, image j = the j-th
  `<image>`, as LLaVA-NeXT-Interleave and transformers' processor place them).

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
  if num_images == 1:
    for turn in turns:
      if IMAGE_TOKEN in turn[1]:
        turn[1] = turn[1].replace(IMAGE_TOKEN, '').strip()
    # As the original: `<image>\n` + question, stripped (a bare image stays `<image>`).
    turns[0][1] = (IMAGE_TOKEN + '\n' + turns[0][1]).strip()
  return [tuple(t) for t in turns], num_images


def render_pieces(turns: Sequence[tuple[str, str]], template: Union[str, Template], *,
                  add_generation_prompt: bool = False, bos: str = '<s>', eos: str = '</s>') -> Pieces:
  """Normalized turns -> [(text, supervised)]. With `add_generation_prompt` the turns must end with a
  user turn and the result ends with the assistant role marker (`ASSISTANT:`, `[/INST]`, ...)."""
  t = get_template(template)
  if add_generation_prompt and (not turns or turns[-1][0] != USER):
    raise ValueError('a generation prompt needs the conversation to end with a user turn')
  user, assistant = t.roles
  if t.mmtag:
    turns = [(role, text.replace(IMAGE_TOKEN, f'<Image>{IMAGE_TOKEN}</Image>')) for role, text in turns]
  if t.strip:
    turns = [(role, text.strip()) for role, text in turns]
  examples = [(role, text, False) for q, a in t.examples for role, text in ((USER, q), (ASSISTANT, a))]
  turns = examples + [(role, text, role == ASSISTANT) for role, text in turns]
  pieces = []
  if t.style == 'plain':
    for role, text, learn in turns:
      if role == USER:
        pieces.append((IMAGE_TOKEN * text.count(IMAGE_TOKEN), False))  # '' without images: dropped below
      else:
        pieces.append((text + t.sep, learn))
  elif t.style in ('single', 'two'):
    pieces.append((t.system + t.sep, False))
    end_of_answer = t.sep if t.style == 'single' else eos
    for role, text, learn in turns:
      if role == USER:
        pieces.append((f'{user}: {text}{t.sep}', False))
      else:
        pieces += [(f'{assistant}:', False), (f' {text}{end_of_answer}', learn)]
    if add_generation_prompt:
      pieces.append((f'{assistant}:', False))
  elif t.style == 'llama_2':
    for i, (role, text, learn) in enumerate(turns):
      if role == USER:
        if i == 0 and t.system:
          text = f'<<SYS>>\n{t.system}\n<</SYS>>\n\n{text}'
        pieces.append((f'{bos if i and t.round_bos else ""}[INST] {text} [/INST]', False))
      else:
        pieces.append((f' {text} {eos}', learn))
  elif t.style == 'mpt':
    pieces.append((t.system + t.sep, False))
    after_stop = t.sep[len(t.stop):]  # e.g. ChatML's newline after <|im_end|>: the next turn's, not learnt
    for role, text, learn in turns:
      if role == USER:
        pieces.append((user + text + t.sep, False))
      else:
        pieces += [(assistant, False), (text + t.stop, learn), (after_stop, False)]
    if add_generation_prompt:
      pieces.append((assistant, False))
  else:
    raise ValueError(f'template {t.name!r} has unknown style {t.style!r}')
  return [(text, sup) for text, sup in pieces if text]


def render(conversations: Sequence[dict], template: Union[str, Template], *,
           add_generation_prompt: bool = False, bos: str = '<s>', eos: str = '</s>') -> str:
  """LLaVA JSON turns -> the exact training (or generation-prompt) string of `template`."""
  turns, _ = normalize_turns(conversations)
  pieces = render_pieces(turns, template, add_generation_prompt=add_generation_prompt, bos=bos, eos=eos)
  return ''.join(text for text, _ in pieces)
