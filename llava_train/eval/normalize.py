"""VQAv2 answer normalisation, re-implemented from the rules of the official VQA evaluation script.

The official script (``vqaEval.py`` of the VQA API) normalises an answer in two passes:

1. punctuation: each of a fixed set of punctuation characters is deleted when it touches a space
   (``"p "`` or ``" p"`` occurs in the text) or when the text holds a comma between two digits
   (``"1,000"``); otherwise it is replaced by a space. Then a period is deleted unless a digit follows
   it (``"3.5"`` keeps its decimal point, ``"yes."`` loses its period).
2. words: lower-case, split on whitespace, map number words to digits (``"two"`` -> ``"2"``, and
   ``"none"`` -> ``"0"``), drop the articles a / an / the, restore the apostrophe of contractions
   (``"dont"`` -> ``"don't"``), join with single spaces.

Apostrophes and colons are not punctuation for the script, and upper case survives pass 1 (so the
contraction keys with upper case letters, kept here for fidelity, can never match).
"""

import re

# Characters the official script treats as punctuation (the period has its own rule below).
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# A comma between two digits anywhere in the text switches every punctuation mark to deletion.
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a
# mistyped look-behind that, as written, is a look-ahead that always succeeds before a ".".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) as the positional `count` of re.sub, so at most
# 32 periods are removed. Kept for bit-exact scores.
_PERIOD_MAX_REMOVALS = 32

ARTICLES = frozenset({"a", "an", "the"})

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

# The official contractions table, key -> value (including its oddities, e.g. "somebody'd" ->
# "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def clean_whitespace(text: str) -> str:
    """Replace newlines and tabs by spaces and strip, as the official script does before normalising."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Pass 1 of the official normalisation: punctuation marks, then periods."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The condition looks at the input text, not at the partly processed output (as the original).
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digits_articles(text: str) -> str:
    """Pass 2 of the official normalisation: lower case, number words, articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise one answer with the full official VQAv2 pipeline (whitespace, punctuation, words)."""
    return process_digits_articles(process_punctuation(clean_whitespace(text)))


def textvqa_word_tokenize(text: str) -> str:
    """EvalAI's first step (m4c ``word_tokenize``): lower case, commas and "?" removed, "'s" split off."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_textvqa_answer(text: str) -> str:
    """EvalAI's answer processor, as LLaVA's m4c_evaluator applies it for TextVQA and the VQAv2 submission.

    ``textvqa_word_tokenize``, then the VQA pipeline above. With the commas gone, the "comma between
    digits" switch of the punctuation pass never fires (EvalAI's pattern differs, with the same effect).
    """
    return normalize_vqa_answer(textvqa_word_tokenize(text))
