import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """The real digits data set built once into shards for the whole test session."""
    from igdit.data import build_dataset

    root = tmp_path_factory.mktemp("data") / "digits"
    build_dataset("digits", root, progress=False)
    return root
