"""The paper's visual chat demo as a Gradio app at /web, in the server's process and on its engine (no
controller or worker processes): image upload, streamed answers, reset, temperature and max-token controls."""
from __future__ import annotations

import asyncio
import hmac
from typing import Optional

import gradio as gr

from llava_jax.data import conversation
from llava_jax.serve.app import prepare, submit
from llava_jax.serve.engine import Engine
from llava_jax.serve.protocol import APIError, Conversation, Limits

WEB_PATH = '/web'


def build_web(engine: Engine, limits: Limits) -> gr.Blocks:

  async def respond(question, turns, shown, image, temperature, max_tokens):
    """Streams the answer to `question`; `turns` are the LLaVA JSON turns so far, `shown` the chat display."""
    question = (question or '').strip()
    if not question:
      yield gr.update(), turns, shown
      return
    if conversation.IMAGE_TOKEN in question:
      question = question.replace(conversation.IMAGE_TOKEN, '')
    value = question if turns or image is None else conversation.IMAGE_TOKEN + '\n' + question
    new_turns = turns + [{'from': 'human', 'value': value}]
    shown = shown + [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': ''}]
    try:
      if image is not None and image.width * image.height > limits.max_image_pixels:
        raise APIError(413, f'the image has {image.width}x{image.height} pixels, over {limits.max_image_pixels}')
      p = prepare(engine, Conversation(new_turns, None, image.convert('RGB') if image is not None else None),
                  max_tokens=int(max_tokens), temperature=float(temperature), top_p=1.0, seed=None)
      req, events = submit(engine, p, asyncio.get_running_loop())
    except APIError as e:
      shown[-1]['content'] = f'[error: {e.message}]'
      yield '', turns, shown
      return
    answer = ''
    try:
      while True:
        ev = await events.get()
        if ev[0] == 'delta':
          answer += ev[1]
          shown[-1]['content'] = answer
          yield '', turns, shown
        else:
          if ev[0] == 'error':
            shown[-1]['content'] = f'{answer}[error: {ev[1]}]'
          break
    finally:
      req.cancel()  # the browser went away mid-answer: free the slot (a no-op once finished)
    yield '', new_turns + [{'from': 'gpt', 'value': answer.strip()}], shown

  with gr.Blocks(title='LLaVA chat') as demo:
    gr.Markdown('## LLaVA chat\nUpload an image, then ask about it.')
    turns = gr.State([])
    with gr.Row():
      with gr.Column(scale=1):
        image = gr.Image(type='pil', label='Image', elem_id='image', sources=['upload'], height=280)
        temperature = gr.Slider(0.0, 2.0, value=0.2, step=0.05, label='Temperature', elem_id='temperature')
        max_tokens = gr.Slider(1, limits.max_tokens, value=min(256, limits.max_tokens), step=1,
                               label='Max new tokens', elem_id='max_tokens')
      with gr.Column(scale=2):
        chat = gr.Chatbot(label='Chat', elem_id='chat', height=420)
        question = gr.Textbox(placeholder='Ask about the image and press Enter', show_label=False,
                              elem_id='question')
        with gr.Row():
          send = gr.Button('Send', variant='primary', elem_id='send')
          reset = gr.Button('Reset', elem_id='reset')
    inputs = [question, turns, chat, image, temperature, max_tokens]
    question.submit(respond, inputs, [question, turns, chat])
    send.click(respond, inputs, [question, turns, chat])
    reset.click(lambda: ([], [], ''), None, [turns, chat, question])
    image.change(lambda: ([], []), None, [turns, chat])  # a new image starts a new conversation
  return demo


def mount_web(app, engine: Engine, *, limits: Limits, api_key: Optional[str] = None):
  """Mounts the chat at /web; with an API key, the browser logs in with any user name and the key."""
  auth = (lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
  return gr.mount_gradio_app(app, build_web(engine, limits), path=WEB_PATH, auth=auth,
                             max_file_size=limits.max_image_bytes, footer_links=[])
