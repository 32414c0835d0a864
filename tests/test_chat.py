"""The chat CLI driven through stdin in a subprocess: streamed answers, history, /image, /reset, /quit, errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llava_jax import chat, inference, model_dir
from llava_jax.data import conversation
from llava_jax.generate import SamplingParams
from conftest import random_params
from test_predict import save_tiny_model, tiny_config, tiny_tokenizer, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 12  # as in test_predict: the in-process expectations reuse its compiled programs


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('chat')
  save_tiny_model(root / 'model')
  for i in range(2):
    write_image(root / f'{i}.png', i)
  return root


def _expected(im, image, question):
  pix = inference.load_pixels(im, str(image))
  ids = inference.prompt_ids(im, [{'from': 'human', 'value': '<image>\n' + question}])
  out = inference.generate_batch(im, [ids], [pix], max_new_tokens=MAX_NEW, sampling=SamplingParams())
  return out.texts[0].strip()


def test_chat_session_over_stdin(env):
  stdin = '\n'.join(['what is in the image ?', 'what is it ?', '/image missing.png', '/image 1.png',
                     'what is in the image ?', '/reset', 'what is in the image ?', '/bogus', '/quit',
                     'never read']) + '\n'
  proc = subprocess.run(
      [sys.executable, '-m', 'llava_jax.chat', '--checkpoint', str(env / 'model'), '--image', '0.png',
       '--temperature', '0', '--max-new-tokens', str(MAX_NEW), '--show-prompt'],
      input=stdin, capture_output=True, text=True, cwd=env, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  replies = [r.strip() for r in re.findall(r'ASSISTANT: (.*)', proc.stdout)]
  prompts = [json.loads(p) for p in re.findall(r'\[prompt: \d+ tokens\] (.*)', proc.stderr)]
  assert len(replies) == 4 and len(prompts) == 4  # '/quit' ended the session before 'never read'

  im = inference.load_inference_model(str(env / 'model'))
  assert replies[0] == _expected(im, env / '0.png', 'what is in the image ?')
  assert replies[2] == _expected(im, env / '1.png', 'what is in the image ?')
  assert replies[0] != replies[2]  # the new image is used
  # Turn 2 carries turn 1 in the vicuna_v1 template; the new image and /reset start over.
  assert prompts[1].endswith(f'USER: <image>\nwhat is in the image ? ASSISTANT: {replies[0]}</s>'
                             'USER: what is it ? ASSISTANT:')
  assert prompts[2] == prompts[3] == prompts[0]
  assert prompts[0].startswith(conversation.SYSTEM_USER) and prompts[0].count('<image>') == 1
  assert replies[3] == replies[2]
  assert '[error: image not found: missing.png; keeping the previous image]' in proc.stdout
  assert '[image 1.png loaded; new conversation]' in proc.stdout
  assert '[conversation reset]' in proc.stdout
  assert '[unknown command /bogus' in proc.stdout


def test_two_images_in_one_conversation(env):
  """`--image A --image B`: one `<image>` per image in the first turn and image j in slot j: the answer is the
  uncached reference's on both images in that order (and not the one with the images swapped)."""
  from llava_jax.generate import generate_uncached
  im = inference.load_inference_model(str(env / 'model'))
  session = chat.ChatSession(im, max_new_tokens=MAX_NEW, sampling=SamplingParams())
  session.set_image(str(env / '0.png'), str(env / '1.png'))
  answer = session.ask('what is in the image ?', lambda text: None)
  assert session.turns[0]['value'] == '<image>\n<image>\nwhat is in the image ?'
  ids = inference.prompt_ids(im, session.turns[:1])
  assert (ids == im.config.image_token_id).sum() == 2 * im.config.num_image_tokens
  pix = np.stack([inference.load_pixels(im, str(env / f'{i}.png')) for i in range(2)])
  out = inference.generate_batch(im, [ids], [pix], max_new_tokens=MAX_NEW, sampling=SamplingParams())
  assert answer == out.texts[0].strip()
  n = int(out.lengths[0])
  refs = [generate_uncached(im.sampler.model, im.sampler.params, ids[None], pixel_values=p[None],
                            max_new_tokens=MAX_NEW)[0] for p in (pix, pix[::-1])]
  assert n and out.tokens[0][:n].tolist() == refs[0][:n].tolist() and refs[0].tolist() != refs[1].tolist()


def test_missing_image_at_start(env, capsys):
  assert chat.main(['--checkpoint', str(env / 'model'), '--image', str(env / 'nope.png')]) == 2
  assert f'image not found: {env / "nope.png"}' in capsys.readouterr().err


def test_checkpoint_tokenizer_mismatch(env, tmp_path, capsys):
  tok = tiny_tokenizer(with_image_token=False)
  config = tiny_config(image_token_id=36)
  model_dir.save_model(str(tmp_path / 'm'), config, random_params(config, std=0.06), tokenizer=tok)
  assert chat.main(['--checkpoint', str(tmp_path / 'm')]) == 2
  assert "the tokenizer has no '<image>' token" in capsys.readouterr().err
  assert chat.main(['--checkpoint', str(tmp_path / 'absent')]) == 2
  assert 'checkpoint directory not found' in capsys.readouterr().err
