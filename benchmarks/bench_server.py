"""The team server under the pipeline's own load: the shipped configuration (deploy/) against
MLflow's default auth configuration, both on the real stack (PostgreSQL, moto's S3 server,
`mlflow server --app-name basic-auth`, started by deploy/start_server.py) on 127.0.0.1.

    python -m benchmarks.bench_server [--quick] [--out FILE.json]

Both servers run side by side, each with its own PostgreSQL and S3 prefix and the same worker
count; only the auth config differs (deploy/basic_auth.ini against the basic_auth.ini MLflow
ships, whose credential cache is off). 1, 4 and 8 clients, each a process logging variants the
way a train stage does: `start_variant_runs`, an epoch's `log_epoch` per epoch (the seed runs'
epochs after the last one, as with epochs shorter than SEED_RUNS_EVERY_S), `log_trained_model`
with two checkpoints, `set_status` (the lab's 5 seeds and 10 epochs, no torch model). The
configurations alternate within each round. Every request's latency is taken in the client;
afterwards the metric points and artifacts acknowledged are counted against what PostgreSQL
and S3 hold. Those clients log as fast as the server answers (its capacity); the `8 paced` rows
give 8 clients the lab's epoch time (PACED), as a sweep's train stages log, for 45 s. `--quick`:
one round of 15 s per unpaced measurement (about 5 minutes), for a busy machine; the default is 3
rounds of 30 s (about 14 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tests.support import ROOT
from tests.team_server import TeamServer, create_user, free_port, start_postgres, start_s3

CLIENTS = (1, 4, 8)
# Clients that log as fast as the server answers measure its capacity, and their latency is queueing:
# with N clients always waiting, the mean is N / (requests/s) (Little's law). A sweep's clients
# train between their calls: the paced rows give each of 8 clients the default lab's epoch time here
# (a train stage of 5 seeds: ~18 s for 10 epochs), the load the issue sized (about 17 requests/s).
PACED = (8, 1.8)  # (clients, seconds an epoch takes)
EXPERIMENT = "bench"
USER = "bench"


class Stop(BaseException):
    """The measurement's time is up: raised before a request would be sent, through MLflow's handlers."""


def mlflow_default_auth_config() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "basic_auth.ini"


_window: dict = {}  # in a client process: the server measured, the deadline, the exchanges so far


def record_requests(uri: str, deadline: float, exchanges: list) -> None:
    """From now on, every request to `uri` from this process is recorded in `exchanges`:
    (method, path, status, seconds, metric points of an acknowledged log-batch), and none is
    sent after `deadline`. The pool's processes serve one measurement after another."""
    import requests

    if not _window:
        send = requests.Session.request

        def recorded(session, method, url, *args, **kwargs):
            if not url.startswith(_window["uri"]):
                return send(session, method, url, *args, **kwargs)
            if time.time() >= _window["deadline"]:
                raise Stop()
            started = time.perf_counter()
            response = send(session, method, url, *args, **kwargs)
            seconds = time.perf_counter() - started
            path = url.removeprefix(_window["uri"]).split("?")[0]
            body = kwargs.get("json") or {}
            points = len(body.get("metrics", [])) if response.status_code == 200 and path.endswith("log-batch") else 0
            _window["exchanges"].append((method, path, response.status_code, seconds, points))
            return response

        requests.Session.request = recorded
    _window.update(uri=uri, deadline=deadline, exchanges=exchanges)


def client_load(uri: str, password: str, start_at: float, seconds: float, folder: str, epoch_s: float = 0.0,
                offset_s: float = 0.0) -> list:
    """One client: variants logged as a train stage logs them, from `start_at` for `seconds`; each
    epoch `epoch_s` long (0: the next call as soon as the last is answered), the first call
    `offset_s` after `start_at`."""
    os.environ |= {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password,
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    from mlflow import MlflowClient

    from pipeline.tracking import runs as variant_runs
    from pipeline.config.params import load_params

    config = load_params(ROOT / "params.yaml").variant("batchnorm")
    environment = {"python": platform.python_version(), "packages": {"torch": "2", "numpy": "2", "mlflow": "3"}}
    dataset = {"digest": "bench", "uri": "data/prepared", "sizes": {"train": 55000, "val": 5000, "test": 10000}}
    checkpoints = sorted(Path(folder).glob("*.pt"))
    # A client is one variant, trained again and again: its inputs digest is its own, as each
    # variant's is in a sweep. (One digest for every client had each start close the others'
    # running runs as abandoned: hundreds of updates a measurement that no sweep makes.)
    digest = f"bench-{os.getpid()}"
    client = MlflowClient(uri)
    exchanges: list = []
    time.sleep(max(0.0, start_at + offset_s - time.time()))
    record_requests(uri, start_at + seconds, exchanges)
    try:
        while True:
            run_ids = variant_runs.start_variant_runs(client, EXPERIMENT, config, {"inputs_digest": digest}, dataset,
                                                      environment)
            epochs = []
            for epoch in range(1, config.epochs + 1):
                time.sleep(max(0.0, min(epoch_s, start_at + seconds - time.time())))  # training
                metrics = {name: [0.5 + epoch / 100 + seed / 1000 for seed in config.seeds]
                           for name in ("train_loss", "train_acc", "val_loss", "val_acc")}
                epochs.append((epoch, int(time.time() * 1000), metrics))
                variant_runs.log_epoch(client, run_ids, epochs[-1], epochs if epoch == config.epochs else [])
            variant_runs.log_trained_model(client, run_ids, None, [config.epochs] * len(config.seeds),
                                           [None] * len(config.seeds), checkpoints)
            variant_runs.set_status(client, run_ids, "FINISHED")
    except Stop:
        return exchanges


def warm(seconds: float) -> None:
    """Imports done, and every worker of the pool started, before any measurement."""
    import mlflow  # noqa: F401

    from pipeline.config import params  # noqa: F401
    from pipeline.tracking import runs  # noqa: F401

    time.sleep(seconds)


def measure(pool, server: dict, clients: int, seconds: float, folder: Path, epoch_s: float = 0.0) -> dict:
    start_at = time.time() + 1.0  # every client waiting before the first request
    # Paced clients start an epoch's fraction apart, as independent machines do (started together,
    # all would log at the same instants).
    futures = [pool.submit(client_load, server["uri"], server["password"], start_at, seconds, str(folder), epoch_s,
                           index * epoch_s / clients) for index in range(clients)]
    exchanges = [exchange for future in futures for exchange in future.result()]
    latencies = sorted(seconds for _, _, _, seconds, _ in exchanges)
    return {"requests": len(exchanges), "requests_per_s": len(exchanges) / seconds,
            "latencies_s": latencies, "errors": sum(status >= 400 for _, _, status, _, _ in exchanges),
            "server_errors": sum(status >= 500 for _, _, status, _, _ in exchanges),
            "metric_points": sum(points for *_, points in exchanges),
            "artifacts": sorted({path.split("/mlflow-artifacts/artifacts/", 1)[1] for method, path, status, _, _
                                 in exchanges if method == "PUT" and status == 200 and "/mlflow-artifacts/" in path})}


def percentile(values: list[float], q: float) -> float:
    return values[int(q * (len(values) - 1))] if values else float("nan")


def start_servers(folder: Path, s3, servers: dict) -> None:
    """Into `servers`: the two configurations, each on its own PostgreSQL, with a user `bench`
    and the experiment."""
    import secrets

    from pipeline.tracking.store import Tracking, connect

    for name, auth_config in (("shipped", None), ("mlflow-default", mlflow_default_auth_config())):
        (folder / name).mkdir()
        server = TeamServer(folder / name, start_postgres(), s3, free_port(), secrets.token_urlsafe(16),
                            auth_config=auth_config, artifacts_prefix=name)
        servers[name] = {"server": server}  # stopped at the end, even if what follows fails
        server.start()
        password = create_user(server.uri, server.admin_password, USER)
        os.environ |= {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}
        connect(Tracking(server.uri, folder / name, EXPERIMENT))
        servers[name] = {"server": server, "uri": server.uri, "password": password}


def stored(server: TeamServer, name: str) -> dict:
    """What the configuration's PostgreSQL and S3 prefix hold."""
    keys = [key.removeprefix(f"{name}/") for key in server.s3.keys(f"{name}/")]
    return {"metric_points": server.postgres.scalar("SELECT count(*) FROM metrics"), "artifacts": sorted(keys)}


def summary(results: dict, servers: dict) -> dict:
    table = {}
    for name, by_clients in results.items():
        for clients, rounds in by_clients.items():
            latencies = sorted(s for r in rounds for s in r["latencies_s"])
            table[f"{name}/{clients}"] = {
                "requests_per_s": statistics.median(r["requests_per_s"] for r in rounds),
                "p50_ms": 1000 * percentile(latencies, 0.5), "p95_ms": 1000 * percentile(latencies, 0.95),
                "errors": sum(r["errors"] for r in rounds), "server_errors": sum(r["server_errors"] for r in rounds),
                "requests": sum(r["requests"] for r in rounds)}
    checks = {}
    for name, by_clients in results.items():
        sent_points = sum(r["metric_points"] for rounds in by_clients.values() for r in rounds)
        sent_artifacts = sorted({a for rounds in by_clients.values() for r in rounds for a in r["artifacts"]})
        held = stored(servers[name]["server"], name)
        checks[name] = {"metric_points_sent": sent_points, "metric_points_stored": held["metric_points"],
                        "artifacts_sent": len(sent_artifacts), "artifacts_stored": len(held["artifacts"]),
                        "all_stored": sent_points == held["metric_points"] and sent_artifacts == held["artifacts"]}
    top = max(CLIENTS)
    default = table[f"mlflow-default/{top}"]["requests_per_s"]
    ratio = table[f"shipped/{top}"]["requests_per_s"] / default if default else float("nan")
    return {"table": table, "stored": checks, f"shipped_vs_default_requests_per_s_at_{top}_clients": ratio}


def print_table(result: dict) -> None:
    print(f"| configuration | clients | requests/s | p50 ms | p95 ms | errors | 5xx |\n|---|---|---|---|---|---|---|")
    for key, row in result["table"].items():
        name, clients = key.split("/")
        print(f"| {name} | {clients} | {row['requests_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
              f"{row['errors']} | {row['server_errors']} |")
    top = max(CLIENTS)
    print(f"\nshipped / MLflow default at {top} clients: "
          f"{result[f'shipped_vs_default_requests_per_s_at_{top}_clients']:.1f}x requests/s")
    for name, check in result["stored"].items():
        print(f"{name}: {check['metric_points_sent']} metric points sent, {check['metric_points_stored']} stored; "
              f"{check['artifacts_sent']} artifacts sent, {check['artifacts_stored']} stored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 15 s per measurement")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    rounds, seconds = (1, 15.0) if args.quick else (3, 30.0)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no request but the server's, in the clients too
    folder = Path(tempfile.mkdtemp(prefix="bench-server-"))
    for name in ("last.pt", "best.pt"):  # checkpoints of a realistic order of size
        (folder / name).write_bytes(os.urandom(64 * 1024))
    s3 = start_s3()
    servers = {}
    started = time.time()
    try:
        start_servers(folder, s3, servers)
        paced = f"{PACED[0]} paced"
        results = {name: {**{str(clients): [] for clients in CLIENTS}, paced: []} for name in servers}
        context = get_context("spawn")  # clean client processes: no thread of the S3 server forked into them
        with ProcessPoolExecutor(max(CLIENTS), mp_context=context) as pool:
            for future in [pool.submit(warm, 2.0) for _ in range(max(CLIENTS))]:
                future.result()
            for index in range(rounds):
                # Paced: long enough for each client's variants to end (10 epochs of 1.8 s and more).
                for clients, key, span, epoch_s in [*((c, str(c), seconds, 0.0) for c in CLIENTS),
                                                    (PACED[0], paced, max(seconds, 45.0), PACED[1])]:
                    order = list(servers) if (index + clients) % 2 == 0 else list(reversed(servers))
                    for name in order:  # alternating, so drift on a shared machine hits both alike
                        results[name][key].append(measure(pool, servers[name], clients, span, folder, epoch_s))
                        row = results[name][key][-1]
                        print(f"round {index + 1} {name} {key} clients: {row['requests_per_s']:.1f} requests/s, "
                              f"p95 {1000 * percentile(row['latencies_s'], 0.95):.0f} ms", flush=True)
        result = summary(results, servers) | {
            "rounds": rounds, "seconds_per_measurement": seconds, "wall_s": time.time() - started,
            "loadavg_1_5_15min": os.getloadavg(), "cpus": os.cpu_count(),
            "workers": os.environ.get("MLFLOW_WORKERS", "deploy/start_server.py's WORKERS")}
    finally:
        for entry in servers.values():
            entry["server"].stop()
            entry["server"].postgres.stop()
            shutil.rmtree(entry["server"].postgres.folder, ignore_errors=True)
        s3.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
