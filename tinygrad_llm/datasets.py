"""The data-set registry: every file the library needs, with its public URL and sha256.

`path(name)` gives a local copy. It looks first in the folder named by the environment
variable TINYGRAD_LLM_DATA (nothing is downloaded when the file is there), then in the
cache folder ($XDG_CACHE_HOME/tinygrad_llm or ~/.cache/tinygrad_llm), and otherwise
downloads the file into the cache once. `download_file` is the reusable part: a
resumable, verified, atomic download that the GPT-2 weights use too.
"""
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
GPT2_ENCODINGS = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"


@dataclass(frozen=True)
class DataSet:
    name: str
    url: str
    sha256: str
    filename: str
    folder: str = ""  # a subfolder of the data and cache folders ("gpt2" for GPT-2's files)
    zip_member: str | None = None  # the file is this member of the zip archive at `url`


REGISTRY = {d.name: d for d in [
    DataSet("the-verdict", f"{BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            "the-verdict.txt"),
    # The book's chapter 6 downloads UCI's zip and keeps its member SMSSpamCollection.
    DataSet("sms-spam-collection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            "sms_spam_collection.tsv", zip_member="SMSSpamCollection"),
    DataSet("instruction-data", f"{BOOK}/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            "instruction-data.json"),
    DataSet("instruction-data-with-preference",
            f"{BOOK}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            "instruction-data-with-preference.json"),
    DataSet("gpt2-encoder", f"{GPT2_ENCODINGS}/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            "encoder.json", folder="gpt2"),
    DataSet("gpt2-vocab", f"{GPT2_ENCODINGS}/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            "vocab.bpe", folder="gpt2"),
    # OpenAI publishes GPT-2's ranks as r50k_base.tiktoken; the bytes are those of gpt2.tiktoken.
    DataSet("gpt2-tiktoken", "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
            "gpt2.tiktoken", folder="gpt2"),
]}



class DownloadError(RuntimeError):
    """A download failed (HTTP error, dropped connection, no network); nothing final was written."""

def get(name):
    """The registry entry of a data set."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}: expected one of {sorted(REGISTRY)}") from None


def cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tinygrad_llm"


def local_path(name):
    """The data set's file if it is already on this machine (data folder or cache), else None."""
    entry = get(name)
    candidates = []
    if data_dir := os.environ.get("TINYGRAD_LLM_DATA"):
        # The file may sit in its subfolder (gpt2/encoder.json) or at the top of the folder.
        candidates += [Path(data_dir) / entry.folder / entry.filename, Path(data_dir) / entry.filename]
    candidates.append(cache_dir() / entry.folder / entry.filename)
    return next((p for p in candidates if p.is_file()), None)


def path(name, progress=True):
    """A local file holding the data set `name`, downloaded and verified on first use."""
    if found := local_path(name):
        return found
    entry = get(name)
    dest = cache_dir() / entry.folder / entry.filename
    if entry.zip_member is None:
        return download_file(entry.url, dest, sha256=entry.sha256, progress=progress)
    archive = download_file(entry.url, dest.with_suffix(".zip"), progress=progress)
    extract_member(archive, entry.zip_member, dest, sha256=entry.sha256)
    archive.unlink()
    return dest


def file_sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_and_move(part, dest, sha256, source):
    """Rename `part` to `dest` only if its sha256 matches; a bad file is deleted."""
    if sha256 is not None and (actual := file_sha256(part)) != sha256:
        part.unlink()
        raise ValueError(f"sha256 mismatch for {source}: expected {sha256}, got {actual}; "
                         "the corrupted download was deleted")
    os.replace(part, dest)  # atomic: a reader never sees a half-written file


def download_file(url, dest, sha256=None, resume=True, progress=True):
    """Download `url` to `dest` and return `dest` as a Path.

    The bytes stream into `dest + ".part"` in the same folder. A .part left by a dropped
    connection is resumed with an HTTP Range request (a server that ignores Range sends
    the whole file and the download restarts). `dest` appears, by an atomic rename, only
    once the sha256 matches, so a mismatch, an HTTP error or a dropped connection never
    leaves a final file. An existing `dest` with the right sha256 is not fetched again.
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if resume and part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the .part is no prefix of the file: start again
            part.unlink()
            return download_file(url, dest, sha256, resume=False, progress=progress)
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"download of {url} failed: {error.reason}") from None
    with response:
        if response.status != 206:
            offset = 0  # the server ignored the Range request: it sends the file from byte 0
        elif not (content_range := response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            raise DownloadError(f"download of {url} failed: asked for bytes {offset}-, got {content_range!r}")
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        dropped = False
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=expected, initial=offset, unit="B", unit_scale=True,
                desc=dest.name, disable=not progress) as bar:
            try:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException):
                dropped = True
    # http.client returns a short body without complaint when the peer closes early.
    received = part.stat().st_size
    if dropped or (expected is not None and received != expected):
        raise DownloadError(f"download of {url} was cut off after {received} of {expected or '?'} bytes; "
                           f"{part} is kept, run again to resume")
    _verify_and_move(part, dest, sha256, url)
    return dest


def extract_member(archive, member, dest, sha256=None):
    """Copy one member of a zip archive to `dest`, through a verified temporary file."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(archive) as zf:
        if member not in zf.namelist():
            raise ValueError(f"{archive} has no member {member!r}: it holds {zf.namelist()}")
        part.write_bytes(zf.read(member))
    _verify_and_move(part, dest, sha256, f"{member} in {archive}")
    return dest
