"""The OpenAI Chat Completions request format, its checks, and OpenAI-style error bodies.

Every problem with a request is an `APIError` (HTTP status + message naming the field or value), answered as
`{"error": {"message", "type", "param", "code"}}`. Images come as `data:image/...;base64,` URLs or as `file://`
paths that must resolve (symlinks followed) inside `--image-dir`; nothing else is ever read.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse
from typing import Annotated, Literal, Optional, Union

import pydantic
from PIL import Image

from llava_jax.data import conversation, tokenize

MAX_STOP = 4  # as OpenAI
MAX_IMAGES = 1  # the model takes one image per conversation (the original's single `<image>`)
# Image placeholders of every layout (tokenize.ImageTokens): typed into a message they would fake an image.
RESERVED = (conversation.IMAGE_TOKEN, tokenize.IM_START, tokenize.IM_END, tokenize.IM_PATCH)


class APIError(Exception):

  def __init__(self, status: int, message: str, param: Optional[str] = None, type: str = 'invalid_request_error',
               code: Optional[str] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.type, 'param': self.param, 'code': self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_image_bytes: int = 10 * 2**20
  max_image_pixels: int = 4096 * 4096
  max_tokens: int = 512        # the largest max_tokens a request may ask for (--max-new-tokens)

  @property
  def max_body_bytes(self) -> int:
    return self.max_image_bytes * 4 // 3 * MAX_IMAGES + 2**20  # base64 images + text


# ------------------------------------------------------------------------------------------ request models

class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(strict=True, extra='ignore')


class TextPart(_Strict):
  type: Literal['text']
  text: str


class ImageURL(_Strict):
  url: str
  detail: Optional[str] = None


class ImagePart(_Strict):
  type: Literal['image_url']
  image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], pydantic.Field(discriminator='type')]


class Message(_Strict):
  role: Literal['system', 'developer', 'user', 'assistant']
  content: Union[str, list[Part], None] = None


class StreamOptions(_Strict):
  include_usage: bool = False


class ChatRequest(_Strict):
  model: str
  messages: Annotated[list[Message], pydantic.Field(min_length=1)]
  max_tokens: Optional[int] = None
  max_completion_tokens: Optional[int] = None
  temperature: Annotated[float, pydantic.Field(ge=0, le=2)] = 1.0
  top_p: Annotated[float, pydantic.Field(gt=0, le=1)] = 1.0
  seed: Optional[int] = None
  stop: Union[str, list[str], None] = None
  n: int = 1
  stream: bool = False
  stream_options: Optional[StreamOptions] = None


def parse_request(body: bytes) -> ChatRequest:
  """Raw JSON body -> ChatRequest; APIError 400 naming the first bad field (or the JSON error)."""
  try:
    req = ChatRequest.model_validate_json(body)
  except pydantic.ValidationError as e:
    # The deepest error names the field best (a content part's bad type, not 'content is not a string').
    err = max(e.errors(include_url=False), key=lambda x: len(x['loc']))
    loc = '.'.join(str(x) for x in err['loc'] if not _is_union_branch(x))
    if err['type'] == 'json_invalid':
      raise APIError(400, f'the body is not valid JSON: {err["msg"]}') from None
    if err['type'] == 'model_type' and not loc:
      raise APIError(400, 'the body must be a JSON object') from None
    raise APIError(400, f'{loc or "body"}: {err["msg"]}', param=loc or None) from None
  if req.n != 1:
    raise APIError(400, f'n={req.n}: only n=1 is supported', param='n')
  return req


def _is_union_branch(loc_part) -> bool:
  """pydantic labels union members in error locations ('str', 'list[...]'); they are no field names."""
  return isinstance(loc_part, str) and ('[' in loc_part or loc_part in ('str', 'none'))


def max_tokens_of(req: ChatRequest, limits: Limits) -> int:
  value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
  name = 'max_completion_tokens' if req.max_completion_tokens is not None else 'max_tokens'
  if value is None:
    return limits.max_tokens
  if not 1 <= value <= limits.max_tokens:
    raise APIError(400, f'{name}={value} must be between 1 and {limits.max_tokens}', param=name)
  return value


def stop_of(req: ChatRequest) -> tuple[str, ...]:
  stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
  if len(stop) > MAX_STOP:
    raise APIError(400, f'stop has {len(stop)} strings; at most {MAX_STOP}', param='stop')
  if any(not s for s in stop):
    raise APIError(400, 'stop strings must be non-empty', param='stop')
  return tuple(stop)


# ------------------------------------------------------------------------------------------ messages

@dataclasses.dataclass
class Conversation:
  turns: list[dict]         # LLaVA JSON turns ({'from': 'human'|'gpt', 'value'}), the image as `<image>\n`
  system: Optional[str]     # the request's system prompt (None: the template's own)
  image: Optional[Image.Image]


def parse_messages(messages: list[Message], image_dir: Optional[str], limits: Limits) -> Conversation:
  """OpenAI messages -> LLaVA turns. An image part becomes `<image>\\n` at the front of its message's text."""
  system, turns, images = None, [], []
  for i, m in enumerate(messages):
    where = f'messages.{i}'
    parts = [TextPart(type='text', text=m.content)] if isinstance(m.content, str) else (m.content or [])
    texts, has_image = [], False
    for j, part in enumerate(parts):
      if isinstance(part, TextPart):
        reserved = [t for t in RESERVED if t in part.text]
        if reserved:
          raise APIError(400, f'{where}: text may not contain {reserved[0]!r}; send images as image_url parts',
                         param=f'{where}.content')
        texts.append(part.text)
      else:
        if m.role != 'user':
          raise APIError(400, f'{where}: only user messages may carry images', param=f'{where}.content.{j}')
        if len(images) >= MAX_IMAGES:
          raise APIError(400, f'{where}: more than {MAX_IMAGES} image in the conversation; this model takes '
                         f'{MAX_IMAGES}', param=f'{where}.content.{j}')
        images.append(load_image_url(part.image_url.url, image_dir, limits, f'{where}.content.{j}.image_url'))
        has_image = True
    text = '\n'.join(texts)
    if m.role in ('system', 'developer'):
      if turns or system is not None:
        raise APIError(400, f'{where}: a system message must come first, once', param=f'{where}.role')
      system = text
      continue
    if has_image:
      text = conversation.IMAGE_TOKEN + '\n' + text
    turns.append({'from': 'human' if m.role == 'user' else 'gpt', 'value': text})
  if not turns or turns[-1]['from'] != 'human':
    raise APIError(400, 'messages must end with a user message', param='messages')
  try:
    conversation.normalize_turns(turns)
  except ValueError as e:
    raise APIError(400, f'messages: {e}', param='messages') from None
  return Conversation(turns, system, images[0] if images else None)


# ------------------------------------------------------------------------------------------ images

def load_image_url(url: str, image_dir: Optional[str], limits: Limits, param: str) -> Image.Image:
  """A `data:image/...;base64,` or `file://` URL -> decoded RGB image, within the byte and pixel limits."""
  if url.startswith('data:'):
    header, sep, payload = url[5:].partition(',')
    if not sep or not header.startswith('image/') or not header.endswith(';base64'):
      raise APIError(400, f'{param}: a data URL must be data:image/<type>;base64,<data>', param=param)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
      raise APIError(413, f'{param}: the image is over {limits.max_image_bytes} bytes', param=param)
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise APIError(400, f'{param}: the data URL is not valid base64', param=param) from None
  elif url.startswith('file://'):
    parsed = urllib.parse.urlparse(url)  # file:///abs/x.png, or file://x.png relative to --image-dir
    data = _read_inside(urllib.parse.unquote(parsed.netloc + parsed.path), image_dir, limits, param)
  else:
    scheme = url.split(':', 1)[0] if ':' in url else url[:20]
    raise APIError(400, f'{param}: image URLs must be data: or file:// (inside --image-dir); got {scheme!r}',
                   param=param)
  return decode_image(data, limits, param)


def _read_inside(path: str, image_dir: Optional[str], limits: Limits, param: str) -> bytes:
  if image_dir is None:
    raise APIError(400, f'{param}: file:// images are off (the server has no --image-dir)', param=param)
  root = os.path.realpath(image_dir)
  try:
    # realpath first: `..` and symlinks cannot leave the directory.
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    inside = os.path.commonpath([root, real]) == root and os.path.isfile(real)
  except ValueError:  # an embedded NUL byte
    inside = False
  if not inside:
    raise APIError(400, f'{param}: no such image inside --image-dir', param=param)
  if os.path.getsize(real) > limits.max_image_bytes:
    raise APIError(413, f'{param}: the image is over {limits.max_image_bytes} bytes', param=param)
  with open(real, 'rb') as f:
    return f.read(limits.max_image_bytes + 1)


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
  """Encoded bytes -> RGB image; the pixel count is checked from the header, before decoding."""
  from llava_jax.data.image import load_image
  if len(data) > limits.max_image_bytes:
    raise APIError(413, f'{param}: the image is over {limits.max_image_bytes} bytes', param=param)
  try:
    with Image.open(io.BytesIO(data)) as img:
      w, h = img.size
  except (OSError, ValueError, Image.DecompressionBombError):
    raise APIError(400, f'{param}: the image cannot be decoded', param=param) from None
  if w * h > limits.max_image_pixels:
    raise APIError(413, f'{param}: the image has {w}x{h} pixels, over the limit of {limits.max_image_pixels}',
                   param=param)
  try:
    return load_image(data)
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
    raise APIError(400, f'{param}: the image cannot be decoded', param=param) from None
