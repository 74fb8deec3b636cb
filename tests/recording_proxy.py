"""A loopback HTTP proxy in front of the MLflow server that keeps a record of every exchange:
what the pipelines sent (runs created, metric points, artifacts uploaded) and how long the server
took to answer each request. The load test counts the record against what the server stored."""

import http.client
import json
import threading
import time
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    status: int
    seconds: float  # from sending the request upstream to having the whole answer
    metric_points: int  # metrics in an acknowledged log-batch / log-metric request


class RecordingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.exchanges: list[Exchange] = []  # appended by the handler threads (list.append is atomic)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def acknowledged(self, method: str, path_part: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == method and path_part in e.path and e.status == 200]


def metric_points(path: str, body: bytes) -> int:
    if path.startswith("/api/2.0/mlflow/runs/log-batch"):
        return len(json.loads(body or b"{}").get("metrics", []))
    return int(path.startswith("/api/2.0/mlflow/runs/log-metric"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, proxy: RecordingProxy, *args) -> None:
        self.proxy = proxy
        super().__init__(*args)

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _forward(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.proxy.upstream_port, timeout=300)
        started = time.perf_counter()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
        except OSError:
            self.send_error(502)
            return
        finally:
            upstream.close()
        seconds = time.perf_counter() - started
        points = metric_points(self.path, body) if response.status == 200 and self.command == "POST" else 0
        self.proxy.exchanges.append(Exchange(self.command, self.path, response.status, seconds, points))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:  # send_response sets those
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward
