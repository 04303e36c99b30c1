"""A whole profile on this rank: process groups, data, every variant, results gathered on rank 0."""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch

from attnres_megatron.profiling.launcher import SPAWNED_MARKER
from attnres_megatron.profiling.precision import resolve_precision
from attnres_megatron.profiling.report import build_report
from attnres_megatron.profiling.runner import profile_variants
from attnres_megatron.training.distributed import shutdown_parallel
from attnres_megatron.training.model_setup import initialize_parallel_from_args, validated_launch
from attnres_megatron.training.pretrain import training_batches


def run_profile(args: argparse.Namespace, argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """Profile every variant in ``args.variants``; rank 0 returns the report, other ranks None."""
    launch, device = validated_launch(args)
    plan = resolve_precision(args, device)
    initialize_parallel_from_args(args, device, launch)
    try:
        data = training_batches(args, device)
        gathered = []
        for local in profile_variants(args, device, plan, data):
            everyone: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, local)
            gathered.append(everyone)
        if torch.distributed.get_rank() != 0:
            return None
        launcher = "attnres-profile workers" if os.environ.get(SPAWNED_MARKER) else launch.launcher
        return build_report(args, plan, device, gathered, launcher, argv)
    finally:
        shutdown_parallel()
