"""The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` and `tokenizer.chat_template`.

Three sources, chosen as llama.cpp's `convert_hf_to_gguf.py` chooses (per architecture `set_vocab`):

* **BPE** (`tokenizer.ggml.model = "gpt2"`): tokens and token types from the Hugging Face
  tokenizer (`get_vocab_base`), merges / special ids / add_bos / chat template through gguf-py's
  `SpecialVocab`, and `tokenizer.ggml.pre`, the name that selects llama.cpp's pre-tokenizer
  regex. Like the converter (`get_vocab_base_pre`), we identify it by hashing the tokenizer's
  encoding of a fixed test string; an unknown hash is refused, since a wrong regex makes a file
  that loads and then tokenizes differently.
* **SentencePiece** (`"llama"`): pieces, scores and types from `tokenizer.model`
  (`_create_vocab_sentencepiece`), needs the `sentencepiece` package.
* **A GGUF source**: its `tokenizer.*` keys are copied unchanged (what llama-quantize does).

A folder with no tokenizer files at all (tiny test checkpoints) gets `tokenizer.ggml.model =
"none"` plus the vocabulary size: llama.cpp loads such a file and can evaluate token ids, but
cannot tokenize text.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from qtool.errors import UnsupportedError
from qtool.formats.gguf.metadata import ArchSpec, copy_gguf_fields

TT = gguf.TokenType

# The string convert_hf_to_gguf.py encodes to identify a BPE pre-tokenizer (get_vocab_base_pre).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(ids)) of that encoding -> llama.cpp pre-tokenizer name (values from the converter's
# table, for the tokenizer families of the architectures qtool writes).
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 finetunes
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def pre_tokenizer_name(tokenizer, where: str) -> str:
    ids = tokenizer.encode(CHECK_TEXT)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise UnsupportedError(
            f"{where}: unknown BPE pre-tokenizer ({type(tokenizer).__name__}, check hash {digest}); "
            "llama.cpp would pick its regex by this hash and qtool does not know which one it is"
        )
    return KNOWN_PRE_TOKENIZERS[digest]


def _looks_special(text: str) -> bool:
    """TextModel.does_token_look_special: added tokens some models forget to mark special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


# tokenizer_config.json classes that load tokenizer.json as it is (no class-specific pipeline)
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer_config.json keys by which transformers changes what tokenizer.json alone would do
_CHANGING_KEYS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "add_prefix_space",
                  "legacy", "from_slow", "tokenizer_file")


class _PlainTokenizer:
    """The part of a transformers fast tokenizer that get_vocab_base uses, read with the
    `tokenizers` library alone, for a tokenizer.json that transformers loads as it is: skips
    importing transformers (a second or more of start-up). tests/test_gguf_writer.py holds it
    equal to AutoTokenizer's answers."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.added_tokens_decoder = tok.get_added_tokens_decoder()

    @classmethod
    def open(cls, folder: Path) -> "_PlainTokenizer | None":
        tj, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
        if not tj.is_file() or not cfg_file.is_file():
            return None
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            import tokenizers

            tok = tokenizers.Tokenizer.from_file(str(tj))
        except Exception:  # noqa: BLE001 - AutoTokenizer then says what is wrong
            return None
        if cfg.get("tokenizer_class") not in _PLAIN_CLASSES or any(cfg.get(k) for k in _CHANGING_KEYS):
            return None
        decoder = tok.get_added_tokens_decoder()
        for key, d in (cfg.get("added_tokens_decoder") or {}).items():  # must say what tokenizer.json says
            a = decoder.get(int(key))
            if a is None or (a.content, a.special, a.normalized) != (d.get("content"), d.get("special"), d.get("normalized")):
                return None
        return cls(tok)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {a.content: i for i, a in self.added_tokens_decoder.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class SpecialVocab(gguf.SpecialVocab):
    """gguf-py's SpecialVocab, with a tokenizer.json's pair-list merges (the format since transformers
    4.45) joined in bulk rather than character by character: the same strings (a space inside a
    part becomes chr(32 + 256), as gguf-py writes it), a second less per run on a 50k-merge vocab."""

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        merges = None
        f = path / "tokenizer.json"
        if self.load_merges and f.is_file():
            m = json.loads(f.read_text(encoding="utf-8")).get("model", {}).get("merges")
            if (isinstance(m, list) and m and isinstance(m[0], list) and len(m[0]) == 2 and isinstance(m[0][0], str)
                    and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in m)):
                merges = [f"{a.replace(' ', chr(288))} {b.replace(' ', chr(288))}" for a, b in m]
        if merges is None:
            return super()._try_load_from_tokenizer_json(path)
        self.load_merges = False
        try:
            found = super()._try_load_from_tokenizer_json(path)
        finally:
            self.load_merges = True
        self.merges = merges
        return found


def bpe_vocab(folder: Path, vocab_size: int | None) -> tuple[list[str], list[int], str]:
    """get_vocab_base: tokens, token types and the pre-tokenizer name."""
    tok = _PlainTokenizer.open(folder)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    n = vocab_size or len(vocab)
    if max(vocab.values()) >= n:
        raise UnsupportedError(f"{folder}: tokenizer has ids up to {max(vocab.values())}, past vocab_size {n}")
    pre = pre_tokenizer_name(tok, str(folder))
    by_id = {i: t for t, i in vocab.items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            continue
        text = by_id[i]
        if text in added:
            if not decoder[i].normalized:  # llama.cpp assumes added tokens are pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                types.append(TT.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
        tokens.append(text)
    return tokens, types, pre


def spm_vocab(folder: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """_create_vocab_sentencepiece: pieces, scores and types from tokenizer.model, then the added
    tokens of added_tokens.json and tokenizer_config.json."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError(f"{folder}: a SentencePiece tokenizer needs the `sentencepiece` package "
                               "(pip install sentencepiece)") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores, types = [-10000.0] * n, [int(TT.UNUSED)] * n
    for i in range(min(sp.vocab_size(), n)):
        kind = (TT.UNKNOWN if sp.IsUnknown(i) else TT.CONTROL if sp.IsControl(i)
                else TT.UNUSED if sp.IsUnused(i) else TT.BYTE if sp.IsByte(i) else TT.NORMAL)
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), int(kind)
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, int(TT.USER_DEFINED)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i, text = int(key), data["content"]
            if i >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[i] = int(TT.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types[i] = int(TT.USER_DEFINED)
            tokens[i], scores[i] = text.encode(), -1000.0
    return tokens, scores, types


def _spm(w: gguf.GGUFWriter, folder: Path, vocab_size: int | None, add_bos: bool | None = None) -> None:
    tokens, scores, types = spm_vocab(folder, vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(w, quiet=True)


def _bpe(w: gguf.GGUFWriter, folder: Path, vocab_size: int | None, add_bos: bool | None = None) -> None:
    tokens, types, pre = bpe_vocab(folder, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(w, quiet=True)


def _llama_hf(w: gguf.GGUFWriter, folder: Path, add_bos: bool | None) -> bool:
    """_set_vocab_llama_hf: a SentencePiece-style BPE tokenizer.json without tokenizer.model.
    False when gguf-py's LlamaHfVocab says it is not one (Llama 3 style byte-level BPE)."""
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):
        return False
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    if add_bos is not None:
        special.add_special_token["bos"] = add_bos
    special.add_to_gguf(w, quiet=True)
    return True


def _prefix_space(folder: Path) -> bool | None:
    f = folder / "tokenizer_config.json"
    return json.loads(f.read_text(encoding="utf-8")).get("add_prefix_space") if f.is_file() else None


def write_vocab_from_folder(w: gguf.GGUFWriter, folder: Path, config: dict, spec: ArchSpec) -> None:
    """The architecture's set_vocab() from a Hugging Face folder."""
    n = config.get("vocab_size")
    has_spm = (folder / "tokenizer.model").is_file()
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        w.add_tokenizer_model("none")
        if spec.name != "llama":  # LlamaModel writes it anyway
            w.add_vocab_size(n)
        # special ids from config.json: llama.cpp ignores them here, transformers' reader wants them
        gguf.SpecialVocab(folder, load_merges=False, n_vocab=n).add_to_gguf(w, quiet=True)
        return
    if spec.vocab == "llama":
        if (space := _prefix_space(folder)) is not None:
            w.add_add_space_prefix(space)
        # vocab 49152 (granite, SmolLM): the converter turns BOS off
        add_bos = False if n == 49152 else None
        if has_spm:
            _spm(w, folder, n, add_bos)
        elif not _llama_hf(w, folder, add_bos):
            _bpe(w, folder, n, add_bos)  # Llama 3 style
    elif spec.vocab == "gemma":
        if not has_spm:
            raise UnsupportedError(f"{folder}: gemma2 needs tokenizer.model (SentencePiece)")
        _spm(w, folder, n)
        w.add_add_space_prefix(False)
    elif spec.vocab == "gemma3":  # Gemma3Model.set_vocab: SentencePiece if there is one, else BPE
        if has_spm:
            _spm(w, folder, n)
            w.add_add_space_prefix(False)
        else:
            _bpe(w, folder, n)
    elif spec.vocab == "phi3":
        cfg = folder / "tokenizer_config.json"
        cls = json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") if cfg.is_file() else None
        if cls == "GPT2Tokenizer" or not has_spm:
            _bpe(w, folder, n)
        else:
            _spm(w, folder, n)
    elif spec.vocab == "qwen2" and has_spm:
        _spm(w, folder, n)
    else:
        _bpe(w, folder, n)


def copy_vocab_from_gguf(w: gguf.GGUFWriter, path: Path) -> None:
    """Every tokenizer.* key of a GGUF file, with its value type."""
    copy_gguf_fields(w, path, lambda k: k.startswith("tokenizer."))
