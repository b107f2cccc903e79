"""Shared fixtures: a small generated dataset and a tiny-model bundle built from it."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

# A small input keeps the suite fast; 112 / 14 = 8 patches a side, and the tiny
# model's native 16 x 16 grid makes the positional-embedding resize run.
IMAGE_SIZE = 112


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> tuple[Path, Path]:
    from mrad.tools.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), size=(112, 96), normal=4, anomalous=2, train=2)


@pytest.fixture(scope="session")
def tf_bundle(synth_data, tmp_path_factory) -> Path:
    from mrad.export.build import export_bundle
    from mrad.export.options import ExportOptions

    out = tmp_path_factory.mktemp("bundles") / "tiny-tf"
    export_bundle(ExportOptions(aux_data=[synth_data[0]], out=out, model="tiny", pretrained="none",
                                image_size=IMAGE_SIZE, device="cpu"), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def target_images(synth_data) -> list[Path]:
    return sorted(synth_data[1].glob("*/test/*/*.png"))


def encoder_inputs(paths, preprocess):
    """The encoder's input batch for image files, through the runtime's own preprocessing."""
    import torch

    from mrad.runtime.core.preprocess import load_rgb, to_input

    return torch.from_numpy(np.stack([to_input(load_rgb(p), preprocess) for p in paths]))


def free_port() -> int:
    """A TCP port free on the loopback interface now (tests start their own servers on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(condition, seconds=20.0, pause=0.01):
    """Poll ``condition`` until it holds, at most ``seconds`` (for what gives no notice: a port opening)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True


MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class Broker:
    """mosquitto on a free loopback port; sessions persist, so a restart keeps a subscriber's subscription."""

    def __init__(self, folder):
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        # as root, mosquitto would switch to its own user, which cannot write into pytest's folders
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                               f"persistence_location {folder}/\nuser {getpass.getuser()}\n")
        self.process = None

    def start(self):
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        assert eventually(self._accepts), "mosquitto did not open its port"

    def _accepts(self):
        assert self.process.poll() is None, "mosquitto exited"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.process.terminate()  # SIGTERM: mosquitto saves its sessions first
        self.process.wait(timeout=10)


@pytest.fixture
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("the mosquitto broker is not installed (apt-get install mosquitto; .ci/run does it as root)")
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    if broker.process.poll() is None:
        broker.stop()
