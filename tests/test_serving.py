"""Serving the champion: `mlflow models serve` answers real-format images; bad input gets a 4xx."""

import json
import os
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from pipeline.data import as_images, load_split
from tests.mlflow_server import MLFLOW, free_port, stop, wait_healthy
from tests.shared_project import reproduced_project

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_mirror):
    """(scoring uri, project path) with the project's champion served on a loopback port."""
    path, env = reproduced_project(tmp_path_factory, tiny_mirror[0])
    folder = tmp_path_factory.mktemp("serving")
    port, log = free_port(), folder / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [MLFLOW, "models", "serve", "-m", "models:/mnist-mlp@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=os.environ | env | {"MLFLOW_TRACKING_URI": f"sqlite:///{path / 'mlflow.db'}"})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, process, log, timeout_s=120)
        yield uri, path
    finally:
        stop(process)


def post(uri: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(uri + "/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_the_champion_reads_the_digits_of_real_format_images(served):
    uri, path = served
    test = load_split(path / "data" / "prepared", "test", torch.device("cpu"))
    images = as_images(test.pixels[:64]).numpy()  # [64, 784] floats in [0, 1], as the lab fed them
    status, answer = post(uri, json.dumps({"inputs": images.tolist()}).encode())
    assert status == 200, answer
    predicted = np.asarray(answer["predictions"]).argmax(1)
    assert (predicted == test.labels[:64].numpy()).mean() >= 0.8  # tiny MNIST is learnable


@pytest.mark.parametrize("body", [
    b'{"inputs": [[0.5, 0.5, 0.5]]}',  # not 784 pixels
    b'{"inputs": "seven"}',
    b'{"pixels": [[0.0]]}',
    b"not json",
], ids=["wrong-shape", "a-string", "wrong-key", "not-json"])
def test_malformed_input_is_a_4xx_with_a_message(served, body):
    uri, _ = served
    status, answer = post(uri, body)
    assert 400 <= status < 500
    assert answer.get("message"), answer
