"""Conversation -> input_ids and labels with exact supervision masks for any HF tokenizer (LLAVA.md §3).

The original counts tokens of split strings with tokenizer-specific offsets and silently zeroes a
sample when the counts disagree. Here the template renders (text, supervised) pieces, the whole text
is tokenized once, and a token is supervised iff its character span (offset mapping) overlaps a
supervised piece. Zero-width tokens (a prepended `▁`, trimmed whitespace) go with the next token.
Tokenizers without offset mappings (Python/SentencePiece backends) tokenize piece by piece instead,
which is exact by construction. Either way no tokenizer can produce a mismatch.

`<image>` is one special token in the text; after tokenization it is expanded to the model's
`num_image_tokens` copies of its id (the HF convention), never supervised. The original release's other layouts
(`ImageTokens`, from the model config): `<im_start>` + image + `<im_end>` (mm_use_im_start_end), and `<im_patch>`
as the repeated image token (mm_use_im_patch_token).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
from tokenizers import AddedToken

from llava_jax.data.conversation import IMAGE_TOKEN, Template, get_template, normalize_turns, render_pieces

IGNORE_INDEX = -100
IM_START, IM_END, IM_PATCH = '<im_start>', '<im_end>', '<im_patch>'  # the original's DEFAULT_IM_*_TOKEN


@dataclasses.dataclass(frozen=True)
class ImageTokens:
  """How one image sits in input_ids: [`<im_start>`] + `count` x `token` + [`<im_end>`].

  `token` is the image token the model replaces by features (`<image>`; `<im_patch>` for mm_use_im_patch_token
  models); `start_end` wraps it (mm_use_im_start_end). As the original's preprocess_multimodal, the wrap goes
  where `<image>` is in the text, except in `plain`, whose human turn the original replaces by a bare `<image>`.
  """
  count: int
  token: str = IMAGE_TOKEN
  start_end: bool = False

  @classmethod
  def of(cls, config) -> 'ImageTokens':
    """From a LlavaConfig."""
    return cls(config.num_image_tokens, IM_PATCH if config.mm_use_im_patch_token else IMAGE_TOKEN,
               config.mm_use_im_start_end)

  @property
  def special_tokens(self) -> tuple[str, ...]:
    """The tokens the tokenizer needs (the original adds <im_patch>, then <im_start>, <im_end>)."""
    return (self.token,) + ((IM_START, IM_END) if self.start_end else ())

  def text(self, template) -> str:
    """What `<image>` becomes in the rendered text of `template`, before tokenization."""
    wrap = self.start_end and get_template(template).style != 'plain'
    return IM_START + self.token + IM_END if wrap else self.token


def _image_tokens(image: Union[int, ImageTokens]) -> ImageTokens:
  return image if isinstance(image, ImageTokens) else ImageTokens(image)


def require_image_tokens(tokenizer, image: Union[int, ImageTokens]) -> None:
  """ValueError unless the tokenizer has every special token of the image layout."""
  for token in _image_tokens(image).special_tokens:
    image_token_id(tokenizer, token)


def add_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
  """Adds `token` as a special token if the tokenizer lacks it (as the llava-hf conversion does).

  Returns its id. The tokenizer grows by one entry when added: size the model's embedding to
  `len(tokenizer)` or more.
  """
  if token not in tokenizer.get_added_vocab():
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
  return tokenizer.convert_tokens_to_ids(token)


def image_token_id(tokenizer, token: str = IMAGE_TOKEN) -> int:
  if token not in tokenizer.get_added_vocab():
    raise ValueError(f'tokenizer has no special {token!r} token; call '
                     f'llava_jax.data.tokenize.add_image_token(tokenizer) first')
  return tokenizer.convert_tokens_to_ids(token)


def check_template_tokens(tokenizer, template: Union[str, Template], source_path: str, key: str = 'template'):
  """Raises ValueError naming `source_path` and `key` when the tokenizer cannot hold `template`'s special tokens
  as single tokens (ChatML's `<|im_start|>`, Llama-3's header tokens, the EOS that ends an answer). Without
  them the markers would be learnt as plain text and generation would never see its stop token."""
  t = get_template(template)
  missing = []
  if t.style in ('two', 'llama_2') and tokenizer.eos_token is None:
    missing.append('eos_token')
  if t.style == 'llama_2' and t.round_bos and tokenizer.bos_token is None:
    missing.append('bos_token')
  for token in t.special_tokens:
    if len(tokenizer(token, add_special_tokens=False)['input_ids']) != 1:
      missing.append(token)
  if missing:
    raise ValueError(f'{source_path}: {key}={t.name!r} needs special tokens {missing}, which this tokenizer lacks; '
                     "use the template the model's tokenizer was made for")


def _special_strings(tokenizer) -> tuple[str, str]:
  return tokenizer.bos_token or '<s>', tokenizer.eos_token or '</s>'


def _supervised_by_offsets(offsets, char_mask: np.ndarray) -> np.ndarray:
  """Token supervised iff its [start, end) overlaps a supervised character. Zero-width tokens (a
  prepended `▁`, trimmed whitespace) take the decision of the next token with a width, or of the
  previous one at the very end."""
  if not len(offsets):
    return np.zeros(0, bool)
  starts, ends = np.asarray(offsets, np.int64).T
  prefix = np.concatenate([[0], np.cumsum(char_mask)])
  wide = ends > starts
  sup = wide & (prefix[ends] > prefix[starts])
  wide_idx = np.flatnonzero(wide)
  if not len(wide_idx):
    return sup
  nearest = np.minimum(np.searchsorted(wide_idx, np.arange(len(offsets))), len(wide_idx) - 1)
  return sup[wide_idx[nearest]]


def encode_pieces(pieces: Sequence[tuple[str, bool]], tokenizer) -> tuple[list[int], np.ndarray]:
  """[(text, supervised)] -> (token ids, supervised flags), without special tokens added."""
  text = ''.join(p for p, _ in pieces)
  if getattr(tokenizer, 'is_fast', False):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if 'offset_mapping' in enc:
      char_mask = np.concatenate([np.full(len(p), s, bool) for p, s in pieces]) if pieces else np.zeros(0, bool)
      return list(enc['input_ids']), _supervised_by_offsets(enc['offset_mapping'], char_mask)
  ids, sup = [], []
  for piece, supervised in pieces:  # no offsets: exact by construction
    piece_ids = tokenizer(piece, add_special_tokens=False)['input_ids']
    ids += piece_ids
    sup += [supervised] * len(piece_ids)
  return ids, np.asarray(sup, bool)


def _layout_pieces(pieces, image: ImageTokens, template):
  """The rendered pieces with `<image>` replaced by the image layout's text (a no-op for plain `<image>`)."""
  text = image.text(template)
  return pieces if text == IMAGE_TOKEN else [(p.replace(IMAGE_TOKEN, text), s) for p, s in pieces]


def _expand_images(ids: list[int], sup: np.ndarray, tokenizer, num_images: int, image: ImageTokens,
                   template) -> tuple[np.ndarray, np.ndarray, int]:
  """Replaces each image token by `image.count` copies. Returns (ids, sup, end of the last image: the index
  after it, after its `<im_end>` when wrapped)."""
  ids = np.asarray(ids, np.int32)
  if not num_images:
    return ids, sup, 0
  image_id = image_token_id(tokenizer, image.token)
  positions = [int(i) for i in np.flatnonzero(ids == image_id)]
  if len(positions) != num_images:
    raise ValueError(f'expected {num_images} {image.token} token(s) after tokenization, found '
                     f'{len(positions)}: is {image.token} a special token of this tokenizer?')
  if image.count < 1:
    raise ValueError(f'num_image_tokens must be >= 1 for an image sample, got {image.count}')
  wrapped = image.text(template) != image.token
  if wrapped:
    start, end = (image_token_id(tokenizer, t) for t in (IM_START, IM_END))
    if not all(0 < p < len(ids) - 1 and ids[p - 1] == start and ids[p + 1] == end for p in positions):
      raise ValueError(f'{IM_START}{image.token}{IM_END} did not tokenize to their three ids')
  bounds = [-1] + positions + [len(ids)]
  keep = [slice(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:])]
  tokens = np.full(image.count, image_id, np.int32)
  ids = np.concatenate([x for part in keep[:-1] for x in (ids[part], tokens)] + [ids[keep[-1]]])
  no = np.zeros(image.count, bool)
  sup = np.concatenate([x for part in keep[:-1] for x in (sup[part], no)] + [sup[keep[-1]]])
  return ids, sup, positions[-1] + num_images * image.count - (num_images - 1) + int(wrapped)


def tokenize_conversation(conversations: Sequence[dict], tokenizer, template: Union[str, Template],
                          num_image_tokens: Union[int, ImageTokens], max_length: Optional[int] = None, *,
                          add_bos: bool = True) -> dict:
  """LLaVA JSON turns -> dict(input_ids int32[n], labels int32[n], truncated, dropped, drop_reason,
  has_image, num_images). num_image_tokens: a count (N x `<image>`), or the ImageTokens layout of the model.

  labels == input_ids where supervised, IGNORE_INDEX (-100) elsewhere; unshifted (the loss shifts).
  BOS is prepended when the tokenizer has one. Longer than `max_length`: cut at the end; a cut through
  the image tokens or one that leaves nothing supervised drops the sample (`dropped`, with empty
  arrays); with several images, a cut through or before any of them drops it. Raises ValueError on
  malformed turns.
  """
  turns, num_images = normalize_turns(conversations)
  has_image = num_images > 0
  bos, eos = _special_strings(tokenizer)
  image = _image_tokens(num_image_tokens)
  pieces = _layout_pieces(render_pieces(turns, template, bos=bos, eos=eos), image, template)
  ids, sup = encode_pieces(pieces, tokenizer)
  ids, sup, image_end = _expand_images(ids, sup, tokenizer, num_images, image, template)
  if add_bos and tokenizer.bos_token_id is not None:
    ids = np.concatenate([np.asarray([tokenizer.bos_token_id], np.int32), ids])
    sup = np.concatenate([[False], sup])
    image_end += int(has_image)
  truncated, reason = False, ''
  if max_length is not None and len(ids) > max_length:
    truncated = True
    if image_end > max_length:
      reason = 'image_cut'
    ids, sup = ids[:max_length], sup[:max_length]
  if not reason and not sup.any():
    reason = 'no_supervised_tokens'
  if reason:
    ids, sup = np.zeros(0, np.int32), np.zeros(0, bool)
  labels = np.where(sup, ids, IGNORE_INDEX).astype(np.int32)
  return dict(input_ids=ids, labels=labels, truncated=truncated, dropped=bool(reason),
              drop_reason=reason, has_image=has_image, num_images=num_images)


def build_prompt(messages: Sequence[dict], template: Union[str, Template], *, bos: str = '<s>',
                 eos: str = '</s>') -> str:
  """The generation prompt: `messages` (LLaVA JSON turns ending with a user turn) rendered up to and
  including the final assistant role marker (`ASSISTANT:`, `###Assistant:`, `[/INST]`, or `<image>`
  for `plain`)."""
  turns, _ = normalize_turns(messages)
  pieces = render_pieces(turns, template, add_generation_prompt=True, bos=bos, eos=eos)
  return ''.join(p for p, _ in pieces)


def tokenize_prompt(messages: Sequence[dict], tokenizer, template: Union[str, Template],
                    num_image_tokens: Union[int, ImageTokens], *, add_bos: bool = True) -> np.ndarray:
  """Token ids int32[n] of `build_prompt(messages, ...)` with the image expanded: exactly the tokens
  that precede the answer in `tokenize_conversation` of the same turns plus that answer."""
  turns, num_images = normalize_turns(messages)
  bos, eos = _special_strings(tokenizer)
  image = _image_tokens(num_image_tokens)
  pieces = _layout_pieces(render_pieces(turns, template, add_generation_prompt=True, bos=bos, eos=eos), image,
                          template)
  ids, sup = encode_pieces(pieces, tokenizer)
  ids, _, _ = _expand_images(ids, sup, tokenizer, num_images, image, template)
  if add_bos and tokenizer.bos_token_id is not None:
    ids = np.concatenate([np.asarray([tokenizer.bos_token_id], np.int32), ids])
  return ids
