"""Fixtures that make data (tiny MNIST-format IDX files, params for tiny runs), the session's
team stack, and the tiers: each test marked by what it starts."""

import gzip
import hashlib
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.params import Params, parse_params
from pipeline.stages.download import MNIST_SHA256
# Imported from here by the test modules too (tests/support.py is their home, the benchmarks' too).
from tests.support import ROOT, SHARED_MNIST, copy_project, run, stage_command, stage_env  # noqa: F401
from tests.team_server import create_user, postgres_bin, team_stack


def encode_idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_mnist_arrays(train: int = 600, test: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable stand-in for MNIST: each class is a fixed random pattern plus noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        noise = rng.normal(0, 200, size=(count, 28, 28))
        images = np.clip(prototypes[labels] + noise, 0, 255)
        return images.astype(np.uint8), labels.astype(np.uint8)

    train_images, train_labels = draw(train)
    test_images, test_labels = draw(test)
    return {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": train_labels,
        "t10k-images-idx3-ubyte": test_images,
        "t10k-labels-idx1-ubyte": test_labels,
    }


def write_mirror(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """The four `.gz` files and a SHA256SUMS.decompressed; returns the digests."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    lines = []
    for name in MNIST_SHA256:
        content = encode_idx(arrays[name])
        (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
        digests[name] = hashlib.sha256(content).hexdigest()
        lines.append(f"{digests[name]}  {name}")
    (folder / "SHA256SUMS.decompressed").write_text("\n".join(lines) + "\n")
    return digests


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A local folder mirror of tiny MNIST, and its checksums (for MNIST_CHECKSUMS)."""
    folder = tmp_path_factory.mktemp("tiny_mirror")
    return folder, write_mirror(folder, tiny_mnist_arrays())


def _tiny_params_dict() -> dict:
    """The repository's params.yaml, shrunk: 2 seeds, 2 epochs, 100 validation images."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["val_size"] = 100
    raw["seeds"] = [0, 1]
    raw["train"] |= {"epochs": 2, "eval_batch_size": 256}
    raw["mlflow"]["experiment_name"] = "tiny"
    return raw


TINY_PARAMS = _tiny_params_dict()


def with_value(dotted: str, value: object) -> dict:
    """TINY_PARAMS with the key at `dotted` (e.g. `train.lr`) set to `value`."""
    import copy

    raw = copy.deepcopy(TINY_PARAMS)
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return raw


def tiny_params(**overrides) -> Params:
    """Tiny params with whole sections (or their keys, for dict sections) replaced."""
    raw = _tiny_params_dict()
    for section, value in overrides.items():
        raw[section] = raw[section] | value if isinstance(value, dict) and section in raw else value
    return parse_params(raw)


def repro_pipeline(path: Path, env: dict[str, str], timeout: float = 600):
    """`dvc repro` of a project's whole pipeline: a process per stage, each importing torch and
    MLflow, about a minute even on tiny data. The tests that call it form the `repro` tier."""
    return run(["dvc", "repro"], path, env, timeout=timeout)


def project_client(path: Path):
    """An MlflowClient on the store a project's stages track into by default: `<path>/mlflow.db`."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{path / 'mlflow.db'}")


@pytest.fixture
def local_tracking(tmp_path):
    """A Tracking on a fresh sqlite store in tmp_path (experiment `lab`); MLflow's global tracking
    URI, which `tracking.connect` sets, put back afterwards."""
    import mlflow

    from pipeline.tracking.store import Tracking

    yield Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, "lab")
    mlflow.set_tracking_uri(None)


def variant_run_ids(client, path: Path, variant: str, experiment: str = "tiny") -> dict:
    """{"variant": id, "seeds": [ids]} of the finished runs that record `variant`'s outputs in the
    project at `path`, found as the record finds them: by their inputs digest."""
    import json

    from pipeline.tracking.record import SEED_TAG
    from pipeline.tracking.store import INPUTS_TAG, PARENT_TAG

    digest = json.loads((path / "data" / "train" / variant / "run.json").read_text())["inputs_digest"]
    seeds = json.loads((path / "data" / "train" / variant / "history.json").read_text())["seeds"]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              f"tags.{INPUTS_TAG} = '{digest}' AND attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    [main] = [r.info.run_id for r in runs if SEED_TAG not in r.data.tags]
    by_seed = {r.data.tags[SEED_TAG]: r.info.run_id for r in runs if r.data.tags.get(PARENT_TAG) == main}
    assert sorted(by_seed) == sorted(map(str, seeds)), f"the finished runs of {variant} ({digest}): {by_seed}"
    return {"variant": main, "seeds": [by_seed[str(seed)] for seed in seeds]}


def write_environment(root: Path) -> dict:
    """What the check stage leaves in `root`: environment.json, from a copy of the lock file."""
    import shutil

    from pipeline.stages.check import check

    for name in ("requirements.lock", "requirements-gpu.lock"):
        shutil.copy(ROOT / name, root / name)
    return check(tiny_params(), root)


def make_project(path: Path, mirror: Path) -> tuple[Path, dict[str, str]]:
    """A copy of this project in a fresh git + DVC repository, with tiny params.

    Returns (path, env): run `dvc repro` there with `env` and it trains on tiny MNIST
    from `mirror`, tracking into `<path>/mlflow.db`.
    """
    env = stage_env(mirror)
    return copy_project(path, env, params=TINY_PARAMS), env


@pytest.fixture
def project(tmp_path, tiny_mirror):
    return make_project(tmp_path / "project", tiny_mirror[0])


@pytest.fixture(scope="session")
def http_mirror(tiny_mirror):
    """The tiny mirror served over HTTP on 127.0.0.1 (an ephemeral port); yields its URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder, _ = tiny_mirror

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def team_server(tmp_path_factory):
    """One team stack (tests/team_server.py) for the session's tests that stop none of its parts;
    each module tracks into an experiment and registers a model of its own names."""
    import shutil

    if postgres_bin("initdb") is None or shutil.which("runuser") is None:
        pytest.skip("needs Debian's postgresql (initdb, pg_ctl) and runuser")
    with team_stack(tmp_path_factory.mktemp("team")) as server:
        yield server


@pytest.fixture(scope="session")
def alice_password(team_server) -> str:
    """The password of `alice`, a user of the session's team server (READ on what others made)."""
    return create_user(team_server.uri, team_server.admin_password, "alice")


# The tiers: a test is marked by the test helpers that it, its fixtures and the helpers they call
# name, so a new test lands in its tier by itself; `make test-fast` runs the tests left unmarked.
TIER_OF_HELPER = {
    "tests.team_server.team_stack": "team",
    "tests.dask_cluster.Cluster": "cluster",
    "tests.dvc_queue.run_queues": "queue",
    "tests.mlflow_server.start_server": "server",
    "tests.mlflow_server.wait_healthy": "server",
    "tests.mlflow_server.launch": "server",
    "tests.shared_project.reproduced_project": "repro",
    "tests.conftest.repro_pipeline": "repro",
    "tests.faults.full_disk": "faults",
    "tests.faults.read_only": "faults",
    "tests.faults.wait_until_none_left": "faults",
}


def helper_tiers(function: types.FunctionType, seen: set) -> set[str]:
    """The tiers of the helpers `function`'s code names, directly or through the test code it calls
    (imported at the top of its module: a name imported inside a function is not seen)."""
    tiers, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        codes += [const for const in code.co_consts if isinstance(const, types.CodeType)]  # nested functions
        for name in code.co_names:
            target = function.__globals__.get(name)
            helper = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
            if helper in TIER_OF_HELPER:
                tiers.add(TIER_OF_HELPER[helper])
            elif isinstance(target, types.FunctionType) and target not in seen and is_test_code(target):
                seen.add(target)
                tiers |= helper_tiers(target, seen)
    return tiers


def is_test_code(function) -> bool:
    return Path(function.__code__.co_filename).is_relative_to(ROOT / "tests")


LONG_TIERS = {"team", "cluster", "queue", "lab"}  # minutes a module: run first, for the workers' balance


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the items
def pytest_collection_modifyitems(items):
    for item in items:
        functions = [item.function] + [fixture.func for name in item.fixturenames
                                       for fixture in item._fixtureinfo.name2fixturedefs.get(name, ())]
        seen = set()
        for tier in set().union(*(helper_tiers(f, seen) for f in functions if is_test_code(f))):
            item.add_marker(tier)
    long_modules = {item.module for item in items if LONG_TIERS & {mark.name for mark in item.iter_markers()}}
    items.sort(key=lambda item: item.module not in long_modules)  # stable: each module's order kept


@pytest.hookimpl(wrapper=True, optionalhook=True)  # a hook of pytest-timeout, a test dependency
def pytest_timeout_set_timer(item, settings):
    """A test past pyproject.toml's `timeout` fails with the processes still running under it."""
    import signal

    armed = yield
    fail = signal.getsignal(signal.SIGALRM)
    if callable(fail):  # pytest-timeout's signal method, this platform's default

        def report_then_fail(signum, frame):
            __tracebackhide__ = True
            item.add_report_section("timeout", "processes still running", process_tree())
            fail(signum, frame)

        signal.signal(signal.SIGALRM, report_then_fail)
    return armed


def process_tree() -> str:
    """This process's descendants, a line each: pid, parent, status, command line."""
    import psutil

    lines = []
    for process in psutil.Process().children(recursive=True):
        try:
            lines.append(f"{process.pid} (parent {process.ppid()}, {process.status()}): {' '.join(process.cmdline())}")
        except psutil.Error:  # gone meanwhile
            pass
    return "\n".join(lines) or "none"
