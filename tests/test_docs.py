"""README.md and docs/ held to the code: every link points to a file (and heading) that exists,
every page is linked, every flag a command passes to a script is one its --help lists, every
flag a script has is named somewhere, and the README's set-up commands are those .ci/run runs."""
import functools
import glob
import os
import re
import subprocess
import sys

import pytest
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def name(path):
    return os.path.relpath(path, ROOT)


def code_blocks(text, lang=None):
    """The contents of the ``` blocks of a markdown text (of one language, if given)."""
    return [body for info, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
            if lang is None or info == lang]


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def commands(text):
    """Each shell line of the text's bash blocks (continuations joined) and each inline code span."""
    lines = []
    for block in code_blocks(text, "bash"):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def script_flags(command):
    """[(script, flags)] of a command line: the --flags after each `X.py` that is a runnable file
    of the repo, up to a comment or the end of that command."""
    found = []
    command = re.split(r"\s#", command)[0]
    for part in re.split(r"&&|\||;|>", command):
        words = part.split()
        for i, word in enumerate(words):
            if word.endswith(".py") and word in runnable():
                if i + 1 < len(words) and f"{word} {words[i + 1]}" in all_help():  # a subcommand: its own flags
                    word = f"{word} {words[i + 1]}"
                found.append((word, [w.split("=")[0] for w in words[i + 1:] if FLAG.fullmatch(w.split("=")[0])]))
                break
    return found


@functools.lru_cache(maxsize=None)
def runnable():
    """The repo's files that have a command line: top-level .py files and tests/bench.py with a __main__."""
    files = glob.glob(os.path.join(ROOT, "*.py")) + [os.path.join(ROOT, "tests", "bench.py")]
    return {name(f) for f in files if '__name__ == "__main__"' in read(f)}


def run_help(commands):
    """{command: its --help text}, the commands run side by side: each imports torch."""
    env = {**os.environ, "COLUMNS": "200"}
    procs = {command: scripts.Popen([sys.executable, *command.split(), "--help"], cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in commands}
    texts = {}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"python {command} --help failed: {err[-500:]}"
        texts[command] = out
    return texts


@functools.lru_cache(maxsize=None)
def all_help():
    """{script, or "script subcommand": the flags its --help lists (its option lines: two spaces,
    then the flags)}; a script with subcommands (listed four spaces in) has an entry for each."""
    texts = run_help(sorted(runnable()))
    texts.update(run_help([f"{script} {sub}" for script, out in texts.items()
                           for sub in re.findall(r"^    ([a-z][\w-]*) {2,}\S", out, re.MULTILINE)]))
    return {command: set(FLAG.findall(" ".join(re.findall(r"^  (-\S.*?)(?: {2,}|$)", out, re.MULTILINE))))
            for command, out in texts.items()}


def help_flags(script):
    return all_help()[script]


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_links_point_to_files_and_headings_that_exist(page):
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(path), f"{name(page)} links to {target}, which does not exist"
        if anchor:
            assert path.endswith(".md") and anchor in anchors(path), \
                f"{name(page)} links to {target}: {name(path)} has no heading with that anchor"


def test_every_page_is_linked_from_the_readme_and_the_index():
    pages = {os.path.basename(p) for p in PAGES[1:]} - {"README.md"}
    readme = {os.path.basename(t.partition("#")[0]) for t in LINK.findall(read(PAGES[0])) if t.startswith("docs/")}
    index = {t.partition("#")[0] for t in LINK.findall(read(os.path.join(ROOT, "docs", "README.md")))}
    assert pages <= readme, f"README.md does not link to {sorted(pages - readme)}"
    assert pages <= index, f"docs/README.md does not list {sorted(pages - index)}"


def test_readme_set_up_commands_are_those_ci_runs():
    readme = read(os.path.join(ROOT, "README.md"))
    set_up = code_blocks(readme.split("## Set up", 1)[1], "bash")[0]
    ci = {line.replace(" -q", "").strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines()}
    wanted = [line.split("#")[0].strip() for line in set_up.splitlines() if line.split("#")[0].strip()]
    assert wanted == ["pip install -r requirements.txt", "python -m pytest"]
    assert all(line in ci for line in wanted), f".ci/run must run the README's set-up commands {wanted}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_commands_pass_only_flags_the_scripts_have(page):
    wrong = [(script, flag, command) for command in commands(read(page)) for script, flags in script_flags(command)
             for flag in flags if flag not in help_flags(script)]
    assert not wrong, "\n".join(f"{name(page)}: {script} has no {flag} (in: {command})" for script, flag, command in wrong)


@pytest.mark.parametrize("script", sorted(runnable()))
def test_every_flag_is_documented(script):
    text = "\n".join(read(page) for page in PAGES)
    for command in [c for c in all_help() if c.split()[0] == script]:  # the script and its subcommands
        missing = sorted(flag for flag in help_flags(command) - {"--help"}
                         if not re.search(re.escape(flag) + r"(?![\w-])", text))
        assert not missing, f"{command}'s {', '.join(missing)} appear in neither README.md nor docs/"


def test_the_checks_find_what_is_wrong():
    """The parsing above on made-up text: a stale flag and a comment, a pipe, a continuation."""
    text = "```bash\npython train.py --lr 1e-3 --nope \\\n    --out x   # --also-not\n```\nSee `eval.py --judge`.\n"
    assert commands(text) == ["python train.py --lr 1e-3 --nope      --out x   # --also-not", "eval.py --judge"]
    assert script_flags(commands(text)[0]) == [("train.py", ["--lr", "--nope", "--out"])]
    assert script_flags("torchrun --nproc_per_node=4 train.py --batch-size=2 | tee log") == [("train.py", ["--batch-size"])]
    assert slug("Classification and multiple choice: `--choices`") == "classification-and-multiple-choice---choices"
