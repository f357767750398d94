"""Named datasets and the data directory; calibration batches; the perplexity windows and value."""

from __future__ import annotations

import math

import pytest
import torch

import compress
from compress import data
from compress.errors import CompressError
from compress.evaluate import Perplexity, _windows


@pytest.fixture(autouse=True)
def fresh_cache():
    data._load.cache_clear()
    yield
    data._load.cache_clear()


def test_default_data_dir_finds_shared_data():
    folder = data.data_dir()
    assert folder is not None and (folder / "wikitext2" / "wiki.test.raw").is_file()
    records = data.load_records("rte-validation")
    assert len(records) == 277 and {"premise", "hypothesis", "label"} <= set(records[0])
    assert len(data.load_records("politeness-test")) == 700


def test_environment_variable_selects_the_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.valid.tokens").write_text("hello world " * 10)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.load_text("wikitext2-valid") == "hello world " * 10


def test_missing_dataset_whose_source_is_unreachable_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESS_GITHUB_RAW_URL", "http://127.0.0.1:9")  # nothing listens there
    data._load.cache_clear()
    with pytest.raises(CompressError, match=f"politeness-train.*looked in: {tmp_path}.*could not be reached.*"
                                            f"{data.DATA_DIR_ENV}"):
        data.load_records("politeness-train")


def test_plain_paths_and_bad_paths(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some calibration text")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert data.load_text(str(text)) == "some calibration text"
    assert data.load_records(str(rows)) == [{"text": "a"}, {"text": "b"}]
    assert data.load_text(str(rows)) == "a\n\nb"
    with pytest.raises(CompressError, match="does not exist"):
        data.load_text(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CompressError, match="is empty"):
        data.load_text(str(empty))


def test_calibration_batches_are_seeded_windows(tiny_model_dir):
    _, tokenizer = compress.load_model(str(tiny_model_dir))
    a = data.calibration_batches(tokenizer, "wikitext2-valid", samples=4, seq_len=64, seed=1)
    b = data.calibration_batches(tokenizer, "wikitext2-valid", samples=4, seq_len=64, seed=1)
    c = data.calibration_batches(tokenizer, "wikitext2-valid", samples=4, seq_len=64, seed=2)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_shorter_than_requested_is_an_error(tiny_model_dir, tmp_path):
    _, tokenizer = compress.load_model(str(tiny_model_dir))
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(CompressError, match=r"fewer than the 8 x 64 = 512 requested"):
        data.calibration_batches(tokenizer, str(short), samples=8, seq_len=64)


@pytest.mark.parametrize("n,seq_len,stride",
                         [(1000, 128, 128), (1000, 128, 64), (129, 128, 128), (50, 128, 32), (7, 4, 1)])
def test_windows_score_every_token_once(n, seq_len, stride):
    scored = []
    for begin, end, n_new in _windows(n, seq_len, stride):
        assert end - begin <= seq_len and 0 < n_new <= end - begin - 1
        scored += list(range(end - n_new, end))
    assert len(scored) == len(set(scored))  # never twice
    if stride < seq_len:  # overlapping windows: every token after the first
        assert scored == list(range(1, n))


def test_perplexity_matches_a_direct_computation(tiny_model_dir, tmp_path):
    model, tokenizer = compress.load_model(str(tiny_model_dir))
    text = tmp_path / "t.txt"
    text.write_text(data.load_text("wikitext2-test")[:3000])
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss  # mean NLL of tokens 1..199 given their full prefix
    result = compress.perplexity(model, tokenizer, Perplexity(dataset=str(text), seq_len=256, max_tokens=200),
                                 show_progress=False)
    assert result["protocol"]["tokens_scored"] == 199
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # batched and unbatched windows agree
    one = compress.perplexity(model, tokenizer, Perplexity(dataset=str(text), seq_len=32, batch_size=1, max_tokens=200),
                              show_progress=False)
    many = compress.perplexity(model, tokenizer,
                               Perplexity(dataset=str(text), seq_len=32, batch_size=8, max_tokens=200),
                               show_progress=False)
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)
