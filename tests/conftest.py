import os
from pathlib import Path

import pytest

# Tests never touch the user's cache: the testbed is built once per session in a temporary folder,
# unless REASONDISTILL_TEST_CACHE names a folder to reuse between sessions (faster local iteration).
os.environ["REASONDISTILL_CACHE"] = os.environ.get("REASONDISTILL_TEST_CACHE") or str(
    Path(os.environ.get("TMPDIR", "/tmp")) / f"reasondistill-test-cache-{os.getpid()}"
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def testbed() -> Path:
    """The built testbed (tokenizer, student initialisation, trained teacher)."""
    from reasondistill.testbed.models import build_testbed

    return build_testbed()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The testbed tokenizer alone (seconds), for tests that do not need the trained teacher."""
    from reasondistill.testbed.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path
