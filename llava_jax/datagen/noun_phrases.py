"""A lightweight noun-phrase extractor for captions (no spaCy, no POS tagger).

Method: lowercase the caption and split it into word tokens; a noun phrase is a maximal run of
words that are not *boundary* words. Boundary words are punctuation, digits, a closed list of
function words (articles, determiners, pronouns, prepositions, conjunctions, auxiliaries, common
adverbs and number words), a list of verbs common in captions, and by suffix: words of 6+ letters
ending in -ing (participles: "riding", "sitting"; except listed nouns like "building") or in -ed
("parked", "covered"), and words of 6+ letters ending in -ly (adverbs; except listed nouns like
"family"). Runs longer than MAX_WORDS keep their last MAX_WORDS words (the head noun is last in
English noun phrases). Example: "A man riding a brown horse on the beach." -> ["man", "brown horse", "beach"].

It misses what a tagger would catch (unlisted verbs join the neighbouring phrase, adjectives used
alone count as phrases); it is meant for frequency statistics over many captions, where such noise
spreads thinly.
"""
from __future__ import annotations

import re

MAX_WORDS = 4

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|\d+|[^\sa-z\d]")

FUNCTION_WORDS = frozenset('''
a an the this that these those some any each every either neither no its it's his her hers their theirs our
ours my mine your yours whose which what who whom where when why how there here
it he she they we you i him them us me itself himself herself themselves one ones someone something
in on at of with without by for from to into onto over under underneath near nearby next beside besides
behind above below between among through across along around down up out off inside outside against
during while about toward towards upon within beyond past via like than as after before until since
front top bottom side middle back away together
and or but nor so yet if then because though although also either both all several many few lot lots
much more most other another such same own only just very really quite too even still almost
not never always often sometimes already again
is are was were be been being am has have had do does did can could will would may might must shall should
zero two three four five six seven eight nine ten eleven twelve dozen hundred thousand first second third
'''.split())

CAPTION_VERBS = frozenset('''
sit sits sat stand stands stood lie lies lay lays laid hold holds held look looks looked watch watches
ride rides rode walk walks walked run runs ran play plays played eat eats ate drink drinks wear wears wore
carry carries carried stare stares wait waits fly flies flew hang hangs hung pose poses posed take takes
took make makes made show shows showed throw throws threw catch catches caught swing swings hit hits
rest rests lean leans leaned cross crosses cut cuts go goes went get gets got try tries use
uses see sees seen smile smiles fill fills cover covers contain contains feature features appear appears
seem seems keep keeps give gives put puts set sets move moves turn turns pull pulls push pushes
prepare prepares surround surrounds overlook overlooks display displays graze grazes
'''.split())

ING_NOUNS = frozenset('''
building buildings ceiling ceilings clothing painting paintings wedding weddings evening evenings morning
mornings sibling siblings railing railings stuffing frosting icing topping toppings housing pudding dumpling
dumplings lightning awning awnings parking
'''.split())

LY_NOUNS = frozenset('family butterfly dragonfly jelly belly'.split())


def is_boundary(word: str) -> bool:
  if not word[0].isalpha() or word in FUNCTION_WORDS or word in CAPTION_VERBS:
    return True
  if len(word) >= 6 and word.endswith('ing') and word not in ING_NOUNS:
    return True
  if len(word) >= 6 and word.endswith('ed'):
    return True
  return len(word) >= 6 and word.endswith('ly') and word not in LY_NOUNS


def noun_phrases(caption: str) -> list[str]:
  """Noun phrases of one caption, in order of appearance (may repeat)."""
  phrases, run = [], []
  for token in _TOKEN.findall(caption.lower()) + ['.']:
    if is_boundary(token):
      if run:
        phrases.append(' '.join(run[-MAX_WORDS:]))
        run = []
    else:
      run.append(token)
  return phrases
