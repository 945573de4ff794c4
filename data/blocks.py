"""Turn token sequences into training blocks: sentence-end cuts, the pieces of each packing, best fit.

Cuts happen in token space on the document's own encoding, so a piece is exactly the tokens
the whole text encodes to (no re-tokenization at the seams). A byte-level BPE may spell Chinese
punctuation as several byte tokens (GPT-2 spells "，" as three), so cut points are found on the
decoded bytes: a cut may fall after a token whose end is a sentence end (data.records.SENTENCE_END),
else a clause end (，；：、 or a line end), else any character boundary.
"""
import hashlib
import re
from array import array
from bisect import bisect_left, insort
from functools import lru_cache

import numpy as np

from data.records import SENTENCE_END
from data.tokenizer import Tokenizer

PACKINGS = ("stream", "aligned", "packed")  # prepare.py's --packing, meta.json's "packing"
CLAUSE_END = re.compile(r"[，；：、,;:](?=[\w\s]|$)|\n")


@lru_cache(maxsize=4)  # keyed on the Tokenizer object: load_tokenizer and tokenizer_of cache those
def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Bytes of each id's text, (pad_id + 1,): EOT and PAD count 0 (no text)."""
    return np.array([len(tok.token_bytes(i)) for i in range(tok.eot_id)] + [0, 0], dtype=np.int64)


class CutPoints:
    """cuts[kind]: the token counts p (a sorted array) at which tokens[:p] ends at a sentence
    end ("sentence"), a clause end ("clause") or a character boundary ("hard"), for one
    document's token array under tok. A kind is found when best_cut first asks for it: most documents
    have a sentence end in every block and never need the other two."""

    def __init__(self, tokens: np.ndarray, tok: Tokenizer):
        self.raw = tok.enc.decode_bytes(tokens.tolist())
        self.tok_ends = np.cumsum(token_byte_lengths(tok)[tokens])      # byte offset after each token
        self.starts_char = np.ones(len(self.raw) + 1, dtype=bool)     # byte offset -> a character starts
        self.starts_char[:-1] = (np.frombuffer(self.raw, dtype=np.uint8) & 0xC0) != 0x80
        self.text = self.raw.decode("utf-8", errors="replace")
        self.char_starts = np.flatnonzero(self.starts_char)
        # undecodable bytes: only character boundaries are safe
        none = np.zeros(0, dtype=np.int64)
        self.found = {} if len(self.text) + 1 == len(self.char_starts) else {"sentence": none, "clause": none}

    def __getitem__(self, kind: str) -> np.ndarray:
        if kind not in self.found:
            if kind == "hard":
                self.found[kind] = np.flatnonzero(self.starts_char[self.tok_ends]) + 1
            else:
                pattern = SENTENCE_END if kind == "sentence" else CLAUSE_END
                ends = np.zeros(len(self.raw) + 1, dtype=bool)
                ends[self.char_starts[[m.end() for m in pattern.finditer(self.text)]]] = True
                self.found[kind] = np.flatnonzero(ends[self.tok_ends]) + 1
        return self.found[kind]


def best_cut(cuts: CutPoints, start: int, limit: int) -> tuple[int, str]:
    """The furthest cut in (start, start + limit]: a sentence end if there is one, else a clause
    end, else a character boundary, else start + limit. Returns (cut, kind)."""
    for kind in ("sentence", "clause", "hard"):
        c = cuts[kind]
        i = np.searchsorted(c, start + limit, side="right") - 1
        if i >= 0 and c[i] > start:
            return int(c[i]), kind
    return start + limit, "hard"


def document_pieces(tokens: np.ndarray, packing: str, block_size: int, tok: Tokenizer):
    """Split one document's tokens (uint16, under tok) into pieces for a packing.

    Returns (pieces, cut_kinds, dropped): each piece is a view of tokens; the document's EOT
    follows its last piece (the caller appends it: no copy of every document just to add one
    token). Each piece, the last one with its EOT, is at most block_size tokens (any length in
    stream packing, which has no blocks). cut_kinds lists how each forced cut was made; dropped
    counts tokens left out (aligned packing keeps only the first block of a document)."""
    if packing == "stream" or len(tokens) < block_size:
        return [tokens], [], 0
    cuts = CutPoints(tokens, tok)
    if packing == "aligned":
        cut, kind = best_cut(cuts, 0, block_size - 1)
        return [tokens[:cut]], [kind], len(tokens) - cut
    pieces, kinds, start = [], [], 0
    while len(tokens) - start >= block_size:  # the last piece needs room for its EOT
        cut, kind = best_cut(cuts, start, min(block_size, len(tokens) - start - 1))
        pieces.append(tokens[start:cut])
        kinds.append(kind)
        start = cut
    pieces.append(tokens[start:])
    return pieces, kinds, 0


def pad_block(pieces: list, block_size: int, pad_id: int, dtype=np.uint16) -> np.ndarray:
    """The pieces end to end, then pad_id up to block_size."""
    block = np.full(block_size, pad_id, dtype=dtype)
    n = 0
    for p in pieces:
        block[n:n + len(p)] = p
        n += len(p)
    return block


class BestFitPacker:
    """Packs pieces into blocks of block_size, best fit: each piece goes to the open block with
    the least room that still fits it. At most max_open blocks stay open (bounded memory); when
    a new block is needed beyond that, the fullest open block is written out. Blocks are padded
    with pad_id and have the given dtype."""

    def __init__(self, block_size: int, pad_id: int, write, max_open: int = 256, dtype=np.uint16):
        self.block_size, self.pad_id, self.write, self.max_open = block_size, pad_id, write, max_open
        self.dtype = dtype
        self.open = []   # sorted list of (free, serial)
        self.pieces = {}  # serial -> list of arrays
        self.serial = 0

    def add(self, piece: np.ndarray) -> None:
        i = bisect_left(self.open, (len(piece), -1))
        if i < len(self.open):
            free, s = self.open.pop(i)
        else:
            if len(self.open) >= self.max_open:
                self._emit(0)
            free, s = self.block_size, self.serial
            self.serial += 1
            self.pieces[s] = []
        self.pieces[s].append(piece)
        if free - len(piece) > 0:
            insort(self.open, (free - len(piece), s))
        else:
            self.write(pad_block(self.pieces.pop(s), self.block_size, self.pad_id, self.dtype))

    def _emit(self, i: int) -> None:
        _, s = self.open.pop(i)
        self.write(pad_block(self.pieces.pop(s), self.block_size, self.pad_id, self.dtype))

    def close(self) -> None:
        for _, s in sorted(self.open, key=lambda fs: fs[1]):
            self.write(pad_block(self.pieces.pop(s), self.block_size, self.pad_id, self.dtype))
        self.open = []


class ShuffledPieces:
    """Pieces (uint32 arrays) kept end to end in one array, about 4 bytes a token, then given back
    in the order of a keyed hash of their content: a fixed shuffle that spreads pieces which sat
    together in the input and does not depend on numpy's random streams; equal pieces keep their
    input order."""

    def __init__(self):
        self.codes, self.starts, self.keys = array("I"), array("Q", [0]), array("Q")

    def add(self, piece: np.ndarray) -> None:
        raw = piece.astype(np.uint32).tobytes()
        self.codes.frombytes(raw)
        self.starts.append(len(self.codes))
        self.keys.append(int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=b"miniglm-shuffle").digest(), "little"))

    def __iter__(self):
        codes = np.frombuffer(self.codes, dtype=np.uint32)
        for i in sorted(range(len(self.keys)), key=self.keys.__getitem__):
            yield codes[self.starts[i]:self.starts[i + 1]]
