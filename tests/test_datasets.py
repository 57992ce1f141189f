"""The data-set registry: local files, and real downloads from a server on 127.0.0.1."""
import dataclasses
import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from tests.http_server import serve
from tinygrad_llm import datasets

SHARED_DATA = Path(os.environ["TINYGRAD_LLM_DATA"])
VERDICT = (SHARED_DATA / "the-verdict.txt").read_bytes()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", sorted(datasets.REGISTRY))
def test_every_registered_file_is_found_in_the_data_folder_with_its_sha256(name):
    found = datasets.path(name)
    assert found.parent in (SHARED_DATA, SHARED_DATA / "gpt2")
    assert sha256(found.read_bytes()) == datasets.get(name).sha256


def test_gpt2_files_are_also_found_at_the_top_of_the_data_folder(tmp_path, monkeypatch):
    (tmp_path / "encoder.json").write_bytes((SHARED_DATA / "gpt2" / "encoder.json").read_bytes())
    monkeypatch.setenv("TINYGRAD_LLM_DATA", str(tmp_path))
    assert datasets.path("gpt2-encoder") == tmp_path / "encoder.json"


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown data set 'verdict'.*the-verdict"):
        datasets.path("verdict")


@pytest.fixture
def empty_machine(tmp_path, monkeypatch):
    """No data folder and an empty cache: path() has to download. Returns the cache folder."""
    monkeypatch.delenv("TINYGRAD_LLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "tinygrad_llm"


def point_registry_at(monkeypatch, name, url):
    monkeypatch.setitem(datasets.REGISTRY, name, dataclasses.replace(datasets.get(name), url=url))


def test_download_lands_in_the_cache_once(empty_machine, monkeypatch):
    with serve({"/the-verdict.txt": VERDICT}) as server:
        point_registry_at(monkeypatch, "the-verdict", server.url("/the-verdict.txt"))
        first = datasets.path("the-verdict", progress=False)
        assert first == empty_machine / "the-verdict.txt"
        assert first.read_bytes() == VERDICT
        assert datasets.path("the-verdict") == first
        assert server.requests == [("/the-verdict.txt", None)]
    assert not first.with_name("the-verdict.txt.part").exists()


def test_gpt2_files_download_into_their_subfolder(empty_machine, monkeypatch):
    vocab = (SHARED_DATA / "gpt2" / "vocab.bpe").read_bytes()
    with serve({"/vocab.bpe": vocab}) as server:
        point_registry_at(monkeypatch, "gpt2-vocab", server.url("/vocab.bpe"))
        assert datasets.path("gpt2-vocab", progress=False) == empty_machine / "gpt2" / "vocab.bpe"


def test_corrupted_download_raises_with_both_hashes_and_leaves_no_file(empty_machine, monkeypatch):
    corrupted = VERDICT.replace(b"Gisburn", b"Gisborn")
    with serve({"/the-verdict.txt": corrupted}) as server:
        point_registry_at(monkeypatch, "the-verdict", server.url("/the-verdict.txt"))
        with pytest.raises(ValueError) as error:
            datasets.path("the-verdict", progress=False)
    message = str(error.value)
    assert server.url("/the-verdict.txt") in message
    assert datasets.get("the-verdict").sha256 in message and sha256(corrupted) in message
    assert list(empty_machine.iterdir()) == []


def test_missing_file_raises_naming_the_url_and_status_and_leaves_no_file(empty_machine, monkeypatch):
    with serve({}) as server:
        url = server.url("/the-verdict.txt")
        point_registry_at(monkeypatch, "the-verdict", url)
        with pytest.raises(RuntimeError, match=f"{url}.*404"):
            datasets.path("the-verdict", progress=False)
    assert not (empty_machine / "the-verdict.txt").exists()
    assert not (empty_machine / "the-verdict.txt.part").exists()


@pytest.mark.parametrize("honour_range", [True, False])
def test_dropped_connection_keeps_only_the_part_file_and_the_next_call_completes(
        empty_machine, monkeypatch, honour_range):
    with serve({"/the-verdict.txt": VERDICT}) as server:
        point_registry_at(monkeypatch, "the-verdict", server.url("/the-verdict.txt"))
        server.drop_after = 5000
        with pytest.raises(RuntimeError, match=f"cut off after 5000 of {len(VERDICT)} bytes"):
            datasets.path("the-verdict", progress=False)
        assert not (empty_machine / "the-verdict.txt").exists()
        assert (empty_machine / "the-verdict.txt.part").read_bytes() == VERDICT[:5000]

        server.drop_after = None
        server.honour_range = honour_range
        assert datasets.path("the-verdict", progress=False).read_bytes() == VERDICT
        # The second request asks for the rest; a server that ignores it sends everything.
        assert server.requests[-1] == ("/the-verdict.txt", "bytes=5000-")
    assert not (empty_machine / "the-verdict.txt.part").exists()


def test_a_part_file_longer_than_the_file_is_thrown_away(tmp_path):
    dest = tmp_path / "the-verdict.txt"
    Path(f"{dest}.part").write_bytes(VERDICT + b"stale bytes from another file")
    with serve({"/the-verdict.txt": VERDICT}) as server:
        datasets.download_file(server.url("/the-verdict.txt"), dest, sha256=sha256(VERDICT), progress=False)
        assert server.requests == [("/the-verdict.txt", f"bytes={len(VERDICT) + 29}-"), ("/the-verdict.txt", None)]
    assert dest.read_bytes() == VERDICT


def test_a_verified_file_is_not_downloaded_again_and_a_wrong_one_is_replaced(tmp_path):
    dest = tmp_path / "the-verdict.txt"
    with serve({"/the-verdict.txt": VERDICT}) as server:
        url = server.url("/the-verdict.txt")
        datasets.download_file(url, dest, sha256=sha256(VERDICT), progress=False)
        datasets.download_file(url, dest, sha256=sha256(VERDICT), progress=False)
        assert len(server.requests) == 1
        dest.write_bytes(b"something else")
        datasets.download_file(url, dest, sha256=sha256(VERDICT), progress=False)
        assert len(server.requests) == 2
    assert dest.read_bytes() == VERDICT


def test_sms_collection_is_extracted_from_the_books_zip(empty_machine, monkeypatch):
    collection = (SHARED_DATA / "sms_spam_collection.tsv").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme", "about the collection")
        zf.writestr("SMSSpamCollection", collection)
    with serve({"/sms+spam+collection.zip": archive.getvalue()}) as server:
        point_registry_at(monkeypatch, "sms-spam-collection", server.url("/sms+spam+collection.zip"))
        found = datasets.path("sms-spam-collection", progress=False)
    assert found == empty_machine / "sms_spam_collection.tsv"
    assert found.read_bytes() == collection
    assert [p.name for p in empty_machine.iterdir()] == ["sms_spam_collection.tsv"]  # the zip is gone
