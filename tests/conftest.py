"""Shared pytest set-up: import the scripts from the repo root, and use the offline
tokenizer files in ../shared/tiktoken when they are there (no network on CI)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_shared_tiktoken = os.path.join(ROOT, "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_tiktoken):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_tiktoken)
