"""Shared fixtures: one single-rank gloo process group for the in-process tests."""

from __future__ import annotations

import os

# Triton kernels run in its interpreter on CPU; this must be set before anything (Megatron
# included) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Megatron-Core wraps a few MoE router, expert and dispatcher functions in torch.compile
# (megatron.core.jit.jit_fuser); on CPU every process that runs MoE compiles them again (2-3 s
# each: Kimi Linear, MoE layouts, torchrun ranks). torch's own switch runs the same functions
# eagerly; nothing here tests torch.compile. Read when torch._dynamo is imported: set it first.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import importlib.util  # noqa: E402
import socket
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)

if importlib.util.find_spec("triton") is not None:
    from triton_rounding import install_nearest_rounding

    install_nearest_rounding()  # the interpreter rounds fp32 -> bf16 as GPUs do


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank():
    """A world of one process with Megatron's parallel state and the CPU backend."""
    from megatron.core import parallel_state

    from attnres_megatron.compat.cpu_backend import enable_cpu_backend
    from attnres_megatron.training.distributed import initialize_parallel

    enable_cpu_backend()
    # An explicit init_method keeps launcher variables out of os.environ, where
    # subprocesses started by other tests would inherit them.
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    initialize_parallel("cpu", seed=1234)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture
def reseed(single_rank):
    """Reseed torch and Megatron's RNG tracker so each model build starts identically."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    def _reseed(seed: int = 1234) -> None:
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

    return _reseed


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def pretrain_refusal(monkeypatch):
    """``refuse(argv, env)``: the error ``attnres-pretrain``'s ``main(argv)`` exits with, run in
    this process under the launcher variables ``env`` (and no others) -- the CLI's own parsing,
    launch discovery and validation, without starting an interpreter. Getting as far as the
    process groups fails the test: bad input must be refused before any work."""
    from attnres_megatron.training import pretrain

    def no_work(*args, **kwargs):
        raise AssertionError("the arguments were accepted: attnres-pretrain went on to start the run")

    monkeypatch.setattr(pretrain, "initialize_parallel_from_args", no_work)

    def refuse(argv: list[str], env: dict | None = None) -> str:
        for name in list(os.environ):
            if name in LAUNCHER_VARS or name.startswith("SLURM_"):
                monkeypatch.delenv(name)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exited:
            pretrain.main(argv)
        code = exited.value.code
        assert code not in (0, None), "attnres-pretrain exited successfully"
        return str(code)

    return refuse


# ---------------------------------------------------------------------------- threads

# The tensors here are tiny and the cores are shared: by this process, the CLI runs,
# torchrun/mpirun workers and tools it starts, and whatever else runs on the machine. Two
# OpenMP threads per process spinning on the same two cores make tiny steps and ops ten times
# slower under load, so this process and every child process (as torchrun does for its workers)
# use one thread, unless OMP_NUM_THREADS says otherwise. The thread-count tests
# (test_cpu_fused.py, test_fast_ops.py) set their counts themselves.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------- markers

SLOW = ("slow",)
DISTRIBUTED = ("slow", "distributed")  # every multi-process test here also takes more than ~3 s
MULTI_PROCESS_QUICK = ("distributed",)  # more than one process, yet quick
GPU = ("gpu",)  # needs a CUDA device: skipped, with the reason, where there is none

# The one place that decides which tests are `slow` (more than ~3 s on a 2-core machine:
# subprocess runs of the CLI and tools, training runs, checkpoint round trips) and which are
# `distributed` (more than one process: torchrun, mpirun, process pools of 2+), and which need a
# CUDA device (`gpu`: `TRITON_INTERPRET=0 pytest -m gpu` on a GPU machine; skipped elsewhere).
# `pytest -m "not slow and not distributed"` is the quick subset. A key is a module, a test
# function (all its parameters) or one parametrised test, relative to tests/; a key naming a
# test function that does not exist fails the collection.
MARKS = {
    "test_parallel.py": DISTRIBUTED,
    "test_pipeline.py": DISTRIBUTED,
    "test_pipeline_tools.py::test_megatron_lms_parser_takes_the_planners_layout": SLOW,  # 2 subprocesses
    "test_megatron_lm_training.py": DISTRIBUTED,
    "test_megatron_lm_checkpoints.py::test_attnres_pretrain_checkpoint_resumes_in_megatron_lms_loop": SLOW,
    "test_megatron_lm_checkpoints.py::test_megatron_lm_checkpoint_resumes_in_attnres_pretrain": SLOW,
    "test_megatron_lm_checkpoints.py::test_a_megatron_lm_setting_attnres_pretrain_cannot_resume_is_refused": (
        SLOW
    ),
    "test_distributed_cli.py::test_torchrun_layouts_reproduce_single_process_losses": DISTRIBUTED,
    "test_distributed_cli.py::test_torchrun_expert_parallel_moe_dispatchers_agree": DISTRIBUTED,
    "test_distributed_cli.py::test_torchrun_interleaved_pipeline_trains_and_reports_cached_traffic": (
        DISTRIBUTED
    ),
    "test_distributed_cli.py::test_kimi_linear_tiny_trains_in_parallel": DISTRIBUTED,
    "test_distributed_cli.py::test_mpirun_four_processes_runs_tiny_pretraining": DISTRIBUTED,
    "test_distributed_cli.py::test_the_cli_refuses_bad_input_before_any_work": SLOW,
    "test_checkpoint.py::test_resume_reproduces_the_uninterrupted_losses_exactly": SLOW,
    "test_checkpoint.py::test_checkpoint_from_another_layout_gives_the_same_loss": DISTRIBUTED,
    "test_checkpoint.py::test_attn_res_warm_starts_from_a_baseline_checkpoint": SLOW,
    "test_checkpoint.py::test_bad_checkpoints_fail_before_training": SLOW,
    "test_checkpoint.py::test_sigterm_saves_a_checkpoint_and_exits_cleanly": SLOW,
    "test_checkpoint.py::test_non_finite_steps_stop_with_the_iteration_or_are_skipped": SLOW,
    "test_checkpoint_faults.py::test_a_planted_metadata_pickle_is_refused_and_never_runs": SLOW,
    "test_checkpoint_faults.py::test_a_planted_common_pickle_is_refused_by_pretrain_and_the_plot_tool": SLOW,
    "test_checkpoint_faults.py::test_a_flipped_bit_names_the_file": SLOW,  # `saved`: a CLI run
    "test_checkpoint_faults.py::test_a_save_killed_at_any_stage_leaves_a_loadable_checkpoint": SLOW,
    "test_checkpoint_faults.py::test_a_real_overwrite_killed_midway_keeps_the_previous_checkpoint": SLOW,
    "test_checkpoint_faults.py::test_a_resume_refuses_what_does_not_match_before_any_work": SLOW,
    "test_checkpoint_faults.py::test_a_fresh_run_into_a_finished_runs_directory_is_refused": SLOW,
    "test_checkpoint_faults.py::test_schedule_flags_and_batch_changes_are_reported": SLOW,
    "test_checkpoint_faults.py::test_a_finished_job_run_again_exits_0_before_any_work": SLOW,
    "test_fail_early.py::test_a_full_disk_on_the_first_save_exits_non_zero_with_the_reason": SLOW,
    "test_pretrain_cli.py::test_pretrain_20_steps_loss_decreases": SLOW,
    "test_pretrain_cli.py::test_the_cli_refuses_bad_flags_before_training": SLOW,
    "test_pretrain_cli.py::test_tensorboard_diagnostics_and_wsd_schedule": SLOW,
    "test_evaluation.py::test_losses_equal_a_plain_forward_over_megatrons_evaluation_samples": SLOW,
    "test_evaluation.py::test_evaluation_in_parallel_layouts_matches_the_single_process": DISTRIBUTED,
    "test_evaluation.py::test_evaluation_leaves_the_training_losses_unchanged": SLOW,
    "test_evaluation.py::test_tensorboard_holds_megatron_lms_tags": SLOW,  # `trained`: a CLI run
    "test_evaluation.py::test_log_lines_carry_megatron_lms_fields": SLOW,
    "test_megatron_flags.py::test_train_iters_5_with_every_other_default_trains": SLOW,
    "test_megatron_lm.py::test_every_pipeline_chunk_matches_attnres_pretrain": DISTRIBUTED,
    "test_megatron_lm.py::test_driver_names_the_missing_megatron_lm_checkout": SLOW,
    "test_megatron_lm.py::test_patch_applies_to_the_real_pretrain_gpt_and_reverts": SLOW,
    "test_megatron_lm.py::test_own_mapping_agrees_with_megatron_lms": SLOW,
    "test_profile.py::test_report_validates_and_mutated_reports_fail": SLOW,  # cpu_run: a profiler run
    "test_profile.py::test_cpu_run_writes_markdown_and_plots": SLOW,
    "test_profile.py::test_step_split_adds_up_and_tokens_per_second": SLOW,
    "test_profile.py::test_ratios_are_ratios_of_reported_numbers": SLOW,
    "test_profile.py::test_memory_accounting_on_cpu": SLOW,
    "test_profile.py::test_aggregation_hooks_count_every_mix": SLOW,
    "test_profile.py::test_pipeline_bytes_equal_the_sources_the_next_stage_needs": DISTRIBUTED,  # pp_report
    "test_profile.py::test_pipeline_stages_are_reported_per_rank": DISTRIBUTED,
    "test_profile.py::test_fp8_cli_refuses_without_transformer_engine": SLOW,
    "test_profile.py::test_fp8_cli_falls_back_to_bf16": SLOW,
    "test_profile.py::test_variants_run_interleaved_round_robin": SLOW,
    "test_profile.py::test_interleaving_keeps_each_variants_own_rng_streams": SLOW,
    "test_progress.py::test_pretrain_on_a_terminal": SLOW,
    "test_quiet_start.py::test_pretrain_starts_quietly_and_names_missing_packages": SLOW,
    "test_quiet_start.py::test_verbose_warnings_shows_upstream_warnings": SLOW,
    "test_diagnostics.py::test_plot_tool_random_init_demo": SLOW,
    "test_diagnostics.py::test_plot_tool_reads_a_distributed_checkpoint": SLOW,
    "test_examples.py::test_tiny_cpu_example_trains": SLOW,
    "test_examples.py::test_bpe_cpu_example_trains_and_evaluates[single]": SLOW,
    "test_examples.py::test_bpe_cpu_example_trains_and_evaluates[tp2_sp]": DISTRIBUTED,
    "test_cpu_malloc.py::test_retained_memory_is_reused_without_page_faults": SLOW,
    "test_data.py::test_the_tool_exits_2_on_bad_input": SLOW,
    "test_data.py::test_default_corpus_concurrent_processes": DISTRIBUTED,
    "test_data.py::test_preprocess_workers_match_serial": MULTI_PROCESS_QUICK,
    "test_launch_env.py::test_real_mpirun_two_ranks_all_reduce": MULTI_PROCESS_QUICK,
    "test_kernel_build.py::test_real_build_records_its_hash_and_loads_from_the_cache": SLOW,
    "test_collective_faults.py::test_a_stopped_rank_makes_the_other_exit_with_the_collective_named": (
        DISTRIBUTED
    ),
    "test_generation.py::test_the_command_continues_prompts_as_a_recompute_of_the_saved_weights": SLOW,
    "test_generation.py::test_tensor_parallel_2_with_chunked_prefill_equals_the_single_process": DISTRIBUTED,
    "test_generation.py::test_bad_input_is_refused_before_any_work": SLOW,  # `checkpoint`: a CLI run
    "test_bench_inference.py::test_the_memory_probe_measures_one_prefill_in_a_fresh_process": SLOW,
    "test_bench_tools.py::test_bench_step_ratios_come_from_the_same_run": SLOW,  # 7 models, profiled
    "test_gpu.py": GPU,
    "test_gpu_check.py::test_dry_run_writes_a_valid_report_and_markdown": SLOW,  # the kit's dry run
    "test_gpu_check.py::test_dry_run_compares_every_dtype_and_gradient": SLOW,
    # test_hf_export.py: the `exported` fixture (three checkpoints saved, exported, imported) and its users.
    "test_hf_export.py::test_export_then_import_round_trips_every_tensor_bitwise": SLOW,
    "test_hf_export.py::test_transformers_logits_and_greedy_generation_match_megatron": SLOW,
    "test_hf_export.py::test_config_json_carries_the_block_size_in_layers_and_the_convention_keys": SLOW,
    "test_hf_export.py::test_the_exported_byte_tokenizer_gives_megatrons_byte_ids": SLOW,
    "test_hf_export.py::test_the_exported_directory_runs_without_attnres_megatron_or_megatron": SLOW,
    "test_hf_export.py::test_left_padded_batches_compute_what_each_prompt_computes_alone": SLOW,
    "test_hf_export.py::test_the_command_line_converts_and_attnres_pretrain_trains_on": SLOW,
    # test_compare_residuals.py: the `sweep` fixture (three forked attnres-pretrain runs) and its users.
    "test_compare_residuals.py::test_a_tiny_sweep_writes_the_json_the_markdown_and_the_plots": SLOW,
    "test_compare_residuals.py::test_variants_read_the_same_batches_from_the_same_shared_weights": SLOW,
    "test_compare_residuals.py::test_the_baseline_rms_probe_measures_what_the_depth_recorder_measures": SLOW,
    "test_compare_residuals.py::test_a_second_sweep_skips_finished_runs_and_resumes_a_partial_one": SLOW,
}
NO_GPU_REASON = (
    "needs a CUDA device (torch.cuda.is_available() is False): run TRITON_INTERPRET=0 python -m pytest "
    "-m gpu on a GPU machine, or scripts/gpu_check.sh (docs/gpu.md)"
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    checked = set()
    for item in items:
        module = item.path.name
        keys = (module, f"{module}::{getattr(item, 'originalname', item.name)}", f"{module}::{item.name}")
        for key in keys:
            for name in MARKS.get(key, ()):
                item.add_marker(name)
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=NO_GPU_REASON))
        if module not in checked and getattr(item, "module", None) is not None:
            checked.add(module)
            for key in MARKS:
                path, _, test = key.partition("::")
                function = test.split("[", 1)[0]
                if path == module and function and not hasattr(item.module, function):
                    raise pytest.UsageError(f"tests/conftest.py MARKS names {key}, which does not exist")


# ---------------------------------------------------------------------------- unmarked slow tests

QUICK_LIMIT_S = 3.0
_unmarked_slow: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Time each quick-subset test (setup + call); ones over the limit are listed at the end."""
    if report.when in ("setup", "call") and not ({"slow", "distributed"} & set(report.keywords)):
        _unmarked_slow[report.nodeid] = _unmarked_slow.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = {nodeid: s for nodeid, s in _unmarked_slow.items() if s > QUICK_LIMIT_S}
    if over:
        terminalreporter.section("quick-subset tests over 3 s (mark them in tests/conftest.py MARKS)")
        for nodeid, seconds in sorted(over.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:6.2f}s {nodeid}")
