"""Stage `download`: fetch MNIST's four IDX files into the folder `--out` names, verified by SHA-256.

Sources in order: `MNIST_MIRROR` (an http(s) URL prefix or a local folder) when set, then torchvision's
mirrors. The check is on the *decompressed* content (a recompressed file is as good), and a file lands
in the folder by an atomic rename after its digest matched. When every source fails (offline), the last
is the copy DVC's cache holds for the last run (DVC deletes a stage's outputs before it runs, so a
forced run offline would leave the folder empty): found through dvc.lock's `.dir` entry and `dvc cache
dir`, as DVC documents both. Not `persist: true`: it turns off the stage's run-cache, which a worker's
`dvc repro --pull` restores data/raw from (docs/sweeps.md); and online, a forced run does fetch again.
"""

import functools
import gzip
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.fsio import atomic_write_bytes

# SHA-256 of each file's decompressed content (the canonical MNIST release).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# In a source list, torchvision's mirrors (MNIST.mirrors), read where they are reached: importing
# torchvision.datasets (torch and torchvision's models with it) took 1.66 s of the stage's 2.1 s
# here, on every run that a working `MNIST_MIRROR` serves.
TORCHVISION_MIRRORS = "torchvision's mirrors"


class SourceFailed(Exception):
    """One source could not deliver one file; `retry` says whether trying again may help."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


@dataclass(frozen=True)
class Policy:
    timeout_s: float = 20.0  # connect and per-read timeout
    deadline_s: float = 300.0  # a whole file, so a server trickling bytes cannot hang us
    attempts: int = 3
    backoff_s: float = 1.0  # doubles after each failed attempt


def each_source(sources: list[str]):
    for source in sources:
        if source == TORCHVISION_MIRRORS:
            from torchvision.datasets import MNIST

            yield from MNIST.mirrors
        else:
            yield source


def parse_sources(mirror_env: str | None, mirrors: list[str]) -> list[str]:
    """The ordered sources; a bad `MNIST_MIRROR` is an error, not a silent fallback."""
    if not mirror_env:
        return mirrors
    try:
        parsed = urllib.parse.urlparse(mirror_env)
        parsed.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise PipelineError(f"MNIST_MIRROR: {mirror_env!r} is not a valid URL ({error})") from None
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise PipelineError(f"MNIST_MIRROR: {mirror_env!r} is not a valid URL (no host)")
        return [mirror_env.rstrip("/") + "/", *mirrors]
    if parsed.scheme not in ("", "file"):
        raise PipelineError(f"MNIST_MIRROR: {mirror_env!r} is neither an http(s) URL nor a local folder")
    folder = Path(parsed.path if parsed.scheme == "file" else mirror_env)
    if not folder.is_dir():
        raise PipelineError(f"MNIST_MIRROR: folder {str(folder)!r} does not exist")
    return [str(folder.resolve()), *mirrors]


def verify(name: str, compressed: bytes, expected_sha256: str) -> bytes:
    """`compressed` itself where its decompressed content has the digest expected."""
    if not compressed.startswith(b"\x1f\x8b"):
        head = compressed[:64].lstrip().lower()
        kind = "an HTML page" if head.startswith((b"<!doctype", b"<html")) else "not gzip data"
        raise SourceFailed(f"got {kind} instead of {name}.gz")
    try:
        digest = hashlib.sha256(gzip.decompress(compressed)).hexdigest()
    except (EOFError, OSError, zlib.error) as error:
        raise SourceFailed(f"corrupt or truncated gzip ({error})", retry=True) from None
    if digest != expected_sha256:
        raise SourceFailed(f"SHA-256 mismatch (got {digest[:12]}…, want {expected_sha256[:12]}…)")
    return compressed


def verified_file(path: Path, name: str, expected: str) -> bytes | None:
    try:
        return verify(name, path.read_bytes(), expected)
    except (OSError, SourceFailed):
        return None


def fetch(source: str, name: str, policy: Policy) -> bytes:
    """`name`'s `.gz` file from a local folder or an http(s) URL prefix."""
    if not source.startswith(("http://", "https://")):
        path = Path(source) / f"{name}.gz"
        if not path.is_file():
            raise SourceFailed(f"{path} does not exist")
        return path.read_bytes()
    started = time.monotonic()
    request = urllib.request.Request(source + name + ".gz", headers={"User-Agent": "mnist-bn-pipeline"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            chunks = []
            # read1: at most one recv per chunk, so the deadline is checked while bytes trickle in
            while chunk := response.read1(1 << 20):
                chunks.append(chunk)
                if time.monotonic() - started > policy.deadline_s:
                    raise SourceFailed(f"took longer than {policy.deadline_s:g} s", retry=True)
    except urllib.error.HTTPError as error:
        raise SourceFailed(f"HTTP {error.code} {error.reason}", retry=error.code >= 500 or error.code == 429) from None
    except TimeoutError:
        raise SourceFailed(f"timed out after {policy.timeout_s:g} s", retry=True) from None
    except (OSError, http.client.HTTPException) as error:  # a URLError among them: its reason
        raise SourceFailed(f"connection failed ({getattr(error, 'reason', error)})", retry=True) from None
    body = b"".join(chunks)
    if declared is not None and declared.isdigit() and len(body) != int(declared):
        raise SourceFailed(f"truncated body ({len(body)} of {declared} bytes)", retry=True)
    return body


def fetch_verified(name: str, sources: list[str], expected: str, policy: Policy) -> bytes:
    failures = []
    for source in each_source(sources):
        for attempt in range(1, policy.attempts + 1):
            try:
                return verify(name, fetch(source, name, policy), expected)
            except SourceFailed as failure:
                if not failure.retry or attempt == policy.attempts:
                    failures.append(f"{source}: {failure}" + (f" after {attempt} tries" if attempt > 1 else ""))
                    break
                time.sleep(policy.backoff_s * 2 ** (attempt - 1))
    raise PipelineError(f"{name}.gz: every source failed: " + "; ".join(failures) + " (set MNIST_MIRROR to a "
                        "local folder or an http(s) URL prefix holding MNIST's four .gz files)")


def dvc_cached(raw_dir: Path) -> dict[str, Path]:
    """{file name: its copy in DVC's cache} of `raw_dir` as dvc.lock last recorded it; empty where
    there is no such record (no lock, no entry, the listing not in the cache)."""
    import yaml

    try:
        stages = yaml.safe_load(Path("dvc.lock").read_text())["stages"]
        digest = next(out["md5"] for stage in stages.values() for out in stage.get("outs", [])
                      if Path(out["path"]) == raw_dir and out["md5"].endswith(".dir"))
        found = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], capture_output=True,
                               text=True, timeout=60, check=True)
        cache = Path(found.stdout.strip()) / "files" / "md5"
        listing = json.loads((cache / digest[:2] / digest[2:]).read_text())
        return {entry["relpath"]: cache / entry["md5"][:2] / entry["md5"][2:] for entry in listing}
    except (OSError, ValueError, KeyError, TypeError, StopIteration, yaml.YAMLError, subprocess.SubprocessError):
        return {}


def download(raw_dir: Path, sources: list[str], checksums: dict[str, str] = MNIST_SHA256,
             policy: Policy = Policy()) -> list[str]:
    """Make `raw_dir` hold the four verified `.gz` files; returns the names it fetched."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    fetched = []
    cached = functools.cache(lambda: dvc_cached(raw_dir))  # looked at once, where a fetch fails
    for name, expected in checksums.items():
        target = raw_dir / f"{name}.gz"
        if verified_file(target, name, expected):
            print(f"{target}: present and verified")
            continue
        try:
            body = fetch_verified(name, sources, expected, policy)
            fetched.append(name)
            how = f"fetched and verified ({len(body):,} bytes)"
        except PipelineError:
            copy = cached().get(f"{name}.gz")
            body = copy and verified_file(copy, name, expected)
            if not body:
                raise
            how = f"every source failed (offline?); kept the copy DVC's cache holds for dvc.lock's {raw_dir}, verified"
        atomic_write_bytes(target, body)
        print(f"{target}: {how}")
    return fetched


def read_checksums(path: Path) -> dict[str, str]:
    """A `SHA256SUMS.decompressed` file: `<sha256>  <name>` per line."""
    try:
        lines = path.read_text().split("\n")
    except OSError as error:
        raise PipelineError(f"MNIST_CHECKSUMS: cannot read {path}: {error.strerror}") from None
    checksums = {}
    for line in filter(None, (line.strip() for line in lines)):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or name.removesuffix(".gz") not in MNIST_SHA256:
            raise PipelineError(f"MNIST_CHECKSUMS: {path}: bad line {line!r}")
        checksums[name.removesuffix(".gz")] = digest
    if checksums.keys() != MNIST_SHA256.keys():
        raise PipelineError(f"MNIST_CHECKSUMS: {path}: must list all of {', '.join(MNIST_SHA256)}")
    return checksums


if __name__ == "__main__":
    args = cli.arguments(__doc__, "out")
    with cli.one_line_errors():
        sources = parse_sources(os.environ.get("MNIST_MIRROR"), [TORCHVISION_MIRRORS])
        # A different data set in MNIST's format (or the tests' tiny one) brings its own digests.
        checksums_file = os.environ.get("MNIST_CHECKSUMS")
        checksums = read_checksums(Path(checksums_file)) if checksums_file else MNIST_SHA256
        download(args.out, sources, checksums)
