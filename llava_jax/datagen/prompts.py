"""Our own prompts for GPT-assisted instruction data (paper section 3): system messages, hand-written
in-context examples per request kind, and the instruction lists drawn from at random.

Kinds: 'conversation' (multi-turn Q/A with definite answers), 'detail' (one rich description),
'complex' (one question needing step-by-step reasoning). Replies use `Question:` / `Answer:` lines
with `===` between exchanges (conversation, complex) or plain prose (detail).
"""
from __future__ import annotations

KINDS = ('conversation', 'detail', 'complex')

_INPUT = (
    'You are helping build training data for a vision-language assistant. You cannot see the image; '
    'instead you get a description of one image: several captions written by different people about '
    'the same image, then a list of objects, one per line as `category: [x1, y1, x2, y2]`, where the '
    'numbers are the left, top, right and bottom edges of the object as fractions of the image width '
    'and height (0 is the left or top edge, 1 the right or bottom edge).\n\n')

_NO_LEAK = 'Write as someone who sees the image: never mention captions, boxes, coordinates or a description.'

SYSTEM = {
    'conversation': _INPUT + (
        'Write a conversation between a person asking about this image and an assistant who is looking '
        'at it. Cover different things: which objects are present, how many there are, what people or '
        'animals are doing, where things are and how they are placed relative to each other, colours, '
        'the setting. Only ask questions whose answers the description settles for certain; skip '
        'anything uncertain. Write 3 to 6 exchanges. ' + _NO_LEAK + '\n\n'
        'Format: each exchange is a line starting with `Question:` followed by a line starting with '
        '`Answer:`; put a line `===` between exchanges. Write nothing else.'),
    'detail': _INPUT + (
        'Write a rich, detailed description of the image in one or more paragraphs: the scene, the '
        'main objects with their attributes, how many there are, where they are relative to each other, '
        'and what people or animals are doing. Use the object positions to reason about layout and '
        'size. State only what the description supports. ' + _NO_LEAK + ' Write only the description.'),
    'complex': _INPUT + (
        'Ask one question about the image that needs reasoning beyond what is directly visible: the '
        'purpose of an object, what is likely to happen next, why people are doing something, what '
        'risks or difficulties the situation holds, or what background knowledge explains the scene. '
        'Then answer it thoroughly, reasoning step by step from details of the image to the conclusion. '
        'The question must be answerable with confidence. ' + _NO_LEAK + '\n\n'
        'Format: one line starting with `Question:` followed by a line starting with `Answer:`. '
        'Write nothing else.'),
}

_RAIN = '\n'.join([
    'A woman in a yellow raincoat walks a small dog along a wet city sidewalk.',
    'A person holding a red umbrella with a dog on a leash on a rainy street.',
    'A pedestrian and her terrier pass parked cars in the rain.',
    'A rainy day downtown with a woman walking her pet.',
    'A lady under an umbrella while her dog trots beside her.',
    '',
    'person: [0.412, 0.205, 0.598, 0.941]',
    'umbrella: [0.368, 0.102, 0.655, 0.338]',
    'dog: [0.581, 0.702, 0.713, 0.948]',
    'car: [0.000, 0.455, 0.301, 0.802]',
    'car: [0.774, 0.480, 1.000, 0.790]',
])

_BAKING = '\n'.join([
    'Two children decorate cupcakes at a kitchen table.',
    'A boy and a girl putting frosting on small cakes.',
    'Kids sitting at a table covered with baking supplies.',
    'Children making desserts together in a bright kitchen.',
    'A table with cupcakes, a bowl of icing and two kids.',
    '',
    'person: [0.102, 0.150, 0.430, 0.880]',
    'person: [0.560, 0.190, 0.872, 0.905]',
    'dining table: [0.000, 0.610, 1.000, 1.000]',
    'cake: [0.402, 0.702, 0.478, 0.790]',
    'cake: [0.495, 0.715, 0.566, 0.801]',
    'bowl: [0.250, 0.655, 0.372, 0.760]',
    'spoon: [0.612, 0.640, 0.690, 0.700]',
])

EXAMPLES = {
    'conversation': [
        (_RAIN,
         'Question: What is the weather like?\n'
         'Answer: It is raining. The sidewalk is wet and the woman holds an umbrella over her head.\n'
         '===\n'
         'Question: Which animal is with the woman?\n'
         'Answer: A small dog on a leash walks beside her, a little to her right and slightly behind.\n'
         '===\n'
         'Question: How many cars are there?\n'
         'Answer: There are two cars, one parked at the left edge of the street and one at the right edge.\n'
         '===\n'
         'Question: What color is her umbrella?\n'
         'Answer: Her umbrella is red, and it stands out against her yellow raincoat.'),
        (_BAKING,
         'Question: What are the children doing?\n'
         'Answer: They are decorating cupcakes, spreading frosting on them at a kitchen table.\n'
         '===\n'
         'Question: How many cupcakes are on the table?\n'
         'Answer: Two cupcakes are on the table, side by side between the two children.\n'
         '===\n'
         'Question: Where is the bowl?\n'
         'Answer: The bowl sits on the table to the left of the cupcakes, in front of the child on the left.'),
    ],
    'detail': [
        (_RAIN,
         'A rainy city street. In the middle of the picture a woman in a bright yellow raincoat walks '
         'along the wet sidewalk, holding a red umbrella above her head. A small terrier on a leash trots '
         'beside her, just to her right and close to the ground. Two cars are parked along the street, '
         'one at the left edge of the picture and one at the right edge, framing the woman and her dog. '
         'The wet pavement and the umbrella show that it is raining steadily.'),
    ],
    'complex': [
        (_RAIN,
         'Question: Why might the woman be out walking in this weather?\n'
         'Answer: She has a dog on a leash, and dogs need to go outside several times a day whatever the '
         'weather. The raincoat and the umbrella show she planned to be outdoors in the rain rather than '
         'being caught by it. So the most likely reason is her dog\'s regular walk, which cannot simply '
         'be skipped because it is raining.'),
        (_BAKING,
         'Question: What should an adult watch out for while the children do this activity?\n'
         'Answer: The children are decorating cupcakes at a table with a bowl of icing and a spoon. '
         'Frosting and sprinkles spill easily, so the table and floor may get sticky. Cupcakes are often '
         'decorated right after baking, so the oven or the baking trays nearby may still be hot. Young '
         'children also tend to eat a lot of sugar during such an activity. An adult should keep hot '
         'items out of reach, help with the mess, and limit how much icing the children eat.'),
    ],
}

# The human turn of a 'detail' sample: one drawn at random per image.
DETAIL_INSTRUCTIONS = (
    'Describe the image in detail.',
    'Give a thorough description of what this picture shows.',
    'What is happening in this image? Describe it in as much detail as you can.',
    'Walk me through everything you can see in this photo.',
    'Write a detailed account of the scene in the image.',
    'Provide an in-depth description of this image, including the objects and where they are.',
    'Explain in detail what you observe in this picture.',
    'Describe this photo thoroughly, covering the setting, the objects and any activity.',
    'Could you give me a comprehensive description of the image?',
    'Tell me about this image in detail.',
)

# The human turn of a stage-1 (caption) sample: one drawn at random per pair.
BRIEF_INSTRUCTIONS = (
    'Describe the image briefly.',
    'Give a short caption for this image.',
    'What does this picture show, in a few words?',
    'Summarize the image in one sentence.',
    'Write a concise description of the photo.',
    'Provide a brief caption for the picture.',
    'In one sentence, what is in this image?',
    'Briefly say what you see in the image.',
    'Give a one-line summary of this photo.',
    'Caption this image concisely.',
)


def build_messages(kind: str, context: str) -> list[dict]:
  """System message, in-context examples as user/assistant turns, then the image's context."""
  if kind not in SYSTEM:
    raise ValueError(f'kind={kind!r}; allowed: {KINDS}')
  messages = [{'role': 'system', 'content': SYSTEM[kind]}]
  for example_context, example_reply in EXAMPLES[kind]:
    messages.append({'role': 'user', 'content': example_context})
    messages.append({'role': 'assistant', 'content': example_reply})
  messages.append({'role': 'user', 'content': context})
  return messages
