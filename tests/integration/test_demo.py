"""The README's main job on the test broker: every event lands, also when it is run a second time."""

from __future__ import annotations

import pytest

from flywheel.app.feedback_demo import run_feedback_demo as run_demo

pytestmark = pytest.mark.integration


def test_demo_lands_everything_and_a_rerun_with_the_same_seed_is_still_complete(settings, capsys):
    first = run_demo(settings, events=300, chats=0, load_policy=False, seed=4)
    assert first["complete"], capsys.readouterr().out
    assert sum(first["lake"].values()) == 300
    again = run_demo(settings, events=300, chats=0, load_policy=False, seed=4)
    assert again["complete"], "the same event_ids again: already in the lake, so complete"
    assert again["lake"] == first["lake"], "a rerun must not duplicate rows"
