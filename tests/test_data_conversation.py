"""Templates render byte-for-byte the strings of LLAVA.md §2."""
import pytest

from llava_jax.data.conversation import normalize_turns, render, render_pieces
from llava_jax.data.tokenize import build_prompt

CONV = [
    {'from': 'human', 'value': 'What is in the image?\n<image>'},
    {'from': 'gpt', 'value': 'A cat.'},
    {'from': 'human', 'value': 'Is it big?'},
    {'from': 'gpt', 'value': 'No.'},
]
SYS_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions.")
SYS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the human's questions.")
SYS_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
               "that the user provides, and assist the user with a variety of tasks using natural language.")

EXPECTED = {
    'vicuna_v1': SYS_USER + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: Is it big? ASSISTANT: No.</s>",
    'llava_v1': SYS_HUMAN + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: Is it big? ASSISTANT: No.</s>",
    'llava_v0': SYS_HUMAN + "###Human: <image>\nWhat is in the image?###Assistant: A cat.###Human: Is it big?###Assistant: No.###",
    'llava_llama_2': ("[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>"
                      "<s>[INST] Is it big? [/INST] No. </s>"),
}
PROMPT = {
    'vicuna_v1': SYS_USER + " USER: <image>\nWhat is in the image? ASSISTANT:",
    'llava_v1': SYS_HUMAN + " USER: <image>\nWhat is in the image? ASSISTANT:",
    'llava_v0': SYS_HUMAN + "###Human: <image>\nWhat is in the image?###Assistant:",
    'llava_llama_2': "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]",
    'plain': '<image>',
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_multi_turn_strings(name):
  assert render(CONV, name) == EXPECTED[name]


def test_plain_drops_the_human_turn():
  assert render(CONV[:2], 'plain') == '<image>A cat.\n'
  assert render([{'from': 'human', 'value': 'Describe.'}, {'from': 'gpt', 'value': 'Text only.'}], 'plain') == 'Text only.\n'


@pytest.mark.parametrize('name', sorted(PROMPT))
def test_generation_prompt_ends_at_the_assistant_marker(name):
  assert build_prompt(CONV[:1], name) == PROMPT[name]
  # Multi-turn: the full string of the earlier turns, the next question, then the marker.
  if name != 'plain':
    marker = {'llava_v0': '###Assistant:', 'llava_llama_2': '[/INST]'}.get(name, 'ASSISTANT:')
    full = EXPECTED[name]
    assert build_prompt(CONV[:3], name) == full[:full.rindex(marker) + len(marker)]


def test_pieces_mark_exactly_the_answers():
  turns, has_image = normalize_turns(CONV)
  assert has_image
  sup = {name: [t for t, s in render_pieces(turns, name) if s] for name in EXPECTED}
  assert sup['vicuna_v1'] == [' A cat.</s>', ' No.</s>']
  assert sup['llava_v0'] == [' A cat.###', ' No.###']
  assert sup['llava_llama_2'] == [' A cat. </s>', ' No. </s>']
  assert [t for t, s in render_pieces(turns[:2], 'plain') if s] == ['A cat.\n']


def test_image_moves_to_front_and_roles_are_checked():
  turns, _ = normalize_turns([{'from': 'human', 'value': ' Look <image> here '}, {'from': 'gpt', 'value': 'ok'}])
  assert turns[0] == ('user', '<image>\nLook  here')
  # A leading assistant turn is dropped, as in the original.
  turns, has_image = normalize_turns([{'from': 'gpt', 'value': 'hi'}] + CONV[2:])
  assert turns == [('user', 'Is it big?'), ('assistant', 'No.')] and not has_image
  with pytest.raises(ValueError, match='alternate'):
    normalize_turns([{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}])
  with pytest.raises(ValueError, match='unknown role'):
    normalize_turns([{'from': 'robot', 'value': 'a'}])
  # Several images stay where they are (image j = the j-th placeholder); plain keeps them all.
  two = [{'from': 'human', 'value': 'A <image> or B <image>?'}, {'from': 'gpt', 'value': 'B'}]
  turns, num_images = normalize_turns(two)
  assert turns[0] == ('user', 'A <image> or B <image>?') and num_images == 2
  assert render(two, 'plain') == '<image><image>B\n'
  with pytest.raises(ValueError, match='unknown template'):
    render(CONV, 'vicuna_v2')
