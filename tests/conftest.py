"""Shared pytest set-up: import the scripts from the repo root, and use the offline
tokenizer files in ../shared/tiktoken when they are there (no network on CI)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_shared_tiktoken = os.path.join(ROOT, "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_tiktoken):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_tiktoken)


def pytest_runtest_logreport(report):
    """With $PYTEST_SKIPPED_LIST naming a file, the id of every test skipped here goes into it, one
    a line: .ci/run runs exactly those again once the optional packages are installed."""
    if report.skipped and os.environ.get("PYTEST_SKIPPED_LIST"):
        with open(os.environ["PYTEST_SKIPPED_LIST"], "a") as f:
            f.write(report.nodeid + "\n")
