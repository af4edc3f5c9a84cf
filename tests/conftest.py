"""Shared fixtures, and the two test tiers.

The tiers (``bash scripts/test.sh`` runs the fast one, ``bash scripts/test.sh --all`` both):

- fast (the default, ``-m 'not gpu and not slow'``): every module of taylorseer/ and every app is touched
  (tests/test_tiers.py checks it): exactness, schedules, errors, one short sampling per app; a few minutes on
  2 cores.
- full (``-m 'not gpu'``): the fast tier plus the tests marked ``slow``: real Slurm, the sweeps, every README
  command, multi-process runs killed and resumed, training, the quality checks on the bundled digits models.

Which test is in the full tier is decided HERE, in ``FULL_TIER`` (node ids with why and how long), not by
decorators in the test files: the tier is a decision about the whole suite (what a newcomer waits for), so it is
reviewed in one place, and moving a test between tiers does not touch files other engineers are editing. A
``@pytest.mark.slow`` in a file still works too.
"""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads slow
    every test: modules using this run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_cases():
    """``get(family)``: the family's smoke-size random transformer and inputs (batch 2), built once per module."""
    from taylorseer.attach import families

    made = {}

    def get(name):
        if name not in made:
            made[name] = families.bench_case(name, "smoke", batch=2)
        return made[name]

    return get


# ---- the tiers -------------------------------------------------------------------------------------------------
# node id (a file, a test, or all parametrizations of a test) -> why it is in the full tier only
FULL_TIER = {
    # every README command, end to end
    "tests/test_readme.py::test_every_readme_command_runs_on_the_tiny_models":
        "runs every README command in a fresh process (~7 min)",
    # real Slurm: a private one-node cluster (skips where Slurm is not installed or not root; CI installs it)
    "tests/test_slurm.py::test_srun_step_of_two_tasks_forms_a_gloo_group": "real Slurm",
    "tests/test_slurm.py::test_sweep_2x2_completes": "real Slurm",
    "tests/test_slurm.py::test_preempted_job_resumes_without_lost_or_duplicated_items": "real Slurm",
    "tests/test_slurm.py::test_failed_job_surfaces_its_traceback_and_log": "real Slurm",
    "tests/test_slurm.py::test_two_tasks_of_one_job_are_two_gloo_ranks": "real Slurm",
    "tests/test_slurm.py::test_job_killed_without_result_fails_the_wait_instead_of_hanging": "real Slurm",
    "tests/test_slurm.py::test_cluster_stops_cleanly": "real Slurm (a second cluster)",
    "tests/test_slurm.py::test_sweep_over_degrees_is_one_job_array_per_resources": "real Slurm, 2 jobs (20 s)",
    "tests/test_slurm.py::test_context_parallel_job_is_one_generation_on_k_ranks": "real Slurm, FLUX on 2 ranks + "
                                                                                     "1 process (55 s)",
    "tests/test_slurm_tables.py": "the digits table and a preempted sampling job on real Slurm",
    # sweeps
    "tests/test_sweep.py::test_digits_table_killed_half_way_resumes_and_reports_the_run_folders":
        "the digits table sweep (9 runs), killed, resumed and rerun",
    "tests/test_distributed_launch.py::test_sweep_in_process_under_the_launcher": "a Hydra sweep on 2 torchrun ranks",
    "tests/test_distributed_launch.py::test_local_launcher_runs_each_job_on_its_tasks_and_reports_failures":
        "a sweep through submitit's local launcher, 2 ranks per job",
    # several processes started, killed and resumed (the fast tier keeps one 2-rank torchrun group:
    # tests/test_distributed.py::test_two_gloo_ranks_under_torchrun)
    "tests/test_data_parallel.py": "FLUX and HunyuanVideo on 1 and 2 torchrun ranks, killed and resumed",
    "tests/test_dit.py::test_sample_ddp_two_processes_and_resume": "sample_ddp on 2 torchrun ranks, then resumed",
    "tests/test_distributed_launch.py::test_settings_error_is_one_line_from_rank_0_with_its_status":
        "2 torchrun ranks (the report's parsing stays fast: test_describe_failure_*)",
    "tests/test_distributed_launch.py::test_crash_names_the_rank_that_raised_and_its_traceback_log":
        "2 torchrun ranks",
    "tests/test_distributed_launch.py::test_success_prints_no_report_and_keeps_explicit_options": "2 torchrun ranks",
    "tests/test_distributed.py::test_two_gloo_ranks_from_slurm_variables": "2 processes",
    "tests/test_distributed.py::test_missing_rank_fails_within_the_timeout": "waits out a rendezvous timeout",
    "tests/test_distributed.py::test_late_rank_fails_the_barrier_naming_it": "2 ranks, one sleeping",
    "tests/test_distributed.py::test_barrier_waits_longer_than_the_group_timeout": "2 ranks, one sleeping",
    # quality on the bundled, really trained digits models (the fast tier samples them: test_digits_flux.py,
    # test_schedule_policies.py::test_dit_app_reports_what_the_schedule_really_did)
    "tests/test_digits_quality.py": "TaylorSeer vs FORA on the digits DiT, 100 samples x 50 steps per setting",
    "tests/test_digits_flux.py::test_uncached_samples_are_the_digits_their_prompts_name": "digits FLUX quality",
    "tests/test_digits_flux.py::test_paper_flux_defaults_on_the_learned_trajectory": "digits FLUX quality",
    "tests/test_store_models.py::test_digits_fidelity_of_8bit_factors": "8-bit factors' PSNR on 100 digits samples",
    # training (the digits DiT's resume stays fast: tests/test_calibrate_and_train.py)
    "tests/test_digits_flux.py::test_training_resumes_after_a_kill_to_the_same_weights": "trains the digits FLUX 3x",
    # a fresh Python process through a script (the same code runs in-process in the fast tier)
    "tests/test_flux.py::test_sample_script_reports_one_line_error":
        "scripts/sample_flux.sh in a fresh process (in-process: test_sample_app_clear_errors_write_nothing)",
    "tests/test_benchmark.py::test_gpu_script_dry_run_covers_every_code_path":
        "scripts/bench_gpu.sh --dry-run in a fresh process, compiling every variant with inductor",
    "tests/test_fused.py::test_triton_kernel_in_the_interpreter":
        "the Triton kernel in Triton's CPU interpreter, a fresh process (the inductor kernel stays fast)",
    "tests/test_discover.py::test_script_runs_an_unknown_class_static_only":
        "python -m taylorseer.attach.discover in a fresh process (in-process: test_cli_on_a_folder_...)",
    "tests/test_autobuild.py::test_every_class_autobuild_serves_runs_cached_or_says_why":
        "all 65 diffusers transformer classes built and run (~1 min; ten run in the fast tier)",
    "tests/test_autobuild.py::test_discover_command_traces_a_class_it_builds_itself":
        "python -m taylorseer.attach.discover in a fresh process",
}

# Tests that start process groups (torchrun, several ranks on ports), a Slurm cluster, or time themselves: with
# pytest-xdist they run one at a time on one worker (xdist_group; the session's Slurm cluster is then started once).
# Tests with the ``slurm`` marker join the group without being listed.
SERIAL = [
    "tests/test_distributed.py::test_two_gloo_ranks_under_torchrun",
    "tests/test_distributed.py::test_two_gloo_ranks_from_slurm_variables",
    "tests/test_distributed.py::test_missing_rank_fails_within_the_timeout",
    "tests/test_distributed.py::test_late_rank_fails_the_barrier_naming_it",
    "tests/test_distributed.py::test_barrier_waits_longer_than_the_group_timeout",
    "tests/test_distributed_launch.py",
    "tests/test_data_parallel.py",
    "tests/test_dit.py::test_sample_ddp_two_processes_and_resume",
    "tests/test_sweep.py::test_digits_table_killed_half_way_resumes_and_reports_the_run_folders",
]
SERIAL_GROUP = "serial"

# The longest tests outside the serial group, started first.
FIRST = ["tests/test_readme.py"]


def listed(nodeid: str, entries) -> str | None:
    """The entry of ``entries`` that names ``nodeid`` (itself, its file or class, or all its parametrizations)."""
    for entry in entries:
        if nodeid == entry or nodeid.startswith((entry + "::", entry + "[")):
            return entry
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on a private local Slurm cluster (skips without Slurm)")
    if not config.pluginmanager.hasplugin("xdist"):  # which registers it itself
        config.addinivalue_line("markers", "xdist_group(name): pytest-xdist runs the tests of a group on one worker")
    # `pytest -n 2` (xdist's default distribution, "load") would split the SERIAL group over the workers (two Slurm
    # clusters at once): group-aware distribution keeps it together and is otherwise the same.
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # before `-m` deselects and xdist reads the groups: the tier and the group of every test
    for item in items:
        if listed(item.nodeid, FULL_TIER):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slurm") or listed(item.nodeid, SERIAL):
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUP))
    result = yield
    # after pytest's own ordering: the serial group first, then the long tests, so that no worker starts a long
    # one when the others are about to finish (whole files keep their order: module fixtures are built once)
    items.sort(key=lambda item: 0 if item.get_closest_marker("xdist_group") else 1 if listed(item.nodeid, FIRST)
               else 2)
    return result


# ---- a real one-node Slurm for the Slurm tests (tests/slurm_cluster.py) ---------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node cluster on localhost, started once per test session and stopped afterwards.

    Skips, saying how to enable it, where Slurm is not installed or we are not root; with
    TAYLORSEER_REQUIRE_SLURM=1 (set by .ci/run) that is a failure instead. A cluster that does not come
    up within its timeout fails with its daemons' logs.
    """
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from slurm_cluster import REQUIRE_ENV, SlurmCluster, why_unavailable

    reason = why_unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster().start(timeout=90)
    print(f"\n[slurm] local cluster up: {cluster.describe()}")
    yield cluster
    cluster.stop(timeout=60, remove=True)
    print(f"\n[slurm] local cluster stopped: {cluster.describe()}")
