"""kill -9 at any point of a request, then the same command again: the output is the uninterrupted run's and
the log holds the request once (issue 24, item 4). Every named crash point on every request that has a
predecessor, and random-moment kills; benchmarks/request_kill_injection.py runs hundreds."""
import random
import warnings

import pytest

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from request_kills import NAMED_POINTS, REQUESTS, kill_trial, make_scenario  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return make_scenario(str(tmp_path_factory.mktemp("kills")))


@pytest.mark.parametrize("point", NAMED_POINTS)
def test_a_kill_at_a_named_point_then_a_rerun_gives_the_uninterrupted_result(point, scenario, tmp_path):
    for index in (0, 2):  # the first request (the log's genesis only) and one after two others
        result = kill_trial(scenario, str(tmp_path), index, point)
        assert result["logged_before_rerun"] == (point == "request-after-log")


def test_kills_at_random_moments_then_a_rerun_give_the_uninterrupted_result(scenario, tmp_path, seed):
    rng = random.Random(seed)
    outcomes = [kill_trial(scenario, str(tmp_path), rng.randrange(len(REQUESTS)), rng=rng) for _ in range(16)]
    assert sum(o["killed"] for o in outcomes) >= 8  # most kills land while the child runs
