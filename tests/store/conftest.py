import pytest

from tests.store.seaweed import seaweedfs


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
