"""o200k_harmony offline: the oracle is tiktoken's own encoding (and transformers loading our files)."""

import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext import openai_public

from ossq import tokenizer as tok
from ossq.errors import TokenizerError

SAMPLES = [
    "hello world",
    "Héllo, wörld! Ça va? naïve café — “quotes” and ‘apostrophes’",
    "emoji 🦀🔥 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "中文字符和日本語のテキスト、한국어 텍스트。",
    "digits 1234567 and 3.14159, 1,000,000, 0x1F",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\r\n    else:\n        pass\n\n\n",
    "   leading and trailing spaces   \n\n   \t \t  ",
    "I'M SURE they'LL say it's HTTPServer's fault, don't you?",
    "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant",
    "<|channel|>analysis<|message|>x<|end|><|return|><|call|><|endoftext|><|reserved_200500|>",
    "मराठी हिन्दी العربية עִבְרִית",
]


def _random_unicode(n: int, seed: int) -> str:
    """Mixed scripts, emoji, combining marks, punctuation and whitespace: where regexes and BPE disagree."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7F),
        (0xA0, 0x800),
        (0x300, 0x370),
        (0x3040, 0x9FFF),
        (0x1F300, 0x1FAFF),
        (0xAC00, 0xD7A3),
    ]
    chars = []
    for _ in range(n):
        if rng.random() < 0.15:
            chars.append(rng.choice(" \t\n\r  '"))
        else:
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randrange(low, high)))
    return "".join(chars)


@pytest.fixture(scope="module", autouse=True)
def build_cache(tmp_path_factory) -> Path:
    """A private OSSQ_CACHE for this module: ranks unpacked and tokenizer.json built from scratch."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSQ_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, build_cache) -> Path:
    """Tokenizer files as `write_tokenizer_files` writes them."""
    out = tmp_path_factory.mktemp("hf")
    start = time.perf_counter()
    tok.write_tokenizer_files(out)
    assert time.perf_counter() - start < 15, "tokenizer.json build must stay fast"
    return out


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tok.o200k_harmony()


@pytest.fixture(scope="module")
def backends(hf_dir, tmp_path_factory) -> dict[str, tok.Tokenizer]:
    no_json = tmp_path_factory.mktemp("no-tokenizer-json")
    return {"tokenizers": tok.Tokenizer.from_dir(hf_dir), "tiktoken": tok.Tokenizer.from_dir(no_json)}


@pytest.fixture(params=["tokenizers", "tiktoken"])
def tokenizer(request, backends) -> tok.Tokenizer:
    result = backends[request.param]
    assert result.backend == request.param
    return result


def test_o200k_harmony_is_identical_to_tiktokens_own(enc, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tok.o200k_ranks_dir()))
    theirs = openai_public.o200k_harmony()  # reads the ranks via TIKTOKEN_CACHE_DIR, sha-checked
    assert enc._pat_str == theirs["pat_str"]
    assert enc._special_tokens == theirs["special_tokens"]
    assert enc._mergeable_ranks == theirs["mergeable_ranks"]
    assert enc.n_vocab == 201_088


@pytest.mark.parametrize("text", SAMPLES)
def test_both_backends_give_tiktokens_ids(tokenizer, enc, text):
    assert tokenizer.encode(text) == enc.encode(text, allowed_special="all")


def test_both_backends_match_tiktoken_on_random_unicode(tokenizer, enc):
    text = _random_unicode(20_000, seed=0)
    assert tokenizer.encode(text) == enc.encode(text, allowed_special="all")


def test_known_ids(tokenizer):
    assert tokenizer.encode("hello world") == [24912, 2375]
    assert tokenizer.encode("<|start|>user<|message|>") == [200006, 1428, 200008]
    assert [tokenizer.encode(w) for w in ("assistant", "analysis", "final")] == [[173781], [35644], [17196]]


def test_special_strings_stay_text_when_not_allowed(tokenizer, enc):
    text = "<|start|>user<|message|>hi<|end|>"
    ids = tokenizer.encode(text, allow_special=False)
    assert ids == enc.encode(text, disallowed_special=())
    assert not set(ids) & set(range(199_998, 201_088))
    assert tokenizer.encode(text)[0] == 200006  # the toggle did not stick


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_and_vocab_size(tokenizer):
    assert tokenizer.vocab_size == 201_088
    assert tokenizer.eos_token_ids == (200002, 200012, 199999)
    assert [tokenizer.token_id(n) for n in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")] == [
        200006,
        200005,
        200008,
        200007,
    ]
    assert tokenizer.decode([201_087]) == "<|reserved_201087|>"
    with pytest.raises(TokenizerError, match="no special token"):
        tokenizer.token_id("<|nope|>")


def test_detokenizer_never_splits_a_character(tokenizer, enc):
    text = "crab 🦀 and 👨‍👩‍👧 in 日本語, é"
    ids = tokenizer.encode(text)
    # The test is only meaningful if some token holds an incomplete UTF-8 sequence.
    assert any(_is_partial_utf8(enc.decode_single_token_bytes(i)) for i in ids)
    detok = tokenizer.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_detokenizer_flush_replaces_a_dangling_partial_character(tokenizer):
    first_byte_of_crab = tokenizer.encode("🦀")[0]
    detok = tokenizer.detokenizer()
    assert detok.add(first_byte_of_crab) == ""
    assert detok.flush() == "\ufffd"


def test_transformers_loads_written_files_with_identical_ids(hf_dir, enc):
    transformers = pytest.importorskip("transformers")
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)  # what mlx-lm calls
    assert isinstance(fast, transformers.PreTrainedTokenizerFast)
    text = "\n".join(SAMPLES) + _random_unicode(3_000, seed=1)
    expected = enc.encode(text, allowed_special="all")
    assert fast(text)["input_ids"] == expected
    assert fast.decode(expected) == text
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (199998, 200002, 199999)
    assert len(fast) == 201_088
    assert fast.convert_ids_to_tokens(200018) == "<|endofprompt|>"  # Hugging Face's name (formats.md §4.5)


def test_written_configs(hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 131_072
    assert json.loads((hf_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
    }


def test_later_writes_copy_the_cached_build(hf_dir, build_cache, tmp_path, monkeypatch):
    def no_rebuild():
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(tok, "build_hf_tokenizer", no_rebuild)
    monkeypatch.setenv("OSSQ_CACHE", str(build_cache))
    tok.write_tokenizer_files(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        tok.Tokenizer.from_dir(tmp_path)


def test_non_harmony_tokenizer_json_is_rejected(tmp_path):
    import tokenizers

    other = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    other.add_special_tokens(["<|return|>"])  # id 2, not 200002
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="not an o200k_harmony tokenizer"):
        tok.Tokenizer.from_dir(tmp_path)


def test_ranks_dir_holds_verified_ranks_under_both_names(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSQ_CACHE", str(tmp_path))
    directory = tok.o200k_ranks_dir()
    assert directory == tmp_path / "tiktoken"
    for name in ("o200k_base.tiktoken", "fb374d419588a4632f3f557e76b4b70aebbca790"):
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == tok.O200K_SHA256


def test_tampered_ranks_are_rejected_and_nothing_is_written(tmp_path, monkeypatch):
    genuine = gzip.decompress(tok._packaged_ranks_gz())
    tampered = genuine.replace(b" 1000\n", b" 1001\n", 1)
    monkeypatch.setattr(tok, "_packaged_ranks_gz", lambda: gzip.compress(tampered))
    monkeypatch.setenv("OSSQ_CACHE", str(tmp_path))
    with pytest.raises(TokenizerError, match="sha256"):
        tok.o200k_ranks_dir()
    assert not (tmp_path / "tiktoken").exists()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("OSSQ_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tok.cache_dir() == tmp_path / "xdg" / "ossq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tok.cache_dir() == tmp_path / "home" / ".cache" / "ossq"
    monkeypatch.setenv("OSSQ_CACHE", str(tmp_path / "mine"))
    assert tok.cache_dir() == tmp_path / "mine"
