"""`python -m llava_jax.data.inspect`: JSON lines equal to the training tokenization, pretty view."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from data_fixtures import CONV, TEXT_CONV, llama_tokenizer
from llava_jax.data import inspect as inspect_cli
from llava_jax.demo.synthetic import build_demo_tokenizer
from llava_jax.data.tokenize import tokenize_conversation


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('inspect')
  data = [{'id': 'a', 'image': 'x.png', 'conversations': CONV}, {'id': 'b', 'conversations': TEXT_CONV},
          {'id': 'bad', 'conversations': [{'from': 'alien', 'value': 'x'}]}, {'id': 'c', 'conversations': TEXT_CONV}]
  (root / 'data.json').write_text(json.dumps(data))
  build_demo_tokenizer(str(root / 'demo_tok'), texts=['What is in the image? A cat. How many? 3 cats'] * 5,
                       vocab_size=300)
  llama_tokenizer(str(root / 'spm'), legacy=False)
  return root


def test_json_lines_match_training_tokenization(files, capsys):
  assert inspect_cli.main(['--data', str(files / 'data.json'), '--tokenizer', str(files / 'demo_tok'),
                           '--template', 'vicuna_v1', '--num-image-tokens', '3', '--limit', '3']) == 0
  out = capsys.readouterr()
  lines = [json.loads(l) for l in out.out.splitlines()]
  assert [l['id'] for l in lines] == ['a', 'b']
  assert "sample 'bad' (#2): cannot tokenize" in out.err and '1 malformed' in out.err
  tok = AutoTokenizer.from_pretrained(str(files / 'demo_tok'))
  for line, conv in zip(lines, (CONV, TEXT_CONV)):
    ref = tokenize_conversation(conv, tok, 'vicuna_v1', 3, None)
    assert line['input_ids'] == ref['input_ids'].tolist() and line['labels'] == ref['labels'].tolist()


def test_pretty_highlights_supervised_tokens(files, capsys):
  assert inspect_cli.main(['--data', str(files / 'data.json'), '--tokenizer', str(files / 'spm'),
                           '--template', 'vicuna_v1', '--num-image-tokens', '4', '--limit', '1', '--pretty',
                           '--color', 'never']) == 0
  out = capsys.readouterr()
  assert 'no <image> token; added it as id 32000' in out.err
  json_line, pretty = out.out.splitlines()
  assert json.loads(json_line)['id'] == 'a'
  assert '|<image>x4|' in pretty
  assert pretty.startswith('<s>| A| chat| between|')
  assert pretty.endswith('ASS|IST|ANT|:|[[ |3| cats|</s>]]')  # SentencePiece: ' ' then '3'
  assert 'ASS|IST|ANT|:|[[ A| cat|.|</s>]]| US|ER|:' in pretty
  assert pretty.count('[[') == 2
  colored = inspect_cli.main(['--data', str(files / 'data.json'), '--tokenizer', str(files / 'spm'),
                              '--template', 'plain', '--limit', '1', '--pretty', '--color', 'always',
                              '--num-image-tokens', '2'])
  # plain keeps only the image and the answers (legacy SentencePiece: '▁A' after the special token)
  assert colored == 0 and '|<image>x2|\x1b[32m A| cat|.|\\n|3| cats|\\n\x1b[0m' in capsys.readouterr().out


def test_module_entry_point(files):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  r = subprocess.run([sys.executable, '-m', 'llava_jax.data.inspect', '--help'], capture_output=True, text=True, env=env)
  assert r.returncode == 0 and '--num-image-tokens' in r.stdout and '--pretty' in r.stdout
