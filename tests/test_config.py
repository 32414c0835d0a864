"""Config loading, overrides and start-up validation: every problem is named by its key, before anything compiles."""
import os

import pytest

from llava_jax.demo import pipeline
from llava_jax.train import __main__ as train_main
from llava_jax.train import cli, config_checks
from llava_jax.train.config_checks import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')
STAGE1 = os.path.join(CONFIGS, 'stage1_pretrain.py')


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp('paths')
  for name in ('data', 'tok', 'clip', 'llm', 's1'):
    (root / name).mkdir()
  return {k: str(root / k) for k in ('data', 'tok', 'clip', 'llm', 's1')}


def filled(paths, stage2=False):
  """Overrides that point every path of a real recipe at existing folders."""
  out = [f'data.train_dir={paths["data"]}', f'data.tokenizer={paths["tok"]}', f'init.vision_from={paths["clip"]}',
         f'init.llm_from={paths["llm"]}']
  return out + ([f'init.projector_from={paths["s1"]}'] if stage2 else [])


def validate(config, num_devices):
  """A stage's checks, or the demo pipeline's."""
  (pipeline.validate if 'stages' in config else config_checks.validate)(config, num_devices=num_devices)


def errors_of(spec, overrides, num_devices=8):
  config = cli.load(spec, overrides)
  with pytest.raises(ConfigError) as e:
    validate(config, num_devices)
  return str(e.value)


@pytest.mark.parametrize('name,variants,stage2', [
    ('stage1_pretrain.py', ('llava_7b', 'llava_13b', 'llava15_7b', 'llava15_13b'), False),
    ('stage2_finetune.py', ('llava_7b', 'llava_13b', 'llava15_7b', 'llava15_13b'), True),
    ('scienceqa.py', ('llava_7b', 'llava_13b', 'llava15_7b', 'llava15_13b'), True),
])
def test_shipped_recipes_validate(paths, name, variants, stage2):
  for variant in variants:
    config = cli.load(os.path.join(CONFIGS, name) + ':' + variant, filled(paths, stage2))
    config_checks.validate(config, num_devices=8)
    model = config_checks.model_config(config)
    assert model.dtype == 'bfloat16' and model.remat_policy == 'full'


def test_paper_recipe_values():
  s1 = cli.load(STAGE1 + ':llava_13b')
  assert (s1.optim.lr, s1.data.global_batch_size, s1.data.template, s1.optim.weight_decay) == (2e-3, 24, 'plain', 0)
  # Packed rows: global_batch_size counts rows (24 rows x 5 captions ~ the paper's 128 samples).
  assert (s1.data.packing, s1.data.row_length, s1.data.max_images_per_row, s1.data.max_length) == (True, 3072, 5, 2048)
  assert config_checks.model_config(s1).projector == 'linear' and s1.train.trainable[0] == ('projector/.*', True)
  s15 = cli.load(STAGE1 + ':llava15_7b')
  assert (s15.optim.lr, s15.data.global_batch_size) == (1e-3, 48)  # 48 rows x 5 ~ the paper's 256 samples
  assert config_checks.model_config(s15).projector == 'mlp2x_gelu'
  assert config_checks.model_config(s15).vision.image_size == 336
  s2 = cli.load(os.path.join(CONFIGS, 'stage2_finetune.py:llava15_7b'))
  assert (s2.optim.lr, s2.data.num_epochs, s2.data.image_aspect, s2.data.group_by_length) == (2e-5, 1, 'pad', True)
  assert s2.data.template == 'vicuna_v1' and s2.optim.warmup_ratio == 0.03
  assert (s2.data.packing, s2.data.global_batch_size, s2.data.row_length, s2.data.max_images_per_row) == (
      True, 24, 5120, 6)  # 24 rows x ~5.8 samples ~ the paper's 128
  assert ('language_model/.*', True) in s2.train.trainable and s2.train.trainable[-1] == ('.*', False)
  s2v1 = cli.load(os.path.join(CONFIGS, 'stage2_finetune.py:llava_7b'))
  assert s2v1.data.num_epochs == 3


def test_overrides_are_typed(paths):
  config = cli.load(STAGE1 + ':llava15_7b', filled(paths) + [
      'optim.lr=5e-4', 'optim.projector_lr=1e-4', 'mesh.shape=(2,-1,1)', 'data.shuffle=false',
      'model.text.num_layers=4', 'train.trainable=(("projector/.*", True), (".*", False))'])
  assert config.optim.lr == 5e-4 and config.optim.projector_lr == 1e-4 and config.data.shuffle is False
  assert tuple(config.mesh.shape) == (2, -1, 1) and config_checks.model_config(config).text.num_layers == 4
  config_checks.validate(config, num_devices=8)


@pytest.mark.parametrize('override,expect', [
    ('optim.lrr=1', "--config.optim.lrr: unknown key 'lrr' under optim; allowed: ['b1', 'b2', 'clip_norm'"),
    ('optimizer.lr=1', "unknown key 'optimizer' under <top level>"),
    ('optim.lr=fast', "--config.optim.lr='fast': expected float"),
    ('data.shuffle=3', "--config.data.shuffle='3': expected bool (true or false)"),
    ('optim=1', '--config.optim is a section'),
    ('data.global_batch_size=8.5', "--config.data.global_batch_size='8.5': expected int"),
])
def test_bad_overrides_name_the_key(override, expect):
  with pytest.raises(ConfigError) as e:
    cli.load(STAGE1 + ':llava15_7b', [override])
  assert expect in str(e.value)


def test_validation_lists_every_problem_with_its_key(paths, tmp_path):
  msg = errors_of(STAGE1 + ':llava15_7b', [
      f'data.train_dir={tmp_path}/missing', 'data.template=vicuna', 'mesh.shape=(2,3,1)', 'optim.warmup_ratio=1.5',
      f'data.tokenizer={paths["tok"]}'])
  lines = msg.splitlines()[1:]
  assert any(f"data.train_dir='{tmp_path}/missing': no such directory" in line for line in lines)
  assert any("data.template='vicuna'; allowed: ['plain', 'vicuna_v0', 'llava_v0', 'v0_mmtag', 'vicuna_v1'" in line
             for line in lines)
  assert any('mesh.shape=(2, 3, 1) does not fit the 8 available devices' in line for line in lines)
  assert any('optim.warmup_ratio=1.5: must be in [0, 1)' in line for line in lines)
  # No init paths: the frozen LLM and encoder would stay random.
  assert any(line.strip().startswith('init.vision_from is not set but vision_tower is frozen') for line in lines)
  assert any(line.strip().startswith('init.llm_from is not set but language_model is frozen') for line in lines)


def test_batch_must_split_over_data_axes_and_accumulation(paths):
  msg = errors_of(STAGE1 + ':llava15_7b', filled(paths) + ['data.global_batch_size=12', 'train.grad_accum_steps=2'])
  assert ('data.global_batch_size=12 is not divisible by the data axes (data x fsdp = 8) times '
          'train.grad_accum_steps=2') in msg
  config = cli.load(STAGE1 + ':llava15_7b', filled(paths) + ['data.global_batch_size=12',
                                                                      'mesh.shape=(1,1,-1)'])
  config_checks.validate(config, num_devices=8)  # pure tensor parallelism: any batch size works


def test_model_section_and_mask_errors(paths):
  msg = errors_of(STAGE1 + ':llava15_7b', filled(paths) + ['model.projector=conv'])
  assert "model: projector='conv'; allowed: ('linear', 'mlp2x_gelu', 'identity')" in msg
  msg = errors_of(STAGE1 + ':llava15_7b', filled(paths) + ['train.trainable=(("projector/.*", True),)'])
  assert "train.trainable: param 'language_model/embed_tokens/embedding' matches no rule" in msg
  msg = errors_of(STAGE1 + ':llava15_7b', filled(paths) + ['train.trainable=(("proj[", True),)'])
  assert "train.trainable=" in msg and "bad regex 'proj['" in msg
  llm_only = 'train.trainable=(("language_model/.*", True), (".*", False))'
  msg = errors_of(STAGE1 + ':llava15_7b', filled(paths) + ['optim.projector_lr=1e-4', llm_only])
  assert 'optim.projector_lr is set but train.trainable freezes the projector' in msg


def test_config_file_errors(tmp_path):
  with pytest.raises(ConfigError, match='no such config file'):
    cli.load(str(tmp_path / 'nope.py'))
  with pytest.raises(ConfigError, match=r"get_config\('llava99'\) failed: variant 'llava99'; allowed"):
    cli.load(STAGE1 + ':llava99')
  typo = tmp_path / 'configs' / 'typo.py'
  typo.parent.mkdir()
  typo.write_text('from configs import common\n\ndef get_config():\n  c = common.stage_config()\n'
                  '  c.optim.learning_rate = 1.0\n  return c\n')
  with pytest.raises(ConfigError, match='learning_rate'):
    cli.load(str(typo))


def test_cli_reports_errors_and_validates(paths, capsys):
  rc = train_main.main(['--config', STAGE1 + ':llava15_7b', '--config.optim.lrr=1'])
  assert rc == 1 and "unknown key 'lrr' under optim" in capsys.readouterr().err
  args = ['--config', STAGE1 + ':llava15_7b', '--validate-only'] + ['--config.' + o for o in filled(paths)]
  assert train_main.main(args) == 0 and 'config OK' in capsys.readouterr().out
  # `--config.key value` (two words) works too.
  assert train_main.main(args + ['--config.optim.lr', '3e-4']) == 0
  rc = train_main.main(args + ['--config.mesh.shape=(3,1,1)'])
  assert rc == 1 and 'mesh.shape=(3, 1, 1) does not fit the 8 available devices' in capsys.readouterr().err


def test_pipeline_workdir_placeholders(tmp_path):
  config = cli.load(os.path.join(CONFIGS, 'demo.py'), [], workdir=str(tmp_path / 'run'))
  assert 'stages' in config
  s2 = config.stages['stage2']
  assert s2.init.projector_from == str(tmp_path / 'run' / 'stage1' / 'model')
  assert s2.data.train_dir.startswith(str(tmp_path / 'run'))
  # Paths a pipeline writes itself are not required to exist before it starts.
  validate(config, 1)
  msg = errors_of(os.path.join(CONFIGS, 'demo.py'), ['stage_order=("stage1","stage3")'], num_devices=1)
  assert "stage_order: unknown stage 'stage3'" in msg


def test_pipeline_demo_sections_are_validated():
  demo = os.path.join(CONFIGS, 'demo.py')
  assert 'vision_warmup.steps=0: must be > 0' in errors_of(demo, ['vision_warmup.steps=0'], num_devices=1)
  msg = errors_of(demo, ['demo.stage2_kinds=("conversation","chat")'], num_devices=1)
  assert 'demo.stage2_kinds' in msg and "subset of ('conversation', 'detail', 'reasoning')" in msg
  config = cli.load(demo, [])
  with config.unlocked():
    del config['demo']
  with pytest.raises(ConfigError, match="vision_warmup: needs the demo section"):
    validate(config, 1)
