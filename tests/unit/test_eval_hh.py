"""``flywheel eval-hh`` on a tiny HH-style data directory and a tiny backbone: the held-out report (interval,
ECE, subsets, length ratio, seconds) and ``--eval-file``: each file is scored after training and gets its line."""

from __future__ import annotations

import gzip
import json
import os
import random
import re

import pytest

from tests.tiny import WORDS, tiny_encoder_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _hh_dir(root, n=40):
    rng = random.Random(0)
    root.mkdir()
    for subset in ("helpful-base", "harmless-base"):
        with gzip.open(root / f"{subset}-test.jsonl.gz", "wt") as f:
            for i in range(n):
                prompt = f"\n\nHuman: {' '.join(rng.choice(WORDS) for _ in range(4))} {i}"
                tail = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 6)))
                f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: yes {tail}",
                                    "rejected": f"{prompt}\n\nAssistant: no {tail}"}) + "\n")
    return root


def test_eval_hh_scores_each_eval_file_after_training_and_prints_its_line(tmp_path, capsys):
    from flywheel.app import cli

    data = _hh_dir(tmp_path / "hh")
    pairs = [{"prompt": "\n\nHuman: what is the capital of france", "chosen": "paris is the capital",
              "rejected": "no thanks"}, {"prompt": "hello world", "chosen": "yes hello", "rejected": "no world"},
             {"prompt": "how is paris", "chosen": "yes the capital", "rejected": "no"}]
    mine, flipped = tmp_path / "mine.jsonl", tmp_path / "flipped.jsonl"
    mine.write_text("\n".join(json.dumps(p) for p in pairs) + "\n\n")
    flipped.write_text("\n".join(json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]}) for p in pairs))
    os.environ["FLYWHEEL_HOME"] = str(tmp_path / "home")
    try:
        assert cli.main(["eval-hh", "--recipe", "reward-minilm-hh.yaml", "--data", str(data),
                         "--set", f"backbone={tiny_encoder_dir(tmp_path / 'bb')}", "--set", "max_length=32",
                         "--set", "epochs=1", "--set", "threads=1",
                         "--eval-file", str(mine), "--eval-file", str(flipped)]) == 0
    finally:
        del os.environ["FLYWHEEL_HOME"]
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["train_pairs"] + report["heldout_pairs"] == 80
    assert report["ci_low"] <= report["accuracy"] <= report["ci_high"] and 0 <= report["ece"] <= 1
    assert set(report["subsets"]) == {"helpful-base", "harmless-base"}
    assert sum(m["pairs"] for m in report["subsets"].values()) == report["heldout_pairs"]
    assert sum(m["pairs"] for m in report["by_length_ratio"].values()) == report["heldout_pairs"]
    assert report["seconds"]["train"] > 0
    files = report["eval_files"]
    assert files[str(mine)]["pairs"] == 3
    # the same pairs, sides swapped: the model's accuracy on one is exactly the complement of the other
    assert files[str(mine)]["accuracy"] + files[str(flipped)]["accuracy"] == pytest.approx(1.0)
    lines = out[out.rindex("}") + 1:].strip().splitlines()
    assert re.fullmatch(r"HH-RLHF held-out: accuracy \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] on \d+ pairs", lines[0])
    assert re.fullmatch(rf"{re.escape(str(mine))}: accuracy \d\.\d{{3}} \[\d\.\d{{3}}, \d\.\d{{3}}\] on 3 pairs", lines[1])
    assert lines[2].startswith(f"{flipped}: accuracy ")


def test_a_bad_eval_file_fails_before_training_naming_its_line(tmp_path):
    from training.reward.hh import load_eval_file

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        load_eval_file(bad)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        load_eval_file(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        load_eval_file(bad)
