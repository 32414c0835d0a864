"""Batched question answering: answers equal one-at-a-time generation, missing images counted, reruns resume;
the ScienceQA `predict` -> `score` path end to end."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import pre_tokenizers

from llava_jax import inference, model_dir
from llava_jax.data import conversation
from llava_jax.eval import predict, scienceqa
from llava_jax.generate import SamplingParams
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig

from conftest import random_params, word_tokenizer


def tiny_tokenizer(with_image_token=True):
  """Word-level tokenizer over the template words (others -> <unk>); `<image>` added as a special token."""
  words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(
      conversation.SYSTEM_USER + ' USER: ASSISTANT: what is in the image ?')]
  return word_tokenizer(words, image_token=with_image_token)


def tiny_config(image_token_id, vocab_size=40):
  return LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4,
                          image_size=16),
      text=LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2),
      image_token_id=image_token_id)


def save_tiny_model(path, seed=2, std=0.1):
  """A random model whose answers differ between the test prompts (many seeds give one answer for all)."""
  tok = tiny_tokenizer()
  config = tiny_config(tok.convert_tokens_to_ids(conversation.IMAGE_TOKEN))
  model_dir.save_model(str(path), config, random_params(config, seed, std), tokenizer=tok, template='vicuna_v1')
  return path


def write_image(path, seed):
  rgb = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  model_dir = save_tiny_model(root / 'model')
  (root / 'images').mkdir()
  for i in range(3):
    write_image(root / 'images' / f'{i}.png', i)
  questions = [{'question_id': 'q0', 'image': '0.png', 'text': 'what is in the image ?'},
               {'question_id': 'q1', 'text': 'what is it ?'},
               {'question_id': 'q2', 'image': 'absent.png', 'text': 'what ?'},
               {'question_id': 'q3', 'image': '1.png', 'text': '<image>\nthe image'},
               {'question_id': 'q4', 'image': '2.png', 'text': 'is it in the image ?'},
               {'question_id': 'q5', 'image': '1.png', 'text': 'what is in the image ?'}]
  with open(root / 'questions.jsonl', 'w') as f:
    f.writelines(json.dumps(q) + '\n' for q in questions)
  im = inference.load_inference_model(str(model_dir))
  return dict(root=root, model_dir=model_dir, questions=questions, im=im)


def _answers(path):
  return {a['question_id']: a for a in map(json.loads, open(path))}


def test_answers_equal_single_generation_and_resume(env):
  root, im = env['root'], env['im']
  out = root / 'answers.jsonl'
  logs = []
  stats = predict.answer_questions(im, str(root / 'questions.jsonl'), str(root / 'images'), str(out),
                                   batch_size=3, max_new_tokens=12, model_id='tiny', log=logs.append)
  assert stats == {'questions': 6, 'already_answered': 0, 'answered': 5, 'missing_image': 1}
  assert any('absent.png' in line for line in logs)
  answers = _answers(out)
  assert sorted(answers) == ['q0', 'q1', 'q3', 'q4', 'q5']
  assert answers['q0']['prompt'] == '<image>\nwhat is in the image ?'
  assert answers['q3']['prompt'] == '<image>\nthe image'
  assert answers['q1']['prompt'] == 'what is it ?'
  assert {a['model_id'] for a in answers.values()} == {'tiny'}
  assert len({a['answer_id'] for a in answers.values()}) == 5
  # Each batched answer equals generating that question alone (no batch padding or filler rows).
  for q in env['questions']:
    if q['question_id'] not in answers:
      continue
    pix = inference.load_pixels(im, str(root / 'images' / q['image'])) if 'image' in q else None
    prompt = answers[q['question_id']]['prompt']
    single = inference.generate_batch(im, [inference.prompt_ids(im, [{'from': 'human', 'value': prompt}])], [pix],
                                    max_new_tokens=12, sampling=SamplingParams(), batch_size=1)
    assert answers[q['question_id']]['text'] == single.texts[0].strip()
  assert len({a['text'] for a in answers.values()}) == 5  # q0 and q5 differ only in their image

  # Interrupted run: the last three answers lost, a torn line left behind. The rerun answers exactly those.
  lines = open(out).read().splitlines()
  with open(out, 'w') as f:
    f.write('\n'.join(lines[:2]) + '\n{"question_id": "q4", "te')
  stats = predict.answer_questions(im, str(root / 'questions.jsonl'), str(root / 'images'), str(out),
                                   batch_size=3, max_new_tokens=12, model_id='tiny', log=logs.append)
  assert stats == {'questions': 6, 'already_answered': 2, 'answered': 3, 'missing_image': 1}
  again = _answers(out)
  assert len(open(out).read().splitlines()) == 5
  assert {k: a['text'] for k, a in again.items()} == {k: a['text'] for k, a in answers.items()}


def test_tokenizer_mismatch_errors(env, tmp_path):
  config = env['im'].config
  with pytest.raises(ValueError, match="no '<image>' token"):
    model_dir.check_tokenizer(tiny_tokenizer(with_image_token=False), config, 'x')
  with pytest.raises(ValueError, match='model expects 5'):
    model_dir.check_tokenizer(tiny_tokenizer(), config.replace(image_token_id=5), 'x')
  tok = tiny_tokenizer()
  tok.add_tokens([f'extra{i}' for i in range(5)])  # 42 entries; `<image>` keeps id 36
  small = config.replace(text=dataclasses.replace(config.text, vocab_size=40))
  with pytest.raises(ValueError, match='42 tokens but the model vocabulary is 40'):
    model_dir.check_tokenizer(tok, small, 'x')
  with pytest.raises(FileNotFoundError, match='neither'):
    inference.load_inference_model(str(tmp_path))


def test_scienceqa_predict_then_score(env, capsys):
  root = env['root']
  problems = {'p1': {'question': 'Which?', 'choices': ['a', 'b'], 'answer': 0, 'hint': '', 'image': 'image.png',
                     'subject': 'natural science', 'grade': 'grade2', 'lecture': 'L', 'solution': 'S',
                     'split': 'test'},
              'p2': {'question': 'What?', 'choices': ['a', 'b', 'c'], 'answer': 2, 'hint': 'h', 'image': None,
                     'subject': 'language science', 'grade': 'grade8', 'lecture': 'L', 'solution': 'S',
                     'split': 'test'}}
  sqa = root / 'sqa'
  (sqa / 'images' / 'test' / 'p1').mkdir(parents=True)
  write_image(sqa / 'images' / 'test' / 'p1' / 'image.png', 7)
  (sqa / 'problems.json').write_text(json.dumps(problems))
  (sqa / 'pid_splits.json').write_text(json.dumps({'train': [], 'test': ['p1', 'p2']}))
  scienceqa.main(['convert', '--problems', str(sqa / 'problems.json'), '--image-folder', str(sqa / 'images'),
                  '--out-dir', str(sqa), '--single-pred-prompt'])
  scienceqa.main(['predict', '--checkpoint', str(env['model_dir']), '--questions',
                  str(sqa / 'scienceqa_test_questions.jsonl'), '--image-folder', str(sqa / 'images'),
                  '--out', str(sqa / 'answers.jsonl'), '--batch-size', '2', '--max-new-tokens', '6'])
  answers = _answers(sqa / 'answers.jsonl')
  assert sorted(answers) == ['p1', 'p2'] and answers['p1']['prompt'].startswith('<image>\nWhich?\nContext: N/A')
  assert answers['p1']['prompt'].endswith(scienceqa.SINGLE_PRED_PROMPT)
  capsys.readouterr()
  scienceqa.main(['score', '--problems', str(sqa / 'problems.json'), '--predictions', str(sqa / 'answers.jsonl')])
  result = json.loads(capsys.readouterr().out)
  expected = [scienceqa.parse_answer(answers[p]['text']) for p in ('p1', 'p2')]
  assert result['count'] == 2 and result['missing'] == 0
  assert result['correct'] == (expected[0] == 'A') + (expected[1] == 'C')
  assert result['failed'] == expected.count(scienceqa.FAILED)


def test_hf_directory_answers_like_the_exported_model(env, tmp_path):
  """The same weights exported to an HF LLaVA dir (safetensors + tokenizer) load through the HF path."""
  from llava_jax.convert.flax_to_hf import export_hf_llava
  im = env['im']
  export_hf_llava(str(tmp_path / 'hf'), im.config, im.sampler.params, tokenizer=im.tokenizer)
  hf = inference.load_inference_model(str(tmp_path / 'hf'))
  assert hf.template == inference.DEFAULT_TEMPLATE and hf.config.image_token_id == im.config.image_token_id
  pix = inference.load_pixels(im, str(env['root'] / 'images' / '0.png'))
  messages = [{'from': 'human', 'value': '<image>\nwhat is in the image ?'}]
  texts = [inference.generate_batch(m, [inference.prompt_ids(m, messages)], [pix], max_new_tokens=12,
                                  sampling=SamplingParams()).texts[0] for m in (im, hf)]
  assert texts[0] == texts[1] and texts[0]
