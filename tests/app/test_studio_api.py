"""The running app through gradio_client: sizes, sidecars, queue order, error messages, the compare mode."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError
from gradio_client.utils import Status
from PIL import Image
from ultraflux_model.app.engine import list_outputs


@pytest.fixture(scope="module")
def client(studio_app):
    return Client(studio_app.url, verbose=False, download_files=True)


@pytest.mark.parametrize("size", [(256, 256), (512, 256)])
def test_generate_endpoint_returns_image_and_sidecar(client, studio_app, size):
    width, height = size
    image_file, meta = client.predict("a red fox in snow", width, height, 2, 4.0, 11, api_name="/generate")
    image = Image.open(image_file)
    assert image.size == (width, height) and image.mode == "RGB"
    assert np.asarray(image).std() > 0
    assert (meta["width"], meta["height"], meta["seed"], meta["steps"], meta["prompt"]) == (width, height, 11, 2, "a red fox in snow")
    served = Path(meta.pop("image_path"))
    assert served.is_relative_to(studio_app.out) and served.is_file()
    assert json.loads(served.with_suffix(".json").read_text()) == meta  # the sidecar beside the PNG
    assert np.array_equal(np.asarray(Image.open(served)), np.asarray(image))  # the client got that very file
    assert meta["model"] == str(studio_app.model) and len(meta["model_hash"]) == 64
    # the settings travel inside the PNG too, as the A1111 `parameters` text chunk image tools read
    parameters = Image.open(image_file).info["parameters"]
    assert parameters.startswith("a red fox in snow\nSteps: 2, ")
    assert f"Seed: 11, Size: {width}x{height}, Model hash: {meta['model_hash'][:10]}" in parameters


def test_two_requests_submitted_together_complete_in_order(client, studio_app):
    first = client.submit("first", 256, 256, 2, 4.0, 1, api_name="/generate")
    # submit() sends from a thread pool: wait until the server has the first job (queued or running) so that
    # "first" really arrives first, then send the second while the first is still pending.
    deadline = time.monotonic() + 60
    while first.status().code in (Status.STARTING, Status.JOINING_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not first.done()
    second = client.submit("second", 256, 256, 2, 4.0, 2, api_name="/generate")
    meta_2, meta_1 = second.result(timeout=300)[1], first.result(timeout=300)[1]
    assert (meta_1["prompt"], meta_1["seed"], meta_2["prompt"], meta_2["seed"]) == ("first", 1, "second", 2)
    p1, p2 = Path(meta_1["image_path"]), Path(meta_2["image_path"])
    # One job on the device at a time, first come first served: the first image is written before the second.
    assert p1.stat().st_mtime_ns < p2.stat().st_mtime_ns
    newest = [path for path, _ in list_outputs(studio_app.out)[:2]]
    assert newest == [p2, p1]  # the gallery lists newest first


@pytest.mark.parametrize(
    "size,message",
    [((250, 256), "nearest valid size is 256x256"), ((8192, 4096), "over the limit of 16.9 MP per image")],
)
def test_bad_request_returns_the_message(client, size, message):
    with pytest.raises(AppError, match=message) as err:
        client.predict("a fox", *size, 2, 4.0, 0, api_name="/generate")
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize(
    "settings,message",
    [((0, 4.0, 0), "steps must be between 1 and 200 \\(serve.max_steps\\), got 0"),
     ((2, 31.0, 0), "guidance must be between 0 and 30"), ((2, 4.0, -1), "seed must lie between 0"),
     ((2.5, 4.0, 0), "steps must be a whole number")],
)  # fmt: skip
def test_range_errors_name_the_setting(client, settings, message):
    with pytest.raises(AppError, match=message) as err:
        client.predict("a fox", 64, 64, *settings, api_name="/generate")
    assert "Value " not in str(err.value) and "minimum value" not in str(err.value)


def test_compare_returns_both_models_on_the_same_seed(client, studio_app):
    a_file, b_file, meta = client.predict("a lighthouse", 512, 256, 2, 4.0, 5, api_name="/compare")
    a, b = np.asarray(Image.open(a_file)), np.asarray(Image.open(b_file))
    assert a.shape == b.shape == (256, 512, 3)
    assert not np.array_equal(a, b)  # different weights, same prompt and seed
    left, right = meta["model"], meta["compare"]
    assert (left["model"], right["model"]) == (str(studio_app.model), str(studio_app.compare))
    assert left["model_hash"] != right["model_hash"]
    assert left["seed"] == right["seed"] == 5 and left["prompt"] == right["prompt"] == "a lighthouse"
    for side in (left, right):
        assert set(side["scores"]) == {"glcm", "compression_ratio", "shannon_entropy", "flat_percentage"}
        assert side["scores"]["shannon_entropy"] > 0


def _wait_status(job, codes: set[Status], what: str) -> None:
    deadline = time.monotonic() + 300  # bounded wait for the server to take the job, not a timing assertion
    while job.status().code not in codes:
        if job.done() or time.monotonic() > deadline:
            pytest.fail(f"{what}: status {job.status().code}, done={job.done()}")
        time.sleep(0.05)


def test_compare_refuses_any_model_but_the_command_lines(client, studio_app):
    """The attack: a client names a server path as the second model. Refused before anything is loaded; the
    message shows no path (so it cannot tell which paths exist) and nothing changes for other users."""
    for attack in ("/etc", "/root", "../../../../etc/passwd", str(studio_app.model.parent)):
        with pytest.raises(AppError) as err:
            client.predict("a fox", 64, 64, 1, 4.0, 0, attack, api_name="/compare")
        text = str(err.value)
        assert "unknown second model" in text and "Traceback" not in text
        assert attack not in text and not re.search(r"(?<![\w:])/\w", text)  # no absolute path of any kind
    other = Client(studio_app.url, verbose=False, download_files=False)
    _, _, meta = other.predict("a fox", 64, 64, 1, 4.0, 0, api_name="/compare")  # default: the first --compare
    assert meta["compare"]["model"] == str(studio_app.compare)


def test_queue_and_session_limits_refuse_instead_of_piling_up(studio_app):
    """The attack: one client queues job after job (150 were accepted). Per session at most session_jobs queued or
    running, for everyone at most queue_size waiting; what is refused leaves the accepted jobs untouched."""
    assert (studio_app.session_jobs, studio_app.queue_size) == (2, 2)
    c1, c2, c3 = (Client(studio_app.url, verbose=False, download_files=False) for _ in range(3))
    long = ("a long job", 512, 512, 200, 4.0, 0)  # 200 steps: still running while the others are sent
    running = c1.submit(*long, api_name="/generate")
    _wait_status(running, {Status.PROGRESS}, "first job running")
    queued = c1.submit(*long, api_name="/generate")
    _wait_status(queued, {Status.IN_QUEUE}, "second job of c1 queued")
    other = None
    try:
        with pytest.raises(ValidationError, match="limit is 2, ui.session_jobs"):
            c1.predict(*long, api_name="/generate")  # c1's third: over its session limit
        other = c2.submit(*long, api_name="/generate")  # another session still gets in ...
        _wait_status(other, {Status.IN_QUEUE}, "c2's job queued")
        with pytest.raises(Exception, match="(?i)queue is full"):
            c3.predict(*long, api_name="/generate")  # ... until queue_size jobs wait
        assert not running.done() and queued.status().code == other.status().code == Status.IN_QUEUE
    finally:
        # Clean up through the app's own controls: c2 withdraws its waiting job; one Cancel of c1 stops both of
        # its jobs, submitted before it: the running one at its next step, the waiting one at its first.
        if other is not None:
            other.cancel()
        assert "cancelled" in c1.predict(api_name="/cancel")  # the state, shown beside the buttons
        for job in (running, queued):
            with pytest.raises(AppError, match="cancelled"):
                job.result(timeout=300)
    # the cancelled jobs left no empty run folders behind
    assert not [p for p in studio_app.out.rglob("*") if p.is_dir() and not any(p.iterdir())]
