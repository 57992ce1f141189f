"""The data-set registry: every file the library needs, with its public URL and sha256.

`path(name)` gives a local copy. It looks first in the folder named by the environment
variable TINYGRAD_LLM_DATA (nothing is downloaded when the file is there), then in the
cache folder ($XDG_CACHE_HOME/tinygrad_llm or ~/.cache/tinygrad_llm), and otherwise
downloads the file into the cache once. `download_file` is the reusable part: a
resumable, verified, atomic download that the GPT-2 weights use too.
"""
import errno
import hashlib
import http.client
import json
import os
import time
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



# Download time limits: seconds without a byte, and the slowest average rate the overall
# deadline allows for a file of known size (one of unknown size gets a fixed deadline).
READ_TIMEOUT = 60
MIN_RATE = 100_000  # bytes per second
UNKNOWN_SIZE_DEADLINE = 1800


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
    """The data set's file if it is already on this machine (data folder or cache), else None.

    A file found is not verified here; `path` verifies it.
    """
    entry = get(name)
    return next((p for p in _candidates(entry) if p.is_file()), None)


def _candidates(entry):
    candidates = []
    if data_dir := os.environ.get("TINYGRAD_LLM_DATA"):
        # The file may sit in its subfolder (gpt2/encoder.json) or at the top of the folder.
        candidates += [Path(data_dir) / entry.folder / entry.filename, Path(data_dir) / entry.filename]
    candidates.append(cache_dir() / entry.folder / entry.filename)
    return candidates


def path(name, progress=True):
    """A local file holding the data set `name`, downloaded and verified on first use.

    Every file is checked against the registry's sha256 each time it is asked for: one in
    the TINYGRAD_LLM_DATA folder that does not match is refused naming it (the folder is the
    user's, so nothing there is deleted); a damaged copy in the cache is downloaded again.
    """
    entry = get(name)
    dest = cache_dir() / entry.folder / entry.filename
    for candidate in _candidates(entry)[:-1]:  # the data folder's
        if candidate.is_file():
            if (actual := file_sha256(candidate)) != entry.sha256:
                raise ValueError(f"{candidate} is not the data set {name!r}: its sha256 is {actual}, expected "
                                 f"{entry.sha256}; replace it with the file from {entry.url}")
            return candidate
    if entry.zip_member is None:
        return download_file(entry.url, dest, sha256=entry.sha256, progress=progress)
    if dest.is_file() and file_sha256(dest) == entry.sha256:
        return dest
    archive = download_file(entry.url, dest.with_suffix(".zip"), progress=progress, check=check_zip)
    try:
        extract_member(archive, entry.zip_member, dest, sha256=entry.sha256)
    finally:
        archive.unlink()  # verified or not, the archive has served its purpose
    return dest


def file_sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- checks of downloaded files: each raises ValueError saying what the file is not ---------------

def check_sha256(sha256):
    """A check that the file's sha256 is `sha256`."""
    def check(file):
        if (actual := file_sha256(file)) != sha256:
            raise ValueError(f"sha256 mismatch: expected {sha256}, got {actual}")
    return check


def check_zip(file):
    """The file is a zip archive whose members all read back with their CRCs."""
    try:
        with zipfile.ZipFile(file) as zf:
            damaged = zf.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"not a zip archive ({error})") from None
    if damaged is not None:
        raise ValueError(f"a damaged zip archive (member {damaged!r} fails its CRC)")


def check_json(file):
    """The file is JSON holding an object (an HTML error page saved as config.json is not)."""
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"JSON holding a {type(value).__name__}, not an object")


def _check(file, check, sha256):
    if sha256 is not None:
        check_sha256(sha256)(file)
    if check is not None:
        check(file)


def download_file(url, dest, sha256=None, resume=True, progress=True, check=None, deadline=None,
                  read_timeout=READ_TIMEOUT):
    """Download `url` to `dest` and return `dest` as a Path.

    The bytes stream into `dest + ".part"` in the same folder. A .part left by a dropped
    connection is resumed with an HTTP Range request (a server that ignores Range sends
    the whole file and the download restarts). `dest` appears, by an atomic rename, only
    once it passed its checks: the sha256, if given, and `check(path)`, a function that
    raises ValueError saying what the file is not (check_json, check_zip, ...). So a
    mismatch, an HTTP error or a dropped connection never leaves a final file, and a file
    that fails its checks is deleted with a ValueError naming the URL.

    An existing `dest` is checked the same way: it is returned if it passes, and
    downloaded again if it does not (a cached HTML page saved as config.json once is not
    reused forever).

    Time limits: `read_timeout` seconds without a byte (connecting, or mid-file), and an
    overall `deadline` in seconds (default: 2 minutes plus the time for the file's size at
    100 kB/s), so a server that trickles a byte every few seconds cannot hold the download
    forever; a timed-out download keeps its .part to resume. A write that fails (a full
    disk) deletes the .part, so it does not keep the disk full, and raises OSError. A
    folder that cannot be created or written into (read-only) raises an OSError naming
    it (a PermissionError) before anything is requested or written.
    """
    dest = Path(dest)
    damaged = False
    if _is_file(dest):
        try:
            _check(dest, check, sha256)
            return dest  # a good copy is used even in a read-only folder
        except ValueError as error:
            _say(f"{dest} is damaged ({error}); downloading it again", progress)
            damaged = True
    _writable_folder(dest.parent, url)
    if damaged:
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if resume and part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    started = time.monotonic()
    try:
        response = urllib.request.urlopen(request, timeout=read_timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the .part is no prefix of the file: start again
            part.unlink()
            return download_file(url, dest, sha256, False, progress, check, deadline, read_timeout)
        raise DownloadError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"download of {url} failed: {error.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as error:  # a server that never answers
        raise DownloadError(f"download of {url} failed: {_timeout_text(error, read_timeout)}") from None
    with response:
        if response.status != 206:
            offset = 0  # the server ignored the Range request: it sends the file from byte 0
        elif not (content_range := response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            raise DownloadError(f"download of {url} failed: asked for bytes {offset}-, got {content_range!r}")
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        if deadline is None:
            deadline = 120 + (expected or 0) / MIN_RATE if expected is not None else UNKNOWN_SIZE_DEADLINE
        failure = None
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=expected, initial=offset, unit="B", unit_scale=True,
                desc=dest.name, disable=not progress) as bar:
            while True:
                if time.monotonic() - started > deadline:
                    failure = f"it took longer than its deadline of {deadline:.0f} s"
                    break
                try:
                    chunk = response.read1(1 << 16)  # what has arrived: read() would wait for all 64 KiB
                except (OSError, http.client.HTTPException) as error:
                    failure = f"cut off ({_timeout_text(error, read_timeout)})"
                    break
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as error:
                    f.close()
                    part.unlink()
                    raise OSError(error.errno, f"cannot write {part} ({error.strerror}); the partial "
                                               f"download was deleted so it does not fill the disk") from None
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the peer closes early.
    received = part.stat().st_size
    if failure is None and expected is not None and received != expected:
        failure = "cut off"
    if failure is not None:
        raise DownloadError(f"download of {url} {failure} after {received} of {expected or '?'} bytes; "
                            f"{part} is kept, run again to resume")
    try:
        _check(part, check, sha256)
    except ValueError as error:
        part.unlink()
        raise ValueError(f"{url} did not send what was expected ({error}); the download was deleted") from None
    os.replace(part, dest)  # atomic: a reader never sees a half-written file
    return dest


def _is_file(path):
    """Path.is_file(), False where a folder on the way may not be entered (the folder check then says so)."""
    try:
        return path.is_file()
    except PermissionError:
        return False


def _writable_folder(folder, url):
    """Create `folder` if needed and make sure files can be written into it, or raise an OSError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        code = error.errno
    else:
        if os.access(folder, os.W_OK | os.X_OK):
            return
        code = errno.EACCES
    # OSError(errno.EACCES, ...) is a PermissionError, as the failed write would have raised.
    raise OSError(code, f"cannot download {url} into {folder}: the folder is not writable "
                        f"({os.strerror(code)}); nothing was written")


def _timeout_text(error, read_timeout):
    if isinstance(error, TimeoutError) or "timed out" in str(error):
        return f"no answer for {read_timeout} s"
    return str(error) or type(error).__name__


def _say(message, progress):
    if progress:
        tqdm.write(message)


def extract_member(archive, member, dest, sha256=None):
    """Copy one member of a zip archive to `dest`, through a verified temporary file."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise ValueError(f"{archive} has no member {member!r}: it holds {zf.namelist()}")
            part.write_bytes(zf.read(member))
    except zipfile.BadZipFile as error:
        raise ValueError(f"{archive} is not a valid zip archive ({error})") from None
    if sha256 is not None and (actual := file_sha256(part)) != sha256:
        part.unlink()
        raise ValueError(f"sha256 mismatch for {member} in {archive}: expected {sha256}, got {actual}; "
                         "the corrupted file was deleted")
    os.replace(part, dest)
    return dest
