"""Test-wide setup, before jax is imported: 8 virtual CPU devices (mesh tests) and one persistent compilation cache.
Shared builders: tiny random HF models, random params, word-level tokenizers, the coloured-square dataset.

The cache (`.pytest_cache/jax_compilation_cache`, env JAX_COMPILATION_CACHE_DIR) serves this process, the
subprocesses the tests start (they inherit the environment) and pytest-xdist workers: a program compiled once (a
tiny trainer's step, a sampler, the demo's stages) is read back by every later test or process that builds it.
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402

# The slowest files first: under `pytest -n 2 --dist loadfile` (pytest-xdist, .ci/run) each file runs on one
# worker, and starting the long ones first lets both workers finish together.
SLOW_FIRST = ('test_multihost.py', 'test_demo.py', 'test_train_loop.py', 'test_dry_run.py', 'test_convert.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


def pytest_configure(config):
  # ml_collections loads config files with importlib's deprecated load_module(): its code, nothing to act on.
  config.addinivalue_line('filterwarnings', r'ignore:the load_module\(\) method is deprecated:DeprecationWarning')


# Tiny shapes shared by the parity tests: a 4-block CLIP (feature layer -2 -> 3 blocks run, 1 kept unused),
# 16 patches of 8x8 on a 32x32 image, and a 2-layer LLaMA with grouped-query attention (4 heads, 2 kv heads).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                   patch_size=8, hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=16)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
IMAGE_TOKEN = 100


def randomize_(model, seed: int):
  """Re-draw every weight at a scale where outputs depend on all of them (HF's 0.02 init gives near-uniform logits):
  matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), biases and 1-D embeddings ~ N(0, 0.1)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim >= 2:
        p.copy_(noise / (p[0].numel() ** 0.5))
      elif 'norm' in name or 'layrnorm' in name:
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def hf_llava(projector_act='gelu', select='default', tie=False, seed=0, rope_theta=10000.0, text_config=None):
  """A tiny random transformers LlavaForConditionalGeneration (fp32, eval mode). `text_config`: another decoder's
  HF config (Mistral, Qwen2, ...) in place of the tiny LLaMA one."""
  import torch
  import transformers
  torch.manual_seed(seed)
  text = dict(TINY_TEXT, tie_word_embeddings=tie, rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta})
  config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_VISION),
                                    text_config=text_config or transformers.LlamaConfig(**text),
                                    image_token_index=IMAGE_TOKEN,
                                    projector_hidden_act=projector_act, vision_feature_select_strategy=select,
                                    vision_feature_layer=-2, tie_word_embeddings=tie)
  return randomize_(transformers.LlavaForConditionalGeneration(config), seed)


def original_llava(root, *, start_end=True, patch_token=True, projector='mlp2x_gelu', load_tower=True, seed=21):
  """A tiny random original-release LLaVA (llava-torch's LlavaLlamaForCausalLM, eval mode) and its word-level
  tokenizer: 128 words, then the tokens its initialize_vision_tokenizer adds (<im_patch>, then <im_start>,
  <im_end>, as asked); the vocab has exactly those rows. The tower's CLIP config (and weights when `load_tower`:
  then they sit inside the checkpoint, as in its saves) is in root/'clip'. Returns (model, tokenizer)."""
  import torch
  import transformers
  from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
  torch.manual_seed(seed)
  clip = os.path.join(root, 'clip')
  if load_tower:
    randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), seed).save_pretrained(clip)
    transformers.CLIPImageProcessor(size={'shortest_edge': 32}, crop_size=32).save_pretrained(clip)
  else:  # the original builds only the tower's config until load_model()
    transformers.CLIPVisionConfig(**TINY_VISION).save_pretrained(clip)
  tok = word_tokenizer([f'w{i}' for i in range(124)])
  added = (['<im_patch>'] if patch_token else []) + (['<im_start>', '<im_end>'] if start_end else [])
  tok.add_tokens(added, special_tokens=True)
  config = LlavaConfig(**dict(TINY_TEXT, vocab_size=len(tok)), mm_vision_tower=clip, mm_hidden_size=32,
                       mm_projector_type=projector, mm_vision_select_layer=-2, mm_vision_select_feature='patch',
                       mm_use_im_start_end=start_end, mm_use_im_patch_token=patch_token)
  model = LlavaLlamaForCausalLM(config)
  if load_tower:
    model.get_model().get_vision_tower().load_model()
  return randomize_(model, seed), tok


@pytest.fixture(scope='session')
def tiny():
  """The builders above, for tests in any file."""
  import types
  return types.SimpleNamespace(vision=TINY_VISION, text=TINY_TEXT, image_token=IMAGE_TOKEN, randomize_=randomize_,
                               hf_llava=hf_llava, original_llava=original_llava)


def random_params(config, seed=0, std=0.1):
  """Random weights of a LlavaConfig from numpy (compiling flax init costs seconds): matrices ~ N(0, std), norm
  scales 1, biases 0. Tests pick `std` well above the usual 0.02 init, at which a random model repeats one token."""
  import jax
  import numpy as np
  from llava_jax.models.llava import abstract_params
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name or "'bias'" in name:
      return np.full(leaf.shape, 1.0 if "'scale'" in name else 0.0, np.float32)
    return rng.normal(0, std, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract_params(config))


def word_tokenizer(words, *, specials=('<unk>', '<s>', '</s>', '<pad>'), pre_tokenizer=None, decoder=None,
                   image_token=False):
  """A WordLevel fast tokenizer: `specials` (unk, bos, eos, pad) then `words`, ids in that order (repeats
  skipped); `<image>` added as the next id when asked. Pre-tokenizer default: whitespace + punctuation split."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  from llava_jax.data.tokenize import add_image_token
  vocab = {}
  for w in (*specials, *words):
    vocab.setdefault(w, len(vocab))
  tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
  tk.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
  if decoder is not None:
    tk.decoder = decoder
  unk, bos, eos, pad = specials
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk,
                                             pad_token=pad)
  if image_token:
    add_image_token(tok)
  return tok


def write_jsonl(path, rows) -> str:
  """Writes `rows` as JSON lines to `path` (a pathlib.Path); returns it as a string."""
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


COLORS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220)}
COLOR_WORDS = ('A chat between a curious user and an artificial intelligence assistant . The gives helpful , '
               "detailed polite answers to the user's questions USER ASSISTANT : What color is square ? red green "
               'blue').split()


def colour_dataset(root: str, num_records: int, moving: bool = False) -> tuple[str, str, int]:
  """(tfds dir, tokenizer dir, image token id) of `num_records` questions "What color is the square?" about a
  red / green / blue square (at a fixed place, or `moving` down by record), built with the ArrayRecord builder,
  and a word-level tokenizer of the vicuna_v1 template's words (`<image>` comes after them)."""
  import numpy as np
  from PIL import Image
  from tokenizers import decoders, pre_tokenizers
  from llava_jax.data.builder import build_dataset
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  entries = []
  for i in range(num_records):
    name = list(COLORS)[i % 3]
    img = np.full((32, 32, 3), 128, np.uint8)
    top = 4 + i % 8 if moving else 8
    img[top:top + 16, 8:24] = COLORS[name]
    Image.fromarray(img).save(os.path.join(root, 'images', f'{i}.png'))
    entries.append({'id': str(i), 'image': f'{i}.png', 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat color is the square?'},
        {'from': 'gpt', 'value': f'The square is {name}.'}]})
  with open(os.path.join(root, 'train.json'), 'w') as f:
    json.dump(entries, f)
  tok = word_tokenizer(COLOR_WORDS, decoder=decoders.WordPiece(), pre_tokenizer=pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]))
  tok.save_pretrained(os.path.join(root, 'tokenizer'))
  build_dataset({'train': os.path.join(root, 'train.json')}, os.path.join(root, 'images'), os.path.join(root, 'tfds'),
                name='colors')
  return os.path.join(root, 'tfds'), os.path.join(root, 'tokenizer'), len(tok)
