"""BERT's uncased WordPiece tokenizer, written out by hand, with character offsets into the input
text (what extractive QA needs to turn a predicted token span back into text). Checked token for
token, offsets included, against the reference `tokenizers` implementation on all of SQuAD dev
(tests/test_bert.py)."""

import os
import unicodedata

from plumbing.checkpoints import BERT_HUB_IDS, resolve_checkpoint
from plumbing.cli import InputError


class BertTokenizer:
    """BERT's uncased WordPiece tokenizer from vocab.txt, returning ids and character offsets into
    the input.

    Normalize (drop control chars, whitespace -> ' ', space out CJK chars, strip accents,
    lower-case, one char at a time, keeping each output char's source position), split on whitespace
    and punctuation, then greedy longest-match-first WordPiece with '##' continuations; a word with
    no complete split (or > 100 chars) is [UNK]. Follows the reference `tokenizers` BertNormalizer /
    BertPreTokenizer / WordPiece step for step."""

    WHITESPACE = (set("\t\n\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000")
                  | {chr(c) for c in range(0x2000, 0x200B)})
    CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

    def __init__(self, vocab_path, lowercase=True):
        try:
            with open(vocab_path, encoding="utf-8") as f:
                self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        except OSError as e:
            raise InputError(f"cannot read {vocab_path} ({e.strerror})") from None
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise InputError(f"{vocab_path} has no {special}; is it a BERT vocab.txt?")
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (
            self.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        self.id_to_token = {i: t for t, i in self.vocab.items()}

    @classmethod
    def from_pretrained(cls, name_or_path):
        return cls(os.path.join(resolve_checkpoint(name_or_path, BERT_HUB_IDS,
                                                   extra_files=("vocab.txt",)), "vocab.txt"))

    def normalize(self, text):
        """-> list of (char, index of the input char it came from)."""
        out = []
        for i, c in enumerate(text):
            if c in "\x00\ufffd" or (unicodedata.category(c).startswith("C") and c not in "\t\n\r"):
                continue
            c = " " if c in self.WHITESPACE else c
            if any(lo <= ord(c) <= hi for lo, hi in self.CJK):
                out += [(" ", i), (c, i), (" ", i)]
                continue
            if self.lowercase:
                # strip accents (NFD, drop combining marks), then lower-case: the reference order
                for d in unicodedata.normalize("NFD", c):
                    if unicodedata.category(d) != "Mn":
                        out += [(l, i) for l in d.lower()]
            else:
                out.append((c, i))
        return out

    @staticmethod
    def is_punctuation(c):
        o = ord(c)
        return (33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126
                or unicodedata.category(c).startswith("P"))

    def words(self, text):
        """-> list of (word, sources): sources[j] is the index in `text` of the word's j-th
        character."""
        words, current = [], []
        for c, i in self.normalize(text) + [(" ", len(text))]:
            if c in self.WHITESPACE or self.is_punctuation(c):
                if current:
                    words.append(current)
                if c not in self.WHITESPACE:  # a punctuation char is a word of its own
                    words.append([(c, i)])
                current = []
            else:
                current.append((c, i))
        return [("".join(c for c, _ in w), [i for _, i in w]) for w in words]

    def encode(self, text):
        """-> (ids, offsets): WordPiece ids and (start, end) character spans in `text`, no special
        tokens."""
        ids, offsets = [], []
        for word, sources in self.words(text):
            pieces, begin = [], 0
            while begin < len(word) and len(word) <= 100:
                for stop in range(len(word), begin, -1):  # longest match first
                    piece = word[begin:stop] if begin == 0 else "##" + word[begin:stop]
                    if piece in self.vocab:
                        pieces.append((self.vocab[piece], begin, stop))
                        break
                else:
                    break
                begin = stop
            if begin < len(word) or not pieces:  # no complete split: the whole word is [UNK]
                pieces = [(self.unk_id, 0, len(word))]
            for piece_id, b, e in pieces:
                ids.append(piece_id)
                offsets.append((sources[b], sources[e - 1] + 1))
        return ids, offsets
