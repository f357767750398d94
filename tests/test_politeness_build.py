"""The politeness split rebuilds byte for byte from the three raw source files; the sources are pinned by sha256."""

from __future__ import annotations

import hashlib

import pytest

from compress import politeness
from compress.config.data import data_dir
from compress.errors import CompressError


def _politeness_dir():
    folder = data_dir()
    if folder is None or not (folder / "politeness" / "source").is_dir():
        pytest.skip(f"no politeness/source folder in the data directory ({folder}); set COMPRESS_DATA_DIR")
    return folder / "politeness"


def _sources() -> dict[str, bytes]:
    source = _politeness_dir() / "source"
    return {s.name: (source / s.name).read_bytes() for s in politeness.SOURCES}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_build_split_is_byte_identical():
    built = politeness.build_split(_sources())
    assert set(built) == {"train.jsonl", "test.jsonl"}
    for name, data in built.items():
        assert _sha256(data) == _sha256((_politeness_dir() / name).read_bytes()), name


def test_corrupted_source_names_file_and_hashes():
    sources = _sources()
    name = politeness.STACK_EXCHANGE
    data = bytearray(sources[name])
    data[1000] ^= 0x01
    sources[name] = bytes(data)
    with pytest.raises(CompressError) as error:
        politeness.build_split(sources)
    message = str(error.value)
    expected = next(s.sha256 for s in politeness.SOURCES if s.name == name)
    assert name in message and expected in message and _sha256(bytes(data)) in message


def test_source_url_is_raw_file_at_pinned_commit():
    urls = {s.name: politeness.source_url(s) for s in politeness.SOURCES}
    assert urls == {
        "wikipedia.annotated.csv.bak": "https://raw.githubusercontent.com/sudhof/politeness/"
                                       "743ad25ad7b0cbf5f106ee4c68d87c450898dee7/corpora/wikipedia.annotated.csv.bak",
        "stack-exchange.annotated.csv.bak": "https://raw.githubusercontent.com/sudhof/politeness/"
                                            "743ad25ad7b0cbf5f106ee4c68d87c450898dee7/corpora/"
                                            "stack-exchange.annotated.csv.bak",
        "politeness-api.wikipedia.annotated.csv": "https://raw.githubusercontent.com/sudhof/politeness-api/"
                                                  "c7384d85afb8a1881940a4d804ce78f9eafa7b60/data/wikipedia.annotated.csv",
    }
    source = politeness.SOURCES[0]
    expected = f"http://mirror/{source.repo}/{source.commit}/{source.path}"
    assert politeness.source_url(source, base="http://mirror") == expected
