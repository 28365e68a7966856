import os
import random
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Variables that point MLflow or Optuna somewhere (a tracking server, a store, credentials, retries): a user's shell
# may export them, and a test must never reach what they name nor depend on them.
OUTSIDE_VARIABLES = ("MLFLOW_", "OPTUNA_")


@pytest.fixture(autouse=True)
def no_tracking_environment(monkeypatch):
    """Every test starts without the user's MLFLOW_* / OPTUNA_* variables (MLFLOW_TRACKING_URI above all)."""
    for name in [n for n in os.environ if n.startswith(OUTSIDE_VARIABLES)]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def seeded_random_state(request):
    """Every test draws from the same seeded torch, numpy and random states, whatever ran before it and in whatever
    order the tests run (the seed comes from the test's own name, so tests stay independent of each other)."""
    import numpy as np
    import torch

    seed = zlib.crc32(request.node.nodeid.split("::", 1)[-1].encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def own_working_directory(tmp_path_factory, monkeypatch):
    """Every test runs in a folder of its own, never in the checkout: a user runs `make train` before `make test`,
    and no test may read or write their runs/, mlflow.db, mlartifacts/, optuna.db or built data (every relative
    default -- runs/, sqlite:///mlflow.db, sqlite:///optuna.db, data/digits -- now points into the empty folder)."""
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The real digits data set built once into shards for the whole test session."""
    from igdit.data import build_dataset

    root = tmp_path_factory.mktemp("data") / "digits"
    build_dataset("digits", root, progress=False)
    return root


# A tiny randomly initialised diffusers AutoencoderKL: the real class and loading path, no download.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=16)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """Folder of a tiny random AutoencoderKL (downsampling 2, 4 latent channels) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vae")
    AutoencoderKL(**TINY_VAE).save_pretrained(folder)
    return folder


def write_image_folder(root, sizes=((40, 24), (24, 40), (32, 32), (64, 48), (20, 20)), classes=("cat", "dog", "owl")):
    """Class sub-folders of smooth synthetic RGB images (PNG and JPEG, several sizes). Returns the file paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.uniform(40, 215, size=3)
            arr = np.stack([base[k] + 30 * np.sin(xx / (3 + k + c) + yy / (5 + i)) for k in range(3)], -1)
            path = root / name / (f"img{i}.png" if i % 2 else f"img{i}.JPEG")
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=95)
            paths.append(path)
    return paths


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    return root
