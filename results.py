"""The two files of an evaluation, as eval.py writes them and judge.py adds its scores to, read
back with one clear sentence for a file that is not what these scripts write:
  test-responses.json  a JSON array of the test entries, each with its model_response (null for one
                       not made yet) and, once judged, judge_scores {MODEL: 0 to 100 or null} and
                       judge_replies {MODEL: a reply that held no score}
  eval.json            one JSON object: the evaluation, its losses and scores, and a "judge" summary
                       per judge model
"""
import json
import os

from data import load_instruction_data, read_text

RESPONSES, SUMMARY = "test-responses.json", "eval.json"  # their names in the output folder


def load_responses(path, unfinished=False):
    """The records of a responses file as eval.py writes it: a JSON array of entries, each with
    a model_response (null for one not made yet, with unfinished=True) and perhaps its judges'
    judge_scores and judge_replies. ValueError naming the entry that is not."""
    check_responses_path(path)
    records = load_instruction_data(path)
    for i, record in enumerate(records):
        response = record.get("model_response")
        if response is None and unfinished and "model_response" in record:
            continue
        if response is None and "model_response" in record:
            raise ValueError(f"{path}: entry {i} has no response yet (eval.py was stopped before making it); "
                             "run the same eval.py command again to finish the file")
        if not isinstance(response, str):
            raise ValueError(f"{path}: entry {i} has no 'model_response' string; is it a file eval.py wrote?")
        for key, ok, kind in (("judge_scores", lambda v: v is None or type(v) is int and 0 <= v <= 100,
                               "an integer from 0 to 100 or null"),
                              ("judge_replies", lambda v: isinstance(v, str), "a string")):
            judged = record.get(key, {})
            if not isinstance(judged, dict) or not all(ok(v) for v in judged.values()):
                raise ValueError(f"{path}: entry {i}: {key!r} must map each judge model to {kind}, got {judged!r}")
    return records


def check_responses_path(path):
    """One sentence, before reading, for a path that is no responses file: missing, a folder,
    eval.json (the summary beside it) or not .json."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    beside = os.path.join(folder, RESPONSES)
    hint = f"; did you mean {beside}?" if os.path.isfile(beside) and beside != path else ""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder, not a responses file{hint}")
    if os.path.basename(path) == SUMMARY:
        raise ValueError(f"{path} is eval.py's summary, not its responses; give the responses file "
                         f"{beside} (eval.py writes both in its --out folder)")
    if not path.endswith(".json"):
        raise ValueError(f"{path}: expected a .json responses file as eval.py writes ({RESPONSES})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such responses file (eval.py writes {RESPONSES} in its --out "
                                f"folder){hint}")


def read_summary(path):
    """The eval.json at path ({} if there is none); ValueError if it is not a JSON object."""
    if not os.path.exists(path):
        return {}
    try:
        report = json.loads(read_text(path))
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise ValueError(f"{path} is not a JSON object as eval.py writes; move it away: eval.py and judge.py write "
                         "their summaries there")
    return report
