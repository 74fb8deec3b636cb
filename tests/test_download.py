"""The download stage against a real loopback HTTP server that misbehaves on purpose."""

import gzip
import hashlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.stages.download import (
    MNIST_SHA256,
    TORCHVISION_MIRRORS,
    Policy,
    download,
    each_source,
    fetch_verified,
    parse_sources,
)
from tests.conftest import SHARED_MNIST, stage_env

POLICY = Policy(timeout_s=1, deadline_s=5, attempts=2, backoff_s=0.01)
FIRST = next(iter(MNIST_SHA256))  # the file `download` fetches first

Behaviour = Callable[[BaseHTTPRequestHandler, bytes], None]  # (request, the genuine .gz body)


def _reply(request: BaseHTTPRequestHandler, payload: bytes, length: int | None = None,
           content_type: str = "application/octet-stream") -> None:
    request.send_response(200)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(payload) if length is None else length))
    request.end_headers()
    request.wfile.write(payload)


def genuine(request, body):
    _reply(request, body)


def status(code: int) -> Behaviour:
    return lambda request, body: request.send_error(code)


def truncated_body(request, body):
    """Declares the whole length, sends half, and closes the connection."""
    _reply(request, body[: len(body) // 2], length=len(body))


def truncated_gzip(request, body):
    _reply(request, body[: len(body) // 2])


def corrupt_gzip(request, body):
    _reply(request, body[:100] + bytes(byte ^ 0xFF for byte in body[100:200]) + body[200:])


def wrong_content(request, body):
    _reply(request, gzip.compress(b"\0\0\x08\x01\0\0\0\x02ab"))


def html_page(request, body):
    _reply(request, b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>",
           content_type="text/html")


def hang(request, body):
    """Accepts the request and never answers (until the test is over)."""
    request.server.stopping.wait(30)


def trickle(request, body):
    """Sends the headers, then one byte every 0.1 s: no read ever times out."""
    request.send_response(200)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    for offset in range(40):
        if request.server.stopping.wait(0.1):
            return
        request.wfile.write(body[offset : offset + 1])


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.loopback.answer(self)

    def log_message(self, *args):
        pass


class Loopback:
    """An HTTP server on 127.0.0.1 serving any number of mirrors, one per path prefix.

    A mirror answers the n-th request for a file with its n-th behaviour (the last repeats);
    `requests` counts the requests per path.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.mirrors: dict[str, tuple[Behaviour, ...]] = {}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.loopback = self
        self.httpd.stopping = threading.Event()

    def mirror(self, prefix: str, *behaviours: Behaviour) -> str:
        self.mirrors[prefix] = behaviours
        return f"http://127.0.0.1:{self.httpd.server_port}/{prefix}/"

    def count(self, prefix: str, name: str = FIRST) -> int:
        return self.requests[f"/{prefix}/{name}.gz"]

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        with self._lock:
            seen = self.requests[request.path]
            self.requests[request.path] += 1
        prefix, _, filename = request.path.strip("/").partition("/")
        behaviours = self.mirrors.get(prefix)
        if not behaviours or filename not in self.files:
            request.send_error(404)
            return
        behaviours[min(seen, len(behaviours) - 1)](request, self.files[filename])


@pytest.fixture
def digests(tiny_mirror) -> dict[str, str]:
    return tiny_mirror[1]


@pytest.fixture
def server(tiny_mirror):
    folder, digests = tiny_mirror
    loopback = Loopback({f"{name}.gz": (folder / f"{name}.gz").read_bytes() for name in digests})
    thread = threading.Thread(target=loopback.httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield loopback
    loopback.httpd.stopping.set()
    loopback.httpd.shutdown()
    loopback.httpd.server_close()
    thread.join(timeout=5)


def assert_holds_verified(raw: Path, digests: dict[str, str]) -> None:
    """Exactly the four files, each with the right content, and no temp leftovers."""
    assert sorted(path.name for path in raw.iterdir()) == sorted(f"{name}.gz" for name in digests)
    for name, digest in digests.items():
        assert hashlib.sha256(gzip.decompress((raw / f"{name}.gz").read_bytes())).hexdigest() == digest


FAULTS = {  # behaviour, the reason reported, how many requests it takes
    "404": (status(404), "HTTP 404 Not Found", 1),
    "403": (status(403), "HTTP 403 Forbidden", 1),
    "503": (status(503), "HTTP 503 Service Unavailable after 2 tries", 2),
    "truncated-body": (truncated_body, "truncated body", 2),
    "truncated-gzip": (truncated_gzip, "corrupt or truncated gzip", 2),
    "corrupt-gzip": (corrupt_gzip, "corrupt or truncated gzip", 2),
    "checksum-mismatch": (wrong_content, "SHA-256 mismatch", 1),
    "html-with-200": (html_page, f"got an HTML page instead of {FIRST}.gz", 1),
    "hanging-server": (hang, "timed out after 1 s after 2 tries", 2),
}


@pytest.mark.parametrize("behaviour, reason, requests", FAULTS.values(), ids=FAULTS)
def test_fault_is_reported_and_nothing_lands_in_raw(server, digests, tmp_path, behaviour, reason, requests):
    url = server.mirror("m", behaviour)
    raw = tmp_path / "raw"
    started = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        download(raw, [url], digests, POLICY)
    assert time.monotonic() - started < POLICY.attempts * POLICY.timeout_s + 2
    message = str(caught.value)
    assert message.startswith(f"{FIRST}.gz: every source failed: {url}: ")
    assert reason in message and "\n" not in message
    assert (" after 2 tries" in message) == (requests == 2)
    assert server.count("m") == requests
    assert list(raw.iterdir()) == []


def test_trickling_server_is_cut_off_at_the_deadline(server, digests):
    url = server.mirror("m", trickle)
    policy = Policy(timeout_s=1, deadline_s=1, attempts=1)
    started = time.monotonic()
    with pytest.raises(PipelineError, match="took longer than 1 s"):
        fetch_verified(FIRST, [url], digests[FIRST], policy)
    assert time.monotonic() - started < 2


def test_retry_after_one_503_succeeds(server, digests, tmp_path):
    url = server.mirror("m", status(503), genuine)
    assert download(tmp_path, [url], digests, POLICY) == list(digests)
    assert all(server.count("m", name) == 2 for name in digests)
    assert_holds_verified(tmp_path, digests)


@pytest.mark.parametrize("bad, requests", [(status(404), 1), (status(503), 2), (wrong_content, 1)],
                         ids=["404", "503-retried", "checksum-mismatch"])
def test_bad_first_mirror_falls_through_to_the_next(server, digests, tmp_path, bad, requests):
    sources = [server.mirror("bad", bad), server.mirror("good", genuine)]
    assert download(tmp_path, sources, digests, POLICY) == list(digests)
    assert all(server.count("bad", name) == requests for name in digests)
    assert all(server.count("good", name) == 1 for name in digests)
    assert_holds_verified(tmp_path, digests)


def test_all_sources_failing_is_one_error_naming_each_source_and_why(server, digests, tmp_path):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    missing, forbidden = server.mirror("missing", status(404)), server.mirror("html", html_page)
    raw = tmp_path / "raw"
    with pytest.raises(PipelineError) as caught:
        download(raw, [missing, forbidden, str(empty)], digests, POLICY)
    assert str(caught.value) == (
        f"{FIRST}.gz: every source failed: "
        f"{missing}: HTTP 404 Not Found; "
        f"{forbidden}: got an HTML page instead of {FIRST}.gz; "
        f"{empty}: {empty / FIRST}.gz does not exist"
        " (set MNIST_MIRROR to a local folder or an http(s) URL prefix holding MNIST's four .gz files)"
    )
    assert list(raw.iterdir()) == []


def test_verified_files_are_not_downloaded_again(server, digests, tmp_path):
    url = server.mirror("m", genuine)
    download(tmp_path, [url], digests, POLICY)
    assert download(tmp_path, [url], digests, POLICY) == []
    assert sum(server.requests.values()) == len(digests)
    assert_holds_verified(tmp_path, digests)


def test_corrupted_file_already_present_is_replaced(server, digests, tmp_path):
    url = server.mirror("m", genuine)
    download(tmp_path, [url], digests, POLICY)
    (tmp_path / f"{FIRST}.gz").write_bytes(b"\x1f\x8b garbage")
    assert download(tmp_path, [url], digests, POLICY) == [FIRST]
    assert server.count("m") == 2
    assert_holds_verified(tmp_path, digests)


def test_local_folder_mirror_by_path_and_file_url(tiny_mirror, tmp_path):
    folder, digests = tiny_mirror
    for index, mirror_env in enumerate((str(folder), f"file://{folder}")):
        sources = parse_sources(mirror_env, ["https://mirror.invalid/"])
        assert sources == [str(folder.resolve()), "https://mirror.invalid/"]
        raw = tmp_path / f"raw{index}"
        assert download(raw, sources, digests, POLICY) == list(digests)
        assert_holds_verified(raw, digests)


def test_mirror_naming_a_missing_folder_is_an_error(tmp_path):
    missing = tmp_path / "no_such_mirror"
    with pytest.raises(PipelineError, match=f"^MNIST_MIRROR: folder '{missing}' does not exist$"):
        parse_sources(str(missing), ["https://mirror.invalid/"])


@pytest.mark.parametrize("url", ["http://", "https:/mnist", "ftp://x", "http://[::1", "http://host:port/"])
def test_malformed_mirror_url_is_an_error(url):
    with pytest.raises(PipelineError) as caught:
        parse_sources(url, ["https://mirror.invalid/"])
    assert str(caught.value).startswith(f"MNIST_MIRROR: {url!r} is ")


def test_cli_with_missing_mirror_folder_exits_1_with_one_line(tmp_path):
    env = stage_env(MNIST_MIRROR=str(tmp_path / "no_such_mirror"))  # this tree's pipeline/, not the installed one
    result = subprocess.run([sys.executable, "-m", "pipeline.stages.download", "--out", str(tmp_path / "raw")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: MNIST_MIRROR: folder '{tmp_path}/no_such_mirror' does not exist"]
    assert not (tmp_path / "raw").exists()


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"no real MNIST at {SHARED_MNIST}")
def test_builtin_digests_match_real_mnist_and_a_working_mirror_never_imports_torchvision(tmp_path):
    """torchvision's mirror list is read where a source list reaches it: its import (torch and
    torchvision's models) was most of the stage's time on every run a mirror serves."""
    program = ("import runpy, sys; sys.argv = ['download', '--out', 'raw']; "
               "runpy.run_module('pipeline.stages.download', run_name='__main__'); print('torchvision' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path,
                            env=stage_env(MNIST_MIRROR=str(SHARED_MNIST)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("fetched and verified") == len(MNIST_SHA256), result.stdout
    assert result.stdout.splitlines()[-1] == "False", result.stdout
    assert_holds_verified(tmp_path / "raw", MNIST_SHA256)


def test_torchvision_mirrors_follow_where_the_list_names_them():
    from torchvision.datasets import MNIST

    assert list(each_source(["/mirror", TORCHVISION_MIRRORS, "https://last/"])) == ["/mirror", *MNIST.mirrors,
                                                                                       "https://last/"]
