import os
from pathlib import Path

import pytest

# Never touch the Hugging Face hub from a test: set before anything imports huggingface_hub or datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# pytest-xdist runs the suite in one worker per core (pyproject's addopts; `pytest -n 0` runs it in one process):
# each worker, and the subprocesses it starts, gets its share of the cores, or every worker's torch would take them
# all and the threads contend. On 2 cores it cuts the suite's time by ~40%: much of it is subprocesses starting up.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))

# Test-only fault injection reaches the subprocesses that tests start through a `sitecustomize` module on
# PYTHONPATH (see fault_injection/sitecustomize.py); production code carries no hook. The crash tests name its
# variable as `checkpoint.KILL_IN_SAVE_ENV`, where the hook used to live, so that name is provided here.
_FAULTS = Path(__file__).resolve().parent / "fault_injection"
os.environ["PYTHONPATH"] = os.pathsep.join([str(_FAULTS), *filter(None, [os.environ.get("PYTHONPATH")])])


def _name_the_fault_variable() -> None:
    from fault_injection.sitecustomize import KILL_IN_SAVE_ENV

    from gpt_tinystories import checkpoint

    checkpoint.KILL_IN_SAVE_ENV = KILL_IN_SAVE_ENV


_name_the_fault_variable()


def pytest_xdist_auto_num_workers(config) -> int:
    """The cores this process may use (psutil, where installed, would count physical cores: 1 on a 2-vCPU VM), at
    most 8: the suite has ~35 files, and each worker holds its own torch."""
    return int(os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", 0)) or min(8, _CORES)


SAMPLE_DIR = Path(
    os.environ.get("TINYSTORIES_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared/data/tinystories")
)
SAMPLE_FILES = ["train-head.txt", "validation-first1000.txt", "v2-gpt4-train-head.txt", "fixture-5-stories.txt"]


def sample(name: str) -> Path:
    path = SAMPLE_DIR / name
    if not path.is_file():
        pytest.fail(
            f"TinyStories sample {path} is missing: tests read ../shared/data/tinystories beside the repo "
            "(or set TINYSTORIES_SAMPLE_DIR)"
        )
    return path


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Prepared data goes to a temporary cache, never to ~/.cache or beside the (read-only) sample. Set for the
    # whole session: module-scoped fixtures are set up before any function-scoped one could set it.
    previous = os.environ.get("GPT_TINYSTORIES_CACHE")
    os.environ["GPT_TINYSTORIES_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if previous is None:
        del os.environ["GPT_TINYSTORIES_CACHE"]
    else:
        os.environ["GPT_TINYSTORIES_CACHE"] = previous


@pytest.fixture(scope="session")
def gpt2():
    from gpt_tinystories.tokenizer import Tokenizer

    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def bpe():
    """A 4096-token BPE trained on the train head, as a CPU quick start would."""
    from gpt_tinystories.data import iter_stories
    from gpt_tinystories.tokenizer import Tokenizer

    return Tokenizer.train(iter_stories(sample("train-head.txt")), 4096)


# The served model of the server tests (test_serve.py, test_serve_openai.py): a tiny checkpoint, loaded once per
# module, and a real server on loopback with the module's own `LIMITS`.
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, bpe, request):
    from playground import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.module.__name__) / "tiny", bpe)


@pytest.fixture(scope="module")
def teller(checkpoint_dir):
    from gpt_tinystories import load

    return load(checkpoint_dir)


@pytest.fixture(scope="module")
def url(teller, request):
    from gpt_tinystories import serve

    with serve.running(serve.create_app(teller, request.module.LIMITS)) as address:
        yield address
