"""The team server under the pipeline's own load: the shipped configuration (deploy/) against
MLflow's default auth configuration, both on the real stack (PostgreSQL, moto's S3 server,
`mlflow server --app-name basic-auth`, started by deploy/start_server.py) on 127.0.0.1.

    python -m benchmarks.bench_server [--quick] [--out FILE.json]

Both servers run side by side, each with its own PostgreSQL and S3 prefix and the same worker
count; only the auth config differs (deploy/basic_auth.ini against the basic_auth.ini MLflow
ships, whose credential cache is off). 1, 4 and 8 clients, each a process recording variants as a
train stage does (`record.mirror_variant` after each epoch, then with the finished outputs: real
checkpoints, the served model; the lab's 5 seeds and 10 epochs, new inputs each variant), the
configurations alternating. Latencies are taken in the clients; the metric points and artifacts
acknowledged are then counted against what PostgreSQL and S3 hold. Unpaced clients log as fast
as the server answers (its capacity); the `8 paced` rows give 8 clients the lab's epoch time
(PACED), as a sweep's train stages log, for 45 s. `--quick`: one round of 15 s per unpaced
measurement (about 5 minutes), for a busy machine; the default is 3 rounds of 30 s (~14 minutes).
"""

import argparse
import importlib.util
import itertools
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
ENVIRONMENT = {"python": platform.python_version(), "packages": {"torch": "2", "numpy": "2", "mlflow": "3"}}
USER = "bench"


class Stop(BaseException):
    """The measurement's time is up: raised before a request would be sent, through MLflow's handlers."""


_window: dict = {}  # in a client process: the server measured, the deadline, the exchanges so far


def record_requests(uri: str, deadline: float, exchanges: list) -> None:
    """From now on, every request to `uri` from this process is recorded in `exchanges`:
    (method, path, status, seconds, metric points of an acknowledged log-batch), and none is
    sent after `deadline`. The pool's processes serve one measurement after another."""
    import requests

    if not _window:
        send = requests.Session.request

        def recorded(session, method, url, *args, **kwargs):
            if _window["uri"] is None or not url.startswith(_window["uri"]):
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


def connected(server: dict) -> tuple:
    """(client, experiment id) of the bench user, opened as a train stage's record process opens it."""
    os.environ |= {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": server["password"]}
    from pipeline.tracking.store import Tracking, connect

    return connect(Tracking(server["uri"], Path(server["root"]), EXPERIMENT))


def history_after(config, epochs: int) -> dict:
    """What a train stage mirrors after `epochs` epochs: per metric, per epoch, each seed's value."""
    from pipeline.reports import METRICS

    return {name: [[0.5 + epoch / 100 + seed / 1000 for seed in config.seeds] for epoch in range(1, epochs + 1)]
            for name in METRICS}


def train_record(client, experiment: str, config, run: dict, checkpoints: Path, epoch_s: float,
                 deadline: float) -> None:
    """One variant's record as its train stage writes it (pipeline/tracking/process.LiveRecord):
    the runs made and log_model's one-off costs paid, the history so far after each epoch, then the
    finished outputs: best and diverged epochs, the two checkpoints and the served model."""
    from pipeline.tracking.record import VariantOutputs, mirror_variant, warm_model_logging

    seen: dict = {}  # the stage's record process: what its earlier calls found and logged
    ids = mirror_variant(client, experiment, VariantOutputs(run, ENVIRONMENT, history_after(config, 0)), seen)
    warm_model_logging(client, experiment, ids["variant"])
    for epoch in range(1, config.epochs + 1):
        time.sleep(max(0.0, min(epoch_s, deadline - time.time())))  # training
        mirror_variant(client, experiment, VariantOutputs(run, ENVIRONMENT, history_after(config, epoch)), seen)
    finished = {"seeds": config.seeds, "best_epoch": [config.epochs] * len(config.seeds),
                "diverged_epoch": [None] * len(config.seeds)} | history_after(config, config.epochs)
    mirror_variant(client, experiment, VariantOutputs(run, ENVIRONMENT, finished, checkpoints), seen)


def client_load(server: dict, start_at: float, seconds: float, checkpoints: str, epoch_s: float = 0.0,
                offset_s: float = 0.0) -> list:
    """One client: variants recorded as a train stage records them, from `start_at` for `seconds`;
    each epoch `epoch_s` long (0: the next call as soon as the last is answered), the first call
    `offset_s` after `start_at`."""
    from pipeline.config.params import load_params
    from pipeline.stages.train import Inputs, run_json

    config = load_params(ROOT / "params.yaml").variant("batchnorm")
    dataset = {"digest": "bench", "sizes": {"train": 55000, "val": 5000, "test": 10000}}
    client, experiment = connected(server)
    exchanges: list = []
    time.sleep(max(0.0, start_at + offset_s - time.time()))
    record_requests(server["uri"], start_at + seconds, exchanges)
    try:
        for trained in itertools.count():
            # New inputs each variant, as in a sweep (the same digest would add nothing), each with its
            # served model, as a train stage logs it: 26 of a variant's 140 requests, 0.13 of its 0.46 s
            # of client CPU (one client, 3 variants with and without, a busy 2-core machine).
            digest = f"bench-{os.getpid()}-{trained}"
            train_record(client, experiment, config, run_json(config, Inputs(dataset, {}, digest)),
                         Path(checkpoints), epoch_s, start_at + seconds)
    except Stop:
        _window["uri"] = None  # the next measurement's connect is none of this one's exchanges
        return exchanges


def write_checkpoints(folder: Path) -> Path:
    """last.pt and best.pt of the lab's batchnorm variant, saved as its train stage saves them
    (untrained weights: the record only loads them to log the served model)."""
    import torch

    from pipeline.config.params import load_params
    from pipeline.nn import checkpoint, training
    from pipeline.nn.model import StackedMlp

    config = load_params(ROOT / "params.yaml").variant("batchnorm")
    model = StackedMlp(config)
    trained = training.trained_state(model, training.make_optimizer(model, config))
    checkpoint.save(folder / "last.pt", {"config": config.model_dump(), "epoch": config.epochs, **trained})
    checkpoint.save(folder / "best.pt", {**trained, "val_acc": torch.zeros(len(config.seeds)),
                                         "epoch": [config.epochs] * len(config.seeds)})
    return folder


def warm(server: dict, seconds: float) -> None:
    """Imports and log_model's one-off costs done, every worker of the pool started, before measuring."""
    from pipeline.stages import train  # noqa: F401
    from pipeline.tracking import record

    client, experiment = connected(server)
    record.warm_model_logging(client, experiment, "0" * 32)
    time.sleep(seconds)


def measure(pool, server: dict, clients: int, seconds: float, checkpoints: Path, epoch_s: float = 0.0) -> dict:
    start_at = time.time() + 1.0  # every client waiting before the first request
    # Paced clients start an epoch's fraction apart, as independent machines do (started together,
    # all would log at the same instants).
    futures = [pool.submit(client_load, server["login"], start_at, seconds, str(checkpoints), epoch_s,
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

    shipped_by_mlflow = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth" / "basic_auth.ini"
    for name, auth_config in (("shipped", None), ("mlflow-default", shipped_by_mlflow)):
        (folder / name).mkdir()
        server = TeamServer(folder / name, start_postgres(), s3, free_port(), secrets.token_urlsafe(16),
                            auth_config=auth_config, artifacts_prefix=name)
        servers[name] = {"server": server}  # stopped at the end, even if what follows fails
        server.start()
        password = create_user(server.uri, server.admin_password, USER)
        os.environ |= {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}
        connect(Tracking(server.uri, folder / name, EXPERIMENT))
        login = {"uri": server.uri, "password": password, "root": str(folder / name)}  # what a client needs
        servers[name] = {"server": server, "login": login}


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
        server = servers[name]["server"]  # what its PostgreSQL and S3 prefix hold:
        held = {"metric_points": server.postgres.scalar("SELECT count(*) FROM metrics"),
                "artifacts": sorted(key.removeprefix(f"{name}/") for key in server.s3.keys(f"{name}/"))}
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
    checkpoints = write_checkpoints(folder)
    s3 = start_s3()
    servers = {}
    started = time.time()
    try:
        start_servers(folder, s3, servers)
        paced = f"{PACED[0]} paced"
        results = {name: {**{str(clients): [] for clients in CLIENTS}, paced: []} for name in servers}
        context = get_context("spawn")  # clean client processes: no thread of the S3 server forked into them
        with ProcessPoolExecutor(max(CLIENTS), mp_context=context) as pool:
            for future in [pool.submit(warm, servers["shipped"]["login"], 2.0) for _ in range(max(CLIENTS))]:
                future.result()
            for index in range(rounds):
                # Paced: long enough for each client's variants to end (10 epochs of 1.8 s and more).
                for clients, key, span, epoch_s in [*((c, str(c), seconds, 0.0) for c in CLIENTS),
                                                    (PACED[0], paced, max(seconds, 45.0), PACED[1])]:
                    order = list(servers) if (index + clients) % 2 == 0 else list(reversed(servers))
                    for name in order:  # alternating, so drift on a shared machine hits both alike
                        results[name][key].append(measure(pool, servers[name], clients, span, checkpoints, epoch_s))
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
