"""The demo's synthetic parallel corpus and its word tokenizer.

The pseudo-language (:func:`make_parallel_corpus`) exists so the demo and the tests can show
routing alignment without downloading anything: its sentences are English sentences run
through a fixed, documented transformation, so each pair means exactly the same thing while
sharing no surface token with the anchor.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable

# --------------------------------------------------------------------------------------------
# Pseudo-language
# --------------------------------------------------------------------------------------------

# English lexicon of the generator (every word is one token of the demo tokenizer).
SUBJECTS = ("cat", "dog", "bird", "horse", "farmer", "child", "teacher", "doctor", "king", "queen",
            "fox", "wolf", "girl", "boy", "sailor", "baker")
OBJECTS = ("apple", "book", "ball", "letter", "cake", "ship", "house", "song", "stone", "flower", "key", "map")
ADJECTIVES = ("big", "small", "old", "young", "red", "green", "happy", "quiet", "brave", "clever")
VERBS = ("sees", "finds", "takes", "carries", "paints", "likes", "builds", "reads", "opens", "sells")
PREPOSITIONS = ("in", "near", "under", "behind", "on")
PLACES = ("garden", "river", "forest", "market", "city", "school", "village", "field", "kitchen", "tower")
ADVERBS = ("today", "yesterday", "slowly", "quickly", "often")
ENGLISH_WORDS = ("the",) + SUBJECTS + OBJECTS + ADJECTIVES + VERBS + PREPOSITIONS + PLACES + ADVERBS

OBJECT_MARKER = "ko"  # pseudo-language accusative particle after the object phrase (no English word)
_ONSETS = ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


def _pseudo_word(word: str, salt: int) -> str:
    digest = hashlib.sha256(f"{word}:{salt}".encode()).digest()
    syllables = 2 + digest[0] % 2
    return "".join(_ONSETS[digest[1 + 2 * i] % len(_ONSETS)] + _VOWELS[digest[2 + 2 * i] % len(_VOWELS)]
                   for i in range(syllables))


def pseudo_lexicon() -> dict[str, str]:
    """The fixed English → pseudo-language word map (a bijection, disjoint from English).

    Each content word gets 2–3 consonant-vowel syllables chosen from a SHA-256 of the word, so
    the map is the same on every machine and Python version; "the" has no counterpart.
    """
    taken = set(ENGLISH_WORDS) | {OBJECT_MARKER}
    lexicon = {}
    for word in ENGLISH_WORDS[1:]:
        salt = 0
        while (candidate := _pseudo_word(word, salt)) in taken:
            salt += 1
        taken.add(candidate)
        lexicon[word] = candidate
    return lexicon


def translate(sentence: str, lexicon: dict[str, str] | None = None) -> str:
    """Translate one generated English sentence into the pseudo-language.

    Grammar (English: ``the [ADJ] SUBJ VERB the [ADJ] OBJ [PREP the PLACE] [ADV]``):

    1. word order is verb-final: ``[PLACE PREP] SUBJ [ADJ] OBJ [ADJ] ko [ADV] VERB``;
    2. the prepositional phrase moves to the front and the preposition follows its noun;
    3. adjectives follow their noun; "the" is dropped; the object is marked by the particle "ko";
    4. every remaining word is replaced through :func:`pseudo_lexicon`.

    Meaning is preserved word for word; only the surface tokens and their order change, which
    is the situation SARA targets (same content, different language).
    """
    lexicon = pseudo_lexicon() if lexicon is None else lexicon
    words = sentence.split()
    pos = 0

    def next_word():
        nonlocal pos
        if pos >= len(words):  # a sentence cut short
            raise ValueError(f"not a generated sentence: {sentence!r}")
        pos += 1
        return words[pos - 1]

    def noun_phrase():
        if next_word() != "the":
            raise ValueError(f"not a generated sentence: {sentence!r}")
        adj = None
        if pos < len(words) and words[pos] in ADJECTIVES:
            adj = next_word()
        return [next_word()] + ([adj] if adj else [])

    subject = noun_phrase()
    verb = next_word()
    obj = noun_phrase()
    place = []
    if pos < len(words) and words[pos] in PREPOSITIONS:
        prep, pos = words[pos], pos + 1
        place = noun_phrase() + [prep]
    adverb = []
    if pos < len(words) and words[pos] in ADVERBS:
        adverb, pos = [words[pos]], pos + 1
    unknown = [w for w in place + subject + obj + adverb + [verb] if w not in lexicon]
    if pos != len(words) or unknown:
        raise ValueError(f"not a generated sentence: {sentence!r}")
    out = [lexicon[w] for w in place + subject + obj] + [OBJECT_MARKER] + [lexicon[w] for w in adverb + [verb]]
    return " ".join(out)


def english_sentence(rng: random.Random) -> str:
    """One random English sentence of the generator's grammar."""

    def np(nouns):
        adj = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        return ["the"] + adj + [rng.choice(nouns)]

    words = np(SUBJECTS) + [rng.choice(VERBS)] + np(OBJECTS)
    if rng.random() < 0.6:
        words += [rng.choice(PREPOSITIONS)] + np(PLACES)
    if rng.random() < 0.4:
        words.append(rng.choice(ADVERBS))
    return " ".join(words)


def make_parallel_corpus(num_pairs: int, seed: int = 0, lang: str = "pseudo") -> list[dict]:
    """``num_pairs`` pairs ``{"anchor": English, "target": pseudo-language, "lang": lang}``.

    Deterministic in ``seed`` (its own ``random.Random``, global RNG untouched).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    lexicon = pseudo_lexicon()
    pairs = []
    for _ in range(num_pairs):
        sentence = english_sentence(rng)
        pairs.append({"anchor": sentence, "target": translate(sentence, lexicon), "lang": lang})
    return pairs


SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}{{ eos_token }}"
)


def build_word_tokenizer(words: Iterable[str] | None = None):
    """A word-level tokenizer (whitespace split) built in code, with BOS/EOS and a chat template.

    Default vocabulary: English and pseudo-language words of :func:`make_parallel_corpus`.
    Saved with ``save_pretrained`` it reloads with ``AutoTokenizer``; nothing is downloaded.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        words = list(ENGLISH_WORDS) + list(pseudo_lexicon().values()) + [OBJECT_MARKER]
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + list(CHAT_ROLE_TOKENS) + list(words):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(CHAT_ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
