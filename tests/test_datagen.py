"""datagen: COCO contexts, reply parsing, instruct runs against the fake chat server (faults, resume,
kill), pretrain samples and the concept-balanced filter."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from chat_server import ChatServer, last_user_message
from llava_jax import api_client
from llava_jax.datagen import __main__ as datagen_main
from llava_jax.datagen import coco, instruct, noun_phrases, pretrain, prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = {1: ('alpha', 'dog', 'sofa'), 2: ('bravo', 'cat', 'bed'), 3: ('charlie', 'horse', 'field'),
          4: ('delta', 'bird', 'branch'), 5: ('echo', 'cow', 'road'), 6: ('foxtrot', 'duck', 'pond')}
MALFORMED = {('charlie', 'complex'), ('delta', 'detail')}  # the fixture server answers these badly
GARBAGE = 'echo'  # every request about this scene gets garbage content
N_REQUESTS, N_REJECTED = 18, 5


def write_coco(folder):
  """Six captioned images (ids 1..6), one without captions (7), one zero-size and one unknown-category box."""
  images = [{'id': i, 'file_name': f'{i:012d}.jpg', 'width': 640, 'height': 480} for i in range(1, 8)]
  captions, instances = [], []
  for i, (name, animal, thing) in SCENES.items():
    captions += [{'id': 10 * i, 'image_id': i, 'caption': f'The {name} scene: a {animal} on a {thing}.'},
                 {'id': 10 * i + 1, 'image_id': i, 'caption': f'  A  {animal} resting\non the {thing}. '}]
    instances += [{'id': 10 * i, 'image_id': i, 'category_id': 1, 'bbox': [64, 48, 256, 192]},
                  {'id': 10 * i + 1, 'image_id': i, 'category_id': 2, 'bbox': [600, 400, 100, 100]}]
  instances += [{'id': 99, 'image_id': 1, 'category_id': 1, 'bbox': [10, 10, 0, 5]},
                {'id': 98, 'image_id': 1, 'category_id': 9, 'bbox': [10, 10, 5, 5]}]
  categories = [{'id': 1, 'name': 'animal'}, {'id': 2, 'name': 'dining table'}]
  paths = os.path.join(folder, 'captions.json'), os.path.join(folder, 'instances.json')
  with open(paths[0], 'w') as f:
    json.dump({'images': images, 'annotations': captions}, f)
  with open(paths[1], 'w') as f:
    json.dump({'images': images, 'annotations': instances, 'categories': categories}, f)
  return paths


def fixture_reply(request):
  kind = next(k for k, s in prompts.SYSTEM.items() if request['messages'][0]['content'] == s)
  name = re.search(r'The (\w+) scene', last_user_message(request)).group(1)
  animal, thing = next((a, t) for n, a, t in SCENES.values() if n == name)
  if (name, kind) in MALFORMED and not fixture_reply.fixed:
    return {'complex': 'Question: Why?\nAnswer: Because.\n===\nQuestion: And?\nAnswer: So.',
            'detail': 'Too short.'}[kind]
  if kind == 'conversation':
    return (f'Question: What animal is in the {name} picture?\nAnswer: A {animal}.\n===\n'
            f'Question: <image>\nWhere is the {animal}?\nAnswer: It is on the {thing},\nnear the middle.')
  if kind == 'detail':
    return f'The {name} picture shows a {animal} resting on a {thing} in soft daylight, calm and still.'
  return f'**Question:** Why is the {animal} on the {thing}?\n**Answer:** It rests there because it is safe.'


fixture_reply.fixed = False


@pytest.fixture(scope='module')
def server():
  with ChatServer(fixture_reply) as s:
    yield s


@pytest.fixture(autouse=True)
def no_faults_left(server):
  yield
  server.clear_faults()


@pytest.fixture(scope='module')
def coco_files(tmp_path_factory):
  return write_coco(str(tmp_path_factory.mktemp('coco')))


@pytest.fixture(scope='module')
def contexts(coco_files):
  ctxs, stats = coco.load_coco_contexts(*coco_files)
  assert (stats.images, stats.no_caption, stats.bad_boxes) == (7, 1, 2)
  return ctxs


def make_client(server, **overrides):
  cfg = dict(base_url=server.base_url, model='m', api_key_env=None, concurrency=3, max_retries=2, timeout_s=5.0)
  cfg.update(overrides)
  # retry waits are not waited for (their timing is tested in test_api_client.py)
  return api_client.ChatClient(api_client.ClientConfig(**cfg), sleep=lambda seconds: None, log=lambda m: None)


def run(server, contexts, out, **kwargs):
  logs = []
  stats = instruct.run_instruct(make_client(server, **kwargs.pop('client', {})), contexts, out,
                                log=logs.append, **kwargs)
  assert logs[-1].startswith('stats: requests=')
  return stats


def read_outputs(out):
  with open(os.path.join(out, 'llava_instruct.json')) as f:
    samples = json.load(f)
  with open(os.path.join(out, 'rejects.jsonl')) as f:
    rejects = [json.loads(line) for line in f]
  return samples, rejects


@pytest.fixture(scope='module')
def clean_run(server, contexts, tmp_path_factory):
  """The uninterrupted reference run: only the garbage scene fails."""
  out = str(tmp_path_factory.mktemp('clean'))
  server.clear_faults()
  server.add_fault('garbage', match=GARBAGE, times=None)
  n = len(server.requests)
  stats = run(server, contexts, out)
  assert len(server.requests) - n == N_REQUESTS
  server.clear_faults()
  return out, stats


def test_contexts(contexts):
  assert [c.image_id for c in contexts] == [1, 2, 3, 4, 5, 6]
  assert contexts[0].file_name == '000000000001.jpg'
  assert contexts[0].render() == (
      'The alpha scene: a dog on a sofa.\n'
      'A dog resting on the sofa.\n'
      '\n'
      'animal: [0.100, 0.100, 0.500, 0.500]\n'
      'dining table: [0.938, 0.833, 1.000, 1.000]')


def test_messages_have_system_examples_and_context(contexts):
  ctx = contexts[0].render()
  for kind in prompts.KINDS:
    m = prompts.build_messages(kind, ctx)
    assert m[0] == {'role': 'system', 'content': prompts.SYSTEM[kind]}
    assert [x['role'] for x in m[1:-1]] == ['user', 'assistant'] * len(prompts.EXAMPLES[kind])
    assert m[-1] == {'role': 'user', 'content': ctx}
    for _, example_reply in prompts.EXAMPLES[kind]:  # our own examples parse with our own parser
      instruct.parse_reply(kind, example_reply, instruction='Describe.')
  assert len(set(prompts.SYSTEM.values())) == 3


def test_parse_reply():
  turns = instruct.parse_reply('conversation', '**Question:** How many <image> dogs?\n**Answer:** Two.\n'
                                               '===\nQuestion: Colour?\nAnswer: Brown,\nwith white paws.')
  assert turns == [{'from': 'human', 'value': '<image>\nHow many dogs?'}, {'from': 'gpt', 'value': 'Two.'},
                   {'from': 'human', 'value': 'Colour?'}, {'from': 'gpt', 'value': 'Brown,\nwith white paws.'}]
  detail = instruct.parse_reply('detail', 'A dog sleeps on a sofa next to a lamp in a room.',
                                instruction='Describe the image in detail.')
  assert detail[0] == {'from': 'human', 'value': '<image>\nDescribe the image in detail.'}
  bad = {
      ('conversation', 'Sure! Here it is.\nQuestion: A?\nAnswer: B.'): 'text before the first Question',
      ('conversation', 'Question: A?\nQuestion: B?\nAnswer: C.'): 'exchange 1 is not',
      ('conversation', 'Question: A?'): 'exchange 1 is not',
      ('conversation', 'Question: A?\nAnswer: ...'): 'empty question or answer',
      ('conversation', '@@ garbage @@'): 'text before the first Question',
      ('complex', 'Question: A?\nAnswer: B.\nQuestion: C?\nAnswer: D.'): '2 exchanges',
      ('detail', 'Too short.'): '2 words',
      ('detail', 'Question: what?\nAnswer: a dog sitting on a sofa in the room'): 'Question:/Answer: lines',
      ('detail', 'a1 b2 c3 d4 e5 f6 g7 h8 #### ++++ //// ==== %%%% &&&&'): 'mostly not words',
  }
  for (kind, text), reason in bad.items():
    with pytest.raises(instruct.MalformedReply, match=reason):
      instruct.parse_reply(kind, text, instruction='x')
  with pytest.raises(instruct.MalformedReply, match='finish_reason=length'):
    instruct.parse_reply('detail', 'A dog sleeps on a sofa next to a lamp in a room.', finish_reason='length')


def test_clean_run_outputs(clean_run, contexts):
  out, stats = clean_run
  samples, rejects = read_outputs(out)
  accepted = N_REQUESTS - N_REJECTED
  assert (stats['accepted'], stats['rejected'], stats['pending'], stats['failed']) == (accepted, N_REJECTED, 0, 0)
  assert stats['requests'] == N_REQUESTS and stats['total_tokens'] > 0
  assert stats['tokens_stored'] == stats['total_tokens']
  ids = [s['id'] for s in samples]
  assert len(ids) == len(set(ids)) == accepted
  assert sorted((r['image_id'], r['kind']) for r in rejects) == [(3, 'complex'), (4, 'detail'), (5, 'complex'),
                                                                 (5, 'conversation'), (5, 'detail')]
  assert all(r['reason'] and r['reply'] for r in rejects)
  first = samples[0]
  assert first['id'] == '1_conversation' and first['image'] == '000000000001.jpg'
  assert first['conversations'] == [
      {'from': 'human', 'value': '<image>\nWhat animal is in the alpha picture?'},
      {'from': 'gpt', 'value': 'A dog.'},
      {'from': 'human', 'value': 'Where is the dog?'},
      {'from': 'gpt', 'value': 'It is on the sofa,\nnear the middle.'}]
  detail = next(s for s in samples if s['id'] == '1_detail')
  human = detail['conversations'][0]['value']
  assert human.startswith('<image>\n') and human[len('<image>\n'):] in prompts.DETAIL_INSTRUCTIONS
  rejected = {f'{r["image_id"]}_{r["kind"]}' for r in rejects}
  assert [s['id'] for s in samples] == [f'{i}_{k}' for i in SCENES for k in prompts.KINDS
                                        if f'{i}_{k}' not in rejected]
  for s in samples:  # every sample talks about its own image
    name, animal, _ = SCENES[int(s['id'].split('_')[0])]
    text = ' '.join(t['value'] for t in s['conversations'])
    assert text.count('<image>') == 1 and s['conversations'][0]['value'].startswith('<image>\n')
    assert animal in text and (name in text or s['id'].endswith('complex')), s['id']


def test_faulty_server_loses_nothing_and_rerun_finishes(server, contexts, clean_run, tmp_path):
  out = str(tmp_path)
  server.add_fault('429', match='alpha', times=2, retry_after_ms=5)
  server.add_fault('500', match='bravo', times=1)
  server.add_fault('badjson', match='charlie', times=1)
  server.add_fault('slow', match='delta', times=1, delay=3.0)
  server.add_fault('drop', match='foxtrot', times=1)
  server.add_fault('garbage', match=GARBAGE, times=None)
  server.add_fault('500', match='foxtrot', times=None)  # down for good during this run
  first = run(server, contexts, out, client={'timeout_s': 2.0})
  assert (first['accepted'], first['rejected'], first['pending'], first['failed']) == (10, 5, 3, 3)
  # 15 stored + 5 transient faults on them + 3 foxtrot requests x 3 attempts (one of them dropped)
  assert first['requests'] == 15 + 5 + 9 and first['retries'] == 5 + 3 * 2
  server.clear_faults()
  server.add_fault('garbage', match=GARBAGE, times=None)
  n = len(server.requests)
  second = run(server, contexts, out)
  assert len(server.requests) - n == 3 and second['skipped'] == 15
  assert (second['accepted'], second['rejected'], second['pending']) == (13, 5, 0)
  assert second['tokens_stored'] == clean_run[1]['total_tokens']
  assert read_outputs(out) == read_outputs(clean_run[0])


def test_resume_after_partial_store_matches_clean_run(server, contexts, clean_run, tmp_path):
  out = str(tmp_path)
  with open(os.path.join(clean_run[0], 'responses.jsonl')) as f:
    lines = f.readlines()
  with open(os.path.join(out, 'responses.jsonl'), 'w') as f:  # three lost, one cut mid-write
    f.writelines(lines[:-4] + [lines[-4][:40]])
  server.add_fault('garbage', match=GARBAGE, times=None)
  n = len(server.requests)
  stats = run(server, contexts, out)
  assert len(server.requests) - n == 4 and stats['skipped'] == N_REQUESTS - 4
  assert read_outputs(out) == read_outputs(clean_run[0])


def test_killed_process_resumes_to_same_result(server, coco_files, contexts, clean_run, tmp_path):
  out = str(tmp_path / 'out')
  server.add_fault('garbage', match=GARBAGE, times=None)
  server.add_fault('slow', times=None, delay=0.08)
  cmd = [sys.executable, '-m', 'llava_jax.datagen', 'instruct', '--captions', coco_files[0],
         '--instances', coco_files[1], '--out', out, '--base-url', server.base_url, '--model', 'm',
         '--api-key-env', '', '--concurrency', '1']
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  store = os.path.join(out, 'responses.jsonl')
  deadline = time.time() + 20
  while time.time() < deadline:
    if os.path.exists(store) and open(store).read().count('\n') >= 5:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  with open(store) as f:
    done = f.read().count('\n')
  assert 5 <= done < N_REQUESTS
  assert not os.path.exists(os.path.join(out, 'llava_instruct.json'))  # killed before the end
  with ChatServer(fixture_reply) as fresh:  # requests still in flight from the killed run cannot count here
    fresh.add_fault('garbage', match=GARBAGE, times=None)
    stats = run(fresh, contexts, out)
    assert len(fresh.requests) == N_REQUESTS - done and stats['skipped'] == done
  assert read_outputs(out) == read_outputs(clean_run[0])


def test_retry_rejects(server, contexts, clean_run, tmp_path):
  out = str(tmp_path)
  shutil.copy(os.path.join(clean_run[0], 'responses.jsonl'), out)
  fixture_reply.fixed = True
  try:
    n = len(server.requests)
    assert run(server, contexts, out)['requests'] == 0  # rejects are final unless asked
    stats = run(server, contexts, out, retry_rejects=True)
  finally:
    fixture_reply.fixed = False
  assert len(server.requests) - n == N_REJECTED
  assert (stats['accepted'], stats['rejected']) == (N_REQUESTS, 0)


def test_cli_dry_run_and_errors(coco_files, capsys, tmp_path):
  rc = datagen_main.main(['instruct', '--captions', coco_files[0], '--instances', coco_files[1],
                          '--out', str(tmp_path), '--dry-run', '--kinds', 'detail,complex', '--limit', '2'])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0 and out['requests'] == 4 and out['first_request']['key'] == '1:detail'
  assert out['first_request']['messages'][0]['content'] == prompts.SYSTEM['detail']
  rc = datagen_main.main(['instruct', '--captions', str(tmp_path / 'nope.json'), '--out', str(tmp_path),
                          '--model', 'm', '--api-key-env', ''])
  assert rc == 2 and 'nope.json' in capsys.readouterr().err
  with pytest.raises(SystemExit, match='unknown kind'):
    datagen_main.main(['instruct', '--captions', coco_files[0], '--out', str(tmp_path), '--kinds', 'chat'])


def test_demo_dataset_feeds_instruct(tmp_path):
  """The built-in demo dataset's COCO files are valid `instruct` input, end to end."""
  from llava_jax.demo import synthetic
  paths = synthetic.write_demo(str(tmp_path / 'demo'), num_train=3, num_qa=0, image_size=16, tokenizer=False)['paths']
  ctxs, stats = coco.load_coco_contexts(paths['captions_train'], paths['instances_train'])
  assert len(ctxs) == 3 and (stats.no_caption, stats.bad_boxes) == (0, 0)
  with open(paths['instances_train']) as f:
    inst = json.load(f)
  names = {c['id']: c['name'] for c in inst['categories']}
  first = [a for a in inst['annotations'] if a['image_id'] == ctxs[0].image_id][0]
  x, y, w, h = first['bbox']
  line = coco.format_box(names[first['category_id']], (x / 16, y / 16, (x + w) / 16, (y + h) / 16))
  assert line in ctxs[0].render().splitlines()

  def reply(request):
    first_caption = last_user_message(request).splitlines()[0]
    if request['messages'][0]['content'] == prompts.SYSTEM['detail']:
      return f'The picture shows this: {first_caption} Everything sits on a plain white background.'
    return f'Question: What is in the image?\nAnswer: {first_caption}'

  with ChatServer(reply) as server:
    result = run(server, ctxs, str(tmp_path / 'out'))
  assert (result['accepted'], result['rejected'], result['pending']) == (9, 0, 0)
  samples, _ = read_outputs(str(tmp_path / 'out'))
  files = {c.image_id: c.file_name for c in ctxs}
  assert all(s['image'] == files[int(s['id'].split('_')[0])] for s in samples)
  assert all(os.path.exists(os.path.join(paths['images'], s['image'])) for s in samples)


# --------------------------------------------------------------------------------------------------
# pretrain

FILTER_CAPTIONS = [
    'A dog on the grass.', 'A dog in the park.', 'A dog with a ball.', 'A dog on a sofa.',
    'A dog near the lake.', 'A cat on the beach.', 'A cat in the park.', 'A cat near a window.',
    'A purple giraffe under an umbrella.', 'Two horses on the beach.', 'A boat on the beach.', 'It is there.',
]


def test_noun_phrases():
  cases = {
      'A man riding a brown horse on the beach.': ['man', 'brown horse', 'beach'],
      'Two dogs playing with a red frisbee in a grassy park': ['dogs', 'red frisbee', 'grassy park'],
      'A tall building next to a parked car.': ['tall building', 'car'],
      "A woman's hat sits on the kitchen table, covered with flour": ["woman's hat", 'kitchen table', 'flour'],
      'A cat sleeping quietly on a wooden bench near the window': ['cat', 'wooden bench', 'window'],
      'people standing in front of a large old stone clock tower at 12': ['people', 'old stone clock tower'],
      'a very big old red wooden toy box': ['red wooden toy box'],  # runs keep their last 4 words
      'It is there.': [],
  }
  for caption, expected in cases.items():
    assert noun_phrases.noun_phrases(caption) == expected, caption


def test_concept_balanced_filter_numbers():
  keep, stats = pretrain.concept_balanced_filter(FILTER_CAPTIONS, min_freq=3, max_per_phrase=4, seed=0)
  # dog 5, cat 3, beach 3, park 2, nine phrases once; kept: beach, cat, dog (capped to 4 of its 5)
  counts = (stats.captions, stats.phrases, stats.rare_phrases, stats.capped_phrases, stats.no_phrase)
  assert counts == (12, 13, 10, 1, 1)
  assert stats.selected == len(keep) == 9
  assert {5, 6, 7, 9, 10} <= set(keep) and len(set(keep) & {0, 1, 2, 3, 4}) == 4 and not {8, 11} & set(keep)
  assert keep == sorted(keep)
  assert pretrain.concept_balanced_filter(FILTER_CAPTIONS, min_freq=3, max_per_phrase=4, seed=0)[0] == keep
  dropped = {seed: ({0, 1, 2, 3, 4} - set(pretrain.concept_balanced_filter(
      FILTER_CAPTIONS, min_freq=3, max_per_phrase=4, seed=seed)[0])).pop() for seed in range(8)}
  assert len(set(dropped.values())) > 1  # the capped subset depends on the seed
  assert pretrain.concept_balanced_filter(FILTER_CAPTIONS, min_freq=2)[0] == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10]
  assert pretrain.concept_balanced_filter(FILTER_CAPTIONS, min_freq=1)[0] == list(range(11))
  assert pretrain.concept_balanced_filter(FILTER_CAPTIONS, min_freq=6)[0] == []


def test_pretrain_cli(tmp_path, capsys):
  tsv = tmp_path / 'pairs.tsv'
  rows = ['caption\timage\textra'] + [f'{c}\timg/{i:03d}.jpg\tx' for i, c in enumerate(FILTER_CAPTIONS)]
  rows.append('\timg/empty.jpg\tx')  # empty caption: skipped and counted
  tsv.write_text('\n'.join(rows) + '\n')
  out = tmp_path / 'chat.json'
  assert datagen_main.main(['pretrain', '--input', str(tsv), '--out', str(out)]) == 0
  assert '13 pairs read' in capsys.readouterr().err
  samples = json.loads(out.read_text())
  assert len(samples) == 12
  assert samples[3]['id'] == '003' and samples[3]['image'] == 'img/003.jpg'
  instructions = set()
  for s, caption in zip(samples, FILTER_CAPTIONS):
    human, gpt = s['conversations']
    assert human['from'] == 'human' and gpt == {'from': 'gpt', 'value': caption}
    assert human['value'].startswith('<image>\n') and human['value'][8:] in prompts.BRIEF_INSTRUCTIONS
    instructions.add(human['value'])
  assert len(instructions) > 3
  assert datagen_main.main(['pretrain', '--input', str(tsv), '--out', str(out), '--filter',
                            '--max-per-phrase', '4']) == 0
  err = capsys.readouterr().err
  assert 'rare_phrases=10' in err and 'selected=9' in err
  filtered = json.loads(out.read_text())
  assert len(filtered) == 9 and all(s in samples for s in filtered)  # same instruction per id
  jsonl = tmp_path / 'pairs.jsonl'
  jsonl.write_text('{"file": "a.jpg", "text": "A dog.", "id": 7}\n\n{"file": "b.jpg", "text": "A cat."}\n')
  assert datagen_main.main(['pretrain', '--input', str(jsonl), '--out', str(out), '--image-key', 'file',
                            '--caption-key', 'text']) == 0
  assert [(s['id'], s['image']) for s in json.loads(out.read_text())] == [('7', 'a.jpg'), ('b', 'b.jpg')]
  assert datagen_main.main(['pretrain', '--input', str(jsonl), '--out', str(out)]) == 2
  assert "line 1 lacks 'image'" in capsys.readouterr().err
  help_text = datagen_main.build_parser()._subparsers._group_actions[0].choices['pretrain'].format_help()
  assert 'fewer than --min-freq' in help_text and '(default: 3)' in help_text and '(default: 100)' in help_text
