"""The arena's votes and its leaderboard (sample_gradio.py's 竞技场 tab): each vote a JSON line
appended to a file, and the Elo ratings computed from them in vote order.

    from arena import VoteBook, leaderboard
    book = VoteBook("out-arena/votes.jsonl")
    book.add({"model_a": "out-sft", "model_b": "out-cpu-sft", "vote": "a", ...})
    votes, report = book.read()                  # report: the lines skipped, with file:line and why
    rows = leaderboard(votes)                    # [model, Elo, games, wins, losses, ties, win rate]
"""
import json
import os
import threading
from pathlib import Path

from data.records import Report, read_records

VOTES = {"a": "A 更好", "b": "B 更好", "tie": "平局", "both_bad": "都不好"}
ELO_K, ELO_START = 32, 1000


class VoteBook:
    """Arena votes, one JSON object a line, appended (a whole line per write) under a lock."""

    def __init__(self, path):
        self.path, self.lock = Path(path), threading.Lock()

    def add(self, record: dict) -> None:
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as f:  # appends go to the end wherever the file position is
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a line cut short by a crash stays a line of its own
                        f.write(b"\n")
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> tuple[list, Report]:
        """(good votes, report of the skipped lines: file:line and why, printed to stderr)."""
        report, votes = Report(), []
        if self.path.exists():
            for where, obj in read_records(self.path, report):
                names_ok = all(isinstance(obj.get(k), str) and obj[k] for k in ("model_a", "model_b"))
                if names_ok and obj.get("vote") in VOTES:
                    votes.append(obj)
                else:
                    report.add("bad_vote", where, "expected model_a, model_b and vote "
                               f"(one of {', '.join(VOTES)}); skipped")
        return votes, report


def leaderboard(votes: list) -> list:
    """Rows [model, Elo, games, wins, losses, ties, win rate] by Elo (online updates in vote order,
    K=32, start 1000; a tie and "both bad" score half a win each), best first."""
    elo, rec = {}, {}
    for v in votes:
        a, b = v["model_a"], v["model_b"]
        score_a = {"a": 1.0, "b": 0.0}.get(v["vote"], 0.5)
        ra, rb = elo.setdefault(a, ELO_START), elo.setdefault(b, ELO_START)
        expect_a = 1 / (1 + 10 ** ((rb - ra) / 400))
        elo[a], elo[b] = ra + ELO_K * (score_a - expect_a), rb - ELO_K * (score_a - expect_a)
        for m, s in ((a, score_a), (b, 1 - score_a)):
            r = rec.setdefault(m, [0, 0, 0])
            r[0 if s == 1 else 1 if s == 0 else 2] += 1
    rows = [[m, round(elo[m]), sum(r), *r, f"{r[0] / sum(r):.0%}"] for m, r in rec.items()]
    return sorted(rows, key=lambda row: -row[1])
