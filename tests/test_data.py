import pytest
import torch

from lablib.data import (SPECIAL_TOKENS, CorpusError, TokenBlocks, check_corpus, Tokenizer, bpe_tokenizer, char_tokenizer, load_corpus, pack,
                         prepare_lm_data, split_documents, stdlib_documents, tokenize_corpus)

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"


def test_char_tokenizer_round_trips_and_has_the_special_tokens():
    tok = char_tokenizer([TEXT])
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode(TEXT)) == len(TEXT)
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.pad_id, tok.unk_id, tok.mask_id, tok.eos_id]
    assert tok.encode("€") == [tok.unk_id]


def test_bpe_tokenizer_round_trips_any_text_and_merges(tmp_path):
    tok = bpe_tokenizer([TEXT * 50], vocab_size=300)
    for text in (TEXT, "naïve ünïcode → ok"):
        assert tok.decode(tok.encode(text)) == text  # byte level: nothing is unknown
    assert len(tok.encode(TEXT)) < len(TEXT)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.fingerprint() == tok.fingerprint()


def test_stdlib_corpus_is_offline_and_holds_source_and_pydoc_text():
    docs = list(stdlib_documents(max_chars=300_000))
    sources = [d["source"] for d in docs]
    assert any(s.startswith("pydoc_data/") for s in sources) and any(s.endswith(".py") for s in sources)
    assert sum(len(d["text"]) for d in docs) >= 300_000


def test_document_split_is_disjoint_and_deterministic():
    ds = load_corpus("stdlib", max_chars=200_000)
    train, val = split_documents(ds, 0.1, seed=0)
    assert not set(train["source"]) & set(val["source"])
    assert len(train) + len(val) == len(ds)
    assert split_documents(ds, 0.1, seed=0)[1]["source"] == val["source"]


def test_local_text_files_are_a_corpus(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    ds = load_corpus(str(tmp_path))
    assert len(ds) == 3 and ds[0]["text"].startswith("document 0")
    with pytest.raises(FileNotFoundError, match="expected 'stdlib', 'hf:NAME' or an existing file or folder"):
        load_corpus(str(tmp_path / "missing"))


def test_tokenized_corpus_is_cached_and_reused():
    ds = load_corpus("stdlib", max_chars=100_000)
    tok = char_tokenizer(ds["text"])
    first = tokenize_corpus(ds, tok)
    second = tokenize_corpus(load_corpus("stdlib", max_chars=100_000), tok)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first[0]["ids"][-1] == tok.eos_id


def test_pack_cuts_fixed_blocks_and_refuses_tiny_corpora():
    ds = load_corpus("stdlib", max_chars=50_000)
    tok = char_tokenizer(ds["text"])
    blocks = pack(tokenize_corpus(ds, tok), 65)
    assert blocks.shape[1] == 65 and blocks.dtype == torch.int64
    with pytest.raises(ValueError, match="fewer than one block"):
        pack(tokenize_corpus(ds.select([0]), tok), 10**7)


def test_batches_are_a_pure_function_of_seed_and_index_and_cover_an_epoch():
    data = TokenBlocks(torch.arange(40).reshape(10, 4))
    a, b = data.batch(3, 4, seed=1), data.batch(3, 4, seed=1)
    assert torch.equal(a["tokens"], b["tokens"])
    assert not torch.equal(data.batch(3, 4, seed=2)["tokens"], a["tokens"])
    epoch = torch.cat([data.batch(i, 5, seed=0)["tokens"] for i in range(2)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))  # every block once per epoch


def test_prepare_lm_data_end_to_end():
    data = prepare_lm_data("stdlib", "char", seq_len=32, max_chars=100_000)
    assert data.train.blocks.shape[1] == 33 and len(data.val) > 0
    assert data.summary()["vocab_size"] == data.tokenizer.vocab_size


def test_datasets_names_load_through_the_hub_code_path_from_a_local_dataset(tmp_path):
    import json

    folder = tmp_path / "my_corpus"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"row {i} " * 10, "label": i}) + "\n")
    ds = load_corpus(f"hf:{folder}")  # the same call a hub name takes: datasets.load_dataset(NAME)
    assert ds.column_names == ["text", "source"] and len(ds) == 4


def test_a_local_corpus_smaller_than_corpus_max_chars_trains(tmp_path):
    (tmp_path / "one.txt").write_text("def f(x):\n    return x\n" * 2500)  # one 60 KB document
    data = prepare_lm_data(str(tmp_path / "one.txt"), "char", seq_len=64, max_chars=200_000)
    assert len(data.train) + len(data.val) > 800  # the one document's blocks, split by blocks
    assert len(data.val) == round((len(data.train) + len(data.val)) * 0.05)


def test_a_corpus_of_exactly_one_block_trains_and_says_val_is_the_same_text(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("x" * 16)  # 16 characters + <eos> = one block of seq_len 16
    data = prepare_lm_data(str(tmp_path / "tiny.txt"), "char", seq_len=16)
    assert len(data.train) == len(data.val) == 1
    assert "val_loss is measured on the same text" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"\x7fELF\x02\x01\x00\x00binary", "is binary (a NUL byte at offset 6)"),
    (b"caf\xe9 latin-1", "is not UTF-8 text (undecodable byte at offset 3)"),
])
def test_corpora_that_cannot_train_are_refused_in_one_line(tmp_path, content, message):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        check_corpus(str(tmp_path / "c.txt"), seq_len=8)
    assert "\n" not in str(e.value)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(str(tmp_path / "c.txt"))


def test_a_corpus_shorter_than_one_block_is_refused_before_loading(tmp_path):
    (tmp_path / "c.txt").write_text("short")
    with pytest.raises(CorpusError, match=r"holds 5 characters, fewer than one training block of seq_len\+1=65"):
        check_corpus(str(tmp_path / "c.txt"), seq_len=64)


def test_a_stdlib_prefix_shorter_than_one_block_is_refused():
    assert check_corpus("stdlib", seq_len=64, max_chars=10_000)["chars"] >= 10_000
    with pytest.raises(CorpusError, match="corpus 'stdlib' cut at corpus_max_chars=10 holds"):
        check_corpus("stdlib", seq_len=1_000_000, max_chars=10)
