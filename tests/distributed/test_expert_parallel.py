"""Expert parallelism on 2 CPU processes (gloo), spawned once per test session (start-up is costly).

Each test checks that its section of the run passed on both ranks (see ep_worker.py). Under
pytest-xdist the workers share the run through a lock file (``--dist loadgroup`` does not keep these
tests on one worker with this pytest), so the two processes start once per session.
"""

import fcntl
import json
import os
import random
from pathlib import Path

import pytest
from ep_launch import launch

pytestmark = pytest.mark.distributed


def _launch(tmp: Path) -> dict:
    rng = random.Random(0)
    words = ["def", "class", "return", "self", "import", "for", "while", "if", "else", "try", "with",
             "lambda", "yield", "pass", "None", "True", "print", "range", "len"]
    text = "\n".join("    ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + f"  # {i}"
                     for i in range(1500))
    (tmp / "data.txt").write_text(text)
    try:
        outs = launch("ep_worker.py", str(tmp), str(tmp / "data.txt"), nprocs=2, timeout=300)
    except AssertionError as err:  # every test then fails with the ranks' output
        return {"error": str(err), "tmp": str(tmp)}
    return {"outs": outs, "tmp": str(tmp)}


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # one pytest process
        return _launch(tmp_path_factory.mktemp("ep"))
    shared = tmp_path_factory.getbasetemp().parent / f"moekit-ep-{run_id}"  # same dir for all workers
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker launches, the others wait and read
        result = shared / "result.json"
        if not result.exists():
            (shared / "run").mkdir(exist_ok=True)
            result.write_text(json.dumps(_launch(shared / "run")))
        return json.loads(result.read_text())


def passed(run, section, ranks=(0, 1)):
    assert "error" not in run, run.get("error")
    for r in ranks:
        assert f"PASS {section} " in run["outs"][r], f"rank {r} did not pass {section}:\n{run['outs'][r]}"


def test_all_to_all_forward_backward_is_the_reverse_exchange(run):
    passed(run, "exchange")


def test_differentiable_all_reduce_and_uneven_all_gather(run):
    passed(run, "all_reduce_gather")


def test_groups_config_mismatch_and_bad_ep_size_raise(run):
    passed(run, "groups")


def test_collective_without_peer_times_out(run):
    passed(run, "timeout")


@pytest.mark.parametrize("case", range(4))
def test_ep_layer_forward_backward_equal_single_process_float64(run, case):
    passed(run, f"layer_{case}")


def test_ep_inside_data_parallel_matches_single_process(run):
    passed(run, "layer_dp")


def test_num_experts_not_divisible_by_ep_size_raises(run):
    passed(run, "layer_errors")


def test_rank_whose_experts_get_no_rows_still_joins_the_backward_exchange(run):
    passed(run, "empty_experts")


def test_rank_without_tokens_joins_the_exchange(run):
    passed(run, "zero_tokens")


def test_router_state_under_plain_data_parallelism_and_ddp(run):
    passed(run, "data_parallel_router_state")


def test_expert_choice_routes_within_each_rank(run):
    passed(run, "expert_choice")


def test_sharded_checkpoint_round_trip_2_1_2(run):
    passed(run, "checkpoint")
    for name in ("two", "one"):
        assert (Path(run["tmp"]) / name / "sharding.json").is_file()
    assert sorted(p.name for p in (Path(run["tmp"]) / "two").glob("model-experts-*")) == [
        "model-experts-00000-of-00002.safetensors", "model-experts-00001-of-00002.safetensors"]


def test_lm_training_under_ep_matches_single_process(run):
    passed(run, "train")


def test_resume_changes_the_number_of_expert_shards(run):
    passed(run, "resume")


def test_ep_run_holds_the_run_lock_and_checks_the_ep_size_first(run):
    passed(run, "train_errors")


def test_each_rank_draws_its_own_routing_noise_and_resumes_it_exactly(run):
    passed(run, "noise")


def test_dead_peer_fails_fast(run):
    passed(run, "dead_peer", ranks=(0,))
