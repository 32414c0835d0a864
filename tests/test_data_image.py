"""Image preprocessing vs transformers' CLIPImageProcessor (PIL backend), every PIL mode -> RGB."""
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_jax.data.image import CLIP_STD, PAD_COLOR, blank_image, load_image, preprocess_image, to_rgb

ONE_LEVEL = 1 / 255 / min(CLIP_STD)  # one 8-bit level after normalization (~0.0146)
TOL = 1e-5                            # measured: ~5e-7 (float32 rounding only)


@pytest.fixture(scope='module')
def clip():
  return {s: CLIPImageProcessorPil(size={'shortest_edge': s}, crop_size={'height': s, 'width': s}) for s in (224, 336)}


def _ref(clip, img, size):
  return clip[size](img, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)


def _noise(w, h, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize('size', [224, 336])
@pytest.mark.parametrize('wh', [(640, 480), (333, 500), (100, 37), (336, 336), (801, 800), (17, 900)])
def test_square_matches_clip_processor(clip, size, wh):
  img = _noise(*wh)
  ours = preprocess_image(img, size, 'square')
  ref = _ref(clip, img, size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() < TOL < ONE_LEVEL


@pytest.mark.parametrize('wh', [(640, 480), (333, 500), (101, 36), (50, 50)])
def test_pad_is_mean_colour_square_then_clip(clip, wh):
  img = _noise(*wh, seed=1)
  w, h = wh
  side = max(w, h)
  padded = Image.new('RGB', (side, side), (122, 116, 104))
  padded.paste(img, ((side - w) // 2, (side - h) // 2))
  assert PAD_COLOR == (122, 116, 104)
  ours = preprocess_image(img, 336, 'pad')
  assert np.abs(ours - _ref(clip, padded, 336)).max() < TOL
  band = (side - min(w, h)) / 2 * 336 / side  # width of the padding after resizing, in pixels
  if band > 3:  # the corner is pure padding: the mean colour normalizes to ~0
    assert np.abs(ours[0, 0]).max() < ONE_LEVEL


def _modes():
  base = _noise(40, 30, seed=2)
  rgba = base.convert('RGBA')
  rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))))
  pal_t = base.convert('P')
  pal_t.info['transparency'] = 0
  return {'L': base.convert('L'), 'P': base.convert('P'), 'P_transparency': pal_t, 'RGBA': rgba,
          'LA': rgba.convert('LA'), 'CMYK': base.convert('CMYK'), '1': base.convert('1'),
          'YCbCr': base.convert('YCbCr'), 'RGB': base}


@pytest.mark.parametrize('mode', sorted(_modes()))
def test_every_mode_matches_clip_processor(clip, mode):
  img = _modes()[mode]
  rgb = to_rgb(img)
  assert rgb.mode == 'RGB' and rgb.size == img.size
  assert np.abs(preprocess_image(img, 224) - _ref(clip, img, 224)).max() < TOL


def test_alpha_is_composited_on_white():
  img = Image.new('RGBA', (4, 4), (10, 20, 30, 0))
  assert np.asarray(to_rgb(img)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_high_bit_depth_grayscale_is_scaled():
  arr16 = np.array([[0, 32896, 65535]], np.uint16)
  img16 = Image.fromarray(arr16)  # mode I;16
  assert img16.mode.startswith('I;16')
  assert np.asarray(to_rgb(img16))[0, :, 0].tolist() == [0, 128, 255]
  img_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
  assert np.asarray(to_rgb(img_f))[0, :, 1].tolist() == [0, 128, 255]


def test_load_image_from_bytes_and_path(tmp_path):
  img = _noise(20, 10, seed=3)
  path = tmp_path / 'x.png'
  img.save(path)
  assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(img))
  assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(img))
  buf = io.BytesIO()
  img.convert('L').save(buf, format='JPEG')
  assert load_image(buf.getvalue()).mode == 'RGB'
  with pytest.raises(OSError, match='missing.png'):
    load_image(str(tmp_path / 'missing.png'))
  with pytest.raises(OSError):
    load_image(b'not an image')
  with pytest.raises(ValueError, match='aspect'):
    preprocess_image(img, 32, 'stretch')
  assert not blank_image(8).any() and blank_image(8).shape == (8, 8, 3)
