"""Calibration data (qtool/calib/data.py): `--dataset` specs -> seeded, non-overlapping token windows.

Most tests use a byte-level tokenizer built here (one token per UTF-8 byte, `<eos>` special, a tiny
chat template), so token counts are byte counts and nothing needs the real model; the chat and
WikiText tests use SmolLM2's real tokenizer. Hub ids go through the real `datasets.load_dataset`
against the local fake Hub (tests/hub_server.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from hub_server import fake_hub, hub_env

from qtool.calib import load_calibration, load_recipes, pick_windows
from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.evaluate import read_text, split_text

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"


@pytest.fixture(scope="module")
def byte_tok():
    """One token per byte (BPE over the 256 byte symbols, no merges) plus `<eos>`; has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def docs(n: int = 30) -> list[str]:
    return [f"Document {i}: " + " ".join(f"word{i}-{j}" for j in range(12)) for i in range(n)]


def write_records(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def decoded(tok, cs) -> list[str]:
    return [tok.decode(w) for w in cs.input_ids]


# -- local files ---------------------------------------------------------------------------------
def test_txt_uses_only_the_calibration_half(tmp_path, byte_tok):
    text = "".join(" ".join(f"{i}-{w}" for w in "abcdefgh") + "\n" for i in range(60))  # every word unique
    f = tmp_path / "doc.txt"
    f.write_text(text)
    cs = load_calibration(str(f), byte_tok, samples=4, seq_len=32, seed=1)
    assert cs.input_ids.shape == (4, 32) and cs.input_ids.dtype == torch.long
    assert cs.tokens_used == 128 and cs.spec == str(f)
    calib, held_out = split_text(text)
    assert cs.source["tokens_available"] == len(calib.encode())  # one document, one token per byte
    assert all(w in calib and w not in held_out for w in decoded(byte_tok, cs))
    assert cs.source["kind"] == "file" and cs.source["format"] == "txt" and cs.source["part"] == "calib"
    assert len(cs.source["sha256"]) == 64 and cs.source["documents"] == 1
    json.dumps(cs.source)  # provenance goes into artifact metadata as it is


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_record_files_auto_detect_the_text_field(tmp_path, byte_tok, suffix):
    f = write_records(tmp_path / f"data{suffix}", [{"id": i, "content": d} for i, d in enumerate(docs())])
    cs = load_calibration(str(f), byte_tok, samples=6, seq_len=40)
    stream = "<eos>".join(docs())  # documents joined by EOS
    assert cs.input_ids.shape == (6, 40)
    assert all(w in stream for w in decoded(byte_tok, cs))
    assert cs.source["format"] == suffix[1:] and cs.source["text_field"] == "content"
    assert cs.source["tokens_available"] == len(stream.encode()) - 4 * (len(docs()) - 1)  # "<eos>" is one token


def test_json_lines_in_a_json_file_and_an_explicit_text_field(tmp_path, byte_tok):
    f = tmp_path / "data.json"
    f.write_text("".join(json.dumps({"text": "not this", "body_md": d}) + "\n" for d in docs()))
    cs = load_calibration(str(f), byte_tok, samples=2, seq_len=20, text_field="body_md")
    assert cs.source["text_field"] == "body_md"
    assert all("not this" not in w for w in decoded(byte_tok, cs))


def test_plain_string_records(tmp_path, byte_tok):
    f = write_records(tmp_path / "data.json", docs())
    cs = load_calibration(str(f), byte_tok, samples=3, seq_len=16)
    assert "text_field" not in cs.source and cs.source["documents"] == len(docs())


# -- chat ----------------------------------------------------------------------------------------
def chat_records(n: int = 20) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(n)]


@pytest.mark.slow
def test_chat_messages_go_through_the_chat_template(tmp_path, smol_tok):
    f = write_records(tmp_path / "chat.jsonl", chat_records())
    cs = load_calibration(str(f), smol_tok, samples=4, seq_len=64)
    im_start = smol_tok.convert_tokens_to_ids("<|im_start|>")
    assert cs.source["chat_template"] is True and cs.source["text_field"] == "messages"
    assert (cs.input_ids == im_start).any(dim=1).all(), "every window holds rendered turns"
    rendered = [smol_tok.apply_chat_template(r["messages"], tokenize=False) for r in chat_records()]
    stream = smol_tok.eos_token.join(rendered)
    assert all(smol_tok.decode(w[1:-1]) in stream for w in cs.input_ids)

    plain = load_calibration(str(f), smol_tok, samples=4, seq_len=32, chat_template=False)
    assert plain.source["chat_template"] is False and not (plain.input_ids == im_start).any()


def test_chat_recipe_flag_and_sharegpt_messages(tmp_path, byte_tok):
    records = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]}
               for i in range(20)]
    f = write_records(tmp_path / "sharegpt.jsonl", records)
    cs = load_calibration(str(f), byte_tok, samples=2, seq_len=24, seed=3)
    stream = "<eos>".join(f"<user>hi {i}<eos><assistant>hello {i}<eos>" for i in range(20))
    assert cs.source["text_field"] == "conversations" and all(w in stream for w in decoded(byte_tok, cs))


def test_chat_needs_a_tokenizer_with_a_template(tmp_path, byte_tok, monkeypatch):
    f = write_records(tmp_path / "chat.jsonl", chat_records())
    monkeypatch.setattr(byte_tok, "chat_template", None)
    with pytest.raises(UnsupportedError, match="no chat template.*--no-chat-template"):
        load_calibration(str(f), byte_tok, samples=2, seq_len=16)


def test_chat_template_on_plain_text_is_a_usage_error(tmp_path, byte_tok):
    f = write_records(tmp_path / "data.jsonl", [{"text": d} for d in docs()])
    with pytest.raises(UsageError, match="field 'text' holds str, not a list of messages"):
        load_calibration(str(f), byte_tok, samples=2, seq_len=16, chat_template=True)


# -- windows -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,samples,seq_len", [(1000, 7, 50), (350, 7, 50), (351, 7, 50), (64, 1, 64)],
                         ids=["roomy", "exact-fit", "one-spare", "single"])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_windows_are_contiguous_disjoint_and_in_order(n, samples, seq_len, seed):
    w = pick_windows(torch.arange(n), samples, seq_len, seed)
    starts = w[:, 0]
    assert w.shape == (samples, seq_len)
    assert torch.equal(w - starts[:, None], torch.arange(seq_len).expand(samples, -1))  # contiguous
    assert bool((starts[1:] >= starts[:-1] + seq_len).all()) and int(w[-1, -1]) < n  # disjoint, in range


def test_same_seed_same_windows_other_seed_other_windows(tmp_path, byte_tok):
    f = write_records(tmp_path / "data.jsonl", [{"text": d} for d in docs()])
    a, b, c = (load_calibration(str(f), byte_tok, samples=5, seq_len=30, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.input_ids, b.input_ids) and a.source == b.source
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.slow
def test_wikitext_calibration_and_evaluation_halves_never_overlap(wikitext_path, smol_tok):
    calib_text, eval_text = split_text(read_text(wikitext_path))
    for part, inside, outside in (("calib", calib_text, eval_text), ("eval", eval_text, calib_text)):
        cs = load_calibration(str(wikitext_path), smol_tok, samples=16, seq_len=256, seed=0, part=part)
        assert cs.source["part"] == part
        for w in cs.input_ids:
            text = smol_tok.decode(w[1:-1])  # inner tokens: the edge ones may be halves of a word
            assert text in inside and text not in outside
    assert load_calibration(str(wikitext_path), smol_tok, samples=16, seq_len=256).source["part"] == "calib"


# -- errors --------------------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_extension_missing_file_and_empty_file(tmp_path, byte_tok):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(FormatError) as e:
        load_calibration(str(tmp_path / "data.csv"), byte_tok, samples=1, seq_len=4)
    assert "'.csv'" in one_line(e) and ".jsonl" in one_line(e)
    with pytest.raises(FormatError, match="nope.jsonl: no such file"):
        load_calibration(str(tmp_path / "nope.jsonl"), byte_tok, samples=1, seq_len=4)
    with pytest.raises(FormatError, match="a folder; give a calibration file"):
        load_calibration(str(tmp_path), byte_tok, samples=1, seq_len=4)
    for name in ("empty.txt", "empty.jsonl", "empty.parquet"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(FormatError, match=f"{name}: empty file"):
            load_calibration(str(tmp_path / name), byte_tok, samples=1, seq_len=4)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(FormatError, match="blank.jsonl: no records"):
        load_calibration(str(tmp_path / "blank.jsonl"), byte_tok, samples=1, seq_len=4)


def test_bad_json_line_names_the_line(tmp_path, byte_tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(FormatError, match="bad.jsonl: line 2 is not JSON"):
        load_calibration(str(tmp_path / "bad.jsonl"), byte_tok, samples=1, seq_len=4)


def test_missing_text_field_lists_the_available_ones(tmp_path, byte_tok):
    f = write_records(tmp_path / "data.parquet", [{"title": "t", "body_md": d} for d in docs()])
    with pytest.raises(FormatError) as e:
        load_calibration(str(f), byte_tok, samples=1, seq_len=4)
    assert "no text field" in one_line(e) and "available: title, body_md" in one_line(e) and "--text-field" in one_line(e)
    with pytest.raises(FormatError, match="no text field 'txt'; available: title, body_md"):
        load_calibration(str(f), byte_tok, samples=1, seq_len=4, text_field="txt")


def test_too_few_tokens_says_how_many_and_what_fits(tmp_path, byte_tok):
    f = write_records(tmp_path / "small.jsonl", [{"text": "x" * 100}, {"text": "y" * 99}])  # 100 + eos + 99
    with pytest.raises(FormatError) as e:
        load_calibration(str(f), byte_tok, samples=4, seq_len=64)
    msg = one_line(e)
    assert "200 tokens" in msg and "4 samples x 64 tokens (256)" in msg
    assert "--samples 3 at --seq-len 64" in msg and "--seq-len 50 at --samples 4" in msg
    assert load_calibration(str(f), byte_tok, samples=3, seq_len=64).input_ids.shape == (3, 64)


@pytest.mark.parametrize("kwargs,match", [
    ({"samples": 0, "seq_len": 8}, "--samples 0"),
    ({"samples": 1, "seq_len": 1}, "--seq-len 1"),
    ({"samples": 1, "seq_len": 8, "part": "train"}, "part 'train': expected one of calib, eval, all"),
    ({"samples": 1, "seq_len": 8, "split": "train"}, "--split applies to Hub datasets"),
    ({"samples": 1, "seq_len": 8, "text_field": "text"}, "--text-field text does not apply"),
], ids=["samples", "seq-len", "part", "split-for-file", "text-field-for-txt"])
def test_usage_errors(tmp_path, byte_tok, kwargs, match):
    f = tmp_path / "doc.txt"
    f.write_text("some text\n" * 50)
    with pytest.raises(UsageError, match=match):
        load_calibration(str(f), byte_tok, **kwargs)


def test_unreachable_hub_id_offline_suggests_a_local_file(byte_tok, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FormatError) as e:
        load_calibration("someone/no-such-dataset", byte_tok, samples=1, seq_len=8)
    msg = one_line(e)
    assert "'someone/no-such-dataset'" in msg and "offline" in msg and "local .txt, .jsonl, .json or .parquet" in msg


# -- recipes -------------------------------------------------------------------------------------
def test_shipped_recipes():
    r = load_recipes()
    assert {"wikitext2", "c4", "pile-10k", "ultrachat"} <= set(r)
    assert (r["wikitext2"].dataset, r["wikitext2"].config, r["wikitext2"].split, r["wikitext2"].text_field) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text")
    assert r["c4"].dataset == "allenai/c4" and r["c4"].data_files == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert (r["pile-10k"].dataset, r["pile-10k"].split, r["pile-10k"].text_field) == ("NeelNanda/pile-10k", "train", "text")
    u = r["ultrachat"]
    assert (u.dataset, u.split, u.text_field, u.chat_template) == ("HuggingFaceH4/ultrachat_200k", "train_sft", "messages", True)
    readme = (ROOT / "calib_data" / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in r), "calib_data/README.md lists every recipe"


# -- the Hub, through the real datasets.load_dataset, served by the fake Hub ---------------------
def parquet(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_records(path, records)


def yaml_configs(config: str, splits: dict[str, str]) -> str:
    files = "".join(f"  - split: {s}\n    path: {p}\n" for s, p in splits.items())
    return f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# a dataset\n"


@pytest.fixture()
def spy_load_dataset(monkeypatch):
    """Record every `datasets.load_dataset` call and pass it on to the real function."""
    import datasets

    calls, real = [], datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def test_hub_id_with_config_and_split(tmp_path, byte_tok, monkeypatch, spy_load_dataset):
    repo = tmp_path / "repo"
    parquet(repo / "tiny-raw" / "train.parquet", [{"text": d} for d in docs()])
    parquet(repo / "tiny-raw" / "validation.parquet", [{"text": "held out"}])
    (repo / "README.md").write_text(yaml_configs("tiny-raw", {"train": "tiny-raw/train.parquet",
                                                              "validation": "tiny-raw/validation.parquet"}))
    with fake_hub({"datasets/org/tiny": repo}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        cs = load_calibration("org/tiny", byte_tok, samples=3, seq_len=32, dataset_config="tiny-raw", split="train")
        fetched = {r.file for r in hub.downloads("datasets/org/tiny")}
        with pytest.raises(FormatError) as e:
            load_calibration("org/tiny", byte_tok, samples=1, seq_len=8, dataset_config="nope")
        assert "'org/tiny' (config nope, split train)" in one_line(e) and "tiny-raw" in one_line(e)
        with pytest.raises(FormatError, match="'org/missing'.*not found on the Hub.*local"):
            load_calibration("org/missing", byte_tok, samples=1, seq_len=8)
    assert spy_load_dataset[0] == (("org/tiny", "tiny-raw"), {"split": "train", "data_files": None, "streaming": True})
    assert "tiny-raw/train.parquet" in fetched and "tiny-raw/validation.parquet" not in fetched
    assert cs.source == {**cs.source, "kind": "hub", "dataset": "org/tiny", "config": "tiny-raw", "split": "train"}
    assert all(w in "<eos>".join(docs()) for w in decoded(byte_tok, cs))


def _wikitext(repo: Path) -> None:
    rows = [t for d in docs() for t in ("", f" = {d[:10]} = \n", f" {d} \n")]  # the raw config's row shape
    parquet(repo / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", [{"text": t} for t in rows])
    parquet(repo / "wikitext-103-raw-v1" / "train-00000-of-00002.parquet", [{"text": "other config"}])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: wikitext-103-raw-v1\n  data_files:\n  - split: train\n    path: wikitext-103-raw-v1/train-*\n"
        "- config_name: wikitext-2-raw-v1\n  data_files:\n  - split: train\n    path: wikitext-2-raw-v1/train-*\n---\n")


def _c4(repo: Path) -> None:
    for shard in ("00000", "00001"):
        (repo / "en").mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"text": f"{shard} {d}", "url": "u", "timestamp": "t"}) + "\n" for d in docs())
        (repo / "en" / f"c4-train.{shard}-of-01024.json.gz").write_bytes(gzip.compress(lines.encode()))


def _pile(repo: Path) -> None:
    parquet(repo / "data" / "train-00000-of-00001-0.parquet", [{"text": d, "meta": {"pile_set_name": "x"}} for d in docs()])


def _ultrachat(repo: Path) -> None:
    for split in ("train_sft", "test_sft", "train_gen"):
        parquet(repo / "data" / f"{split}-00000-of-00001-0.parquet",
                [{"prompt": "q", "prompt_id": "0", **r} for r in chat_records()])


@pytest.mark.parametrize("recipe,build,wanted,unwanted,stream_text", [
    ("wikitext2", _wikitext, "wikitext-2-raw-v1/train-00000-of-00001.parquet",
     "wikitext-103-raw-v1/train-00000-of-00002.parquet", "".join(f" = {d[:10]} = \n {d} \n" for d in docs())),
    ("c4", _c4, "en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz",
     "<eos>".join(f"00000 {d}" for d in docs())),
    ("pile-10k", _pile, "data/train-00000-of-00001-0.parquet", None, "<eos>".join(docs())),
    # (datasets reads the Parquet footer of the first file of any split to learn the features)
    ("ultrachat", _ultrachat, "data/train_sft-00000-of-00001-0.parquet", None, "<eos>".join(
        f"<user>Question {i}: what is {i} plus {i}?<eos><assistant>The answer is {2 * i}.<eos>" for i in range(20))),
], ids=["wikitext2", "c4", "pile-10k", "ultrachat"])
def test_recipes_read_their_hub_dataset(tmp_path, byte_tok, monkeypatch, spy_load_dataset,
                                        recipe, build, wanted, unwanted, stream_text):
    r = load_recipes()[recipe]
    repo = tmp_path / "repo"
    build(repo)
    with fake_hub({f"datasets/{r.dataset}": repo}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        cs = load_calibration(recipe, byte_tok, samples=2, seq_len=48, seed=5)
        fetched = {req.file for req in hub.downloads()}
    assert spy_load_dataset == [((r.dataset, r.config), {"split": r.split, "data_files": r.data_files, "streaming": True})]
    assert wanted in fetched and unwanted not in fetched
    assert cs.source["kind"] == "recipe" and cs.source["recipe"] == recipe and cs.source["chat_template"] == r.chat_template
    assert all(w in stream_text for w in decoded(byte_tok, cs))
