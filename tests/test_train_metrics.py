"""The tqdm progress line of the trainer: a line every `every` steps on a pipe, in place on a terminal."""
import io
import re

import jax

from llava_jax.train import metrics

RECORD = {'loss': 2.314, 'lr': 1.9e-3}
TIMED = {**RECORD, 'tokens_per_s': 2310.4, 'samples_per_s': 9.06, 'pad_fraction': 0.031, 'mfu': 0.412}


def run(stream, start=3, total=10, every=3):
  bar = metrics.Progress('s1', total, start=start, every=every, stream=stream)
  for step in range(start + 1, total + 1):
    bar.update(step, TIMED if step % every == 0 else RECORD)
  bar.close()
  return stream.getvalue()


def test_pipe_prints_a_line_every_n_steps_and_at_the_end():
  lines = run(io.StringIO()).splitlines()
  eta = r' ETA (\?|\d\d:\d\d)$'
  assert [re.sub(eta, '', line) for line in lines] == [
      '[s1] 3/10 [######..............]  30%',  # the resumed start
      '[s1] 6/10 [############........]  60%, loss 2.3140 lr 1.90e-03 2,310 tok/s 9.1 samples/s pad 3% MFU 41.2%',
      '[s1] 9/10 [##################..]  90%, loss 2.3140 lr 1.90e-03 2,310 tok/s 9.1 samples/s pad 3% MFU 41.2%',
      '[s1] 10/10 [####################] 100%, loss 2.3140 lr 1.90e-03']
  assert all(re.search(eta, line) for line in lines)


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_terminal_redraws_in_place_and_other_processes_print_nothing(monkeypatch):
  out = run(Terminal())
  assert out.startswith('\r[s1] 3/10') and out.endswith('\n') and out.count('\n') == 1
  assert '\r[s1] 10/10 [####################] 100%, loss 2.3140 lr 1.90e-03 ETA' in out
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert run(io.StringIO()) == run(Terminal()) == ''
