"""AttnRes-aware pipeline stage balance planner (pure arithmetic, no torch, no Megatron import).

Under Attention Residuals a sublayer's aggregation reads every earlier source, so later
layers cost more, and later pipeline boundaries carry more tensors. This tool splits the
``L`` transformer layers into ``P * V`` contiguous, non-empty model chunks (chunk
``c = vp_stage * P + pp_rank``, Megatron's order) so that the slowest physical pipeline
stage (the sum of its ``V`` chunks) is as fast as possible, and prints the plan beside
the even split together with the Megatron flags that realise it: first/last-stage layer counts
where they can, else Megatron-Core's ``--pipeline-model-parallel-layout`` string (stages in
chunk order, ``E``/``t``/``L``, ``|`` between stages, runs as ``(t*n|)*k``; its stage count sets
the virtual stages, so ``--num-virtual-stages-per-pipeline-rank`` is left out, as Megatron-LM
requires). ``--print-layout`` prints the layout string alone, ``--split`` evaluates a given
split, ``--table`` tabulates bytes and imbalance over lists of ``--pp`` and ``--vpp``.

Cost model (relative units, one transformer layer = ``--layer-cost``):

* sublayer ``j`` (global, two per layer) aggregates ``sources(j) = j // S + 1 + (j % S != 0)``
  sources (completed blocks, b0, and the partial sum when the block has started), at
  ``--source-cost`` each;
* layer ``i`` costs ``layer_cost + source_cost * (sources(2i) + sources(2i + 1))``;
* a chunk pays ``--transfer-cost`` per tensor it receives at its start: the sources its rank
  lacks (b0, completed blocks, partial), counted with the cross-stage cache for V > 1, exactly
  as the plugin sends them (``PipelineLayout.sources_received``);
* the last chunk also runs the final aggregation over all ``sources(2L)`` sources (before the
  output norm), at ``--source-cost`` each;
* the first chunk adds ``--first-stage-extra`` (embedding), the last ``--last-stage-extra``
  (output layer and loss).

``docs/pipeline_balance.md`` checks the model against per-stage CPU times measured with
``attnres-profile`` (``tools/measure_pipeline_balance.py``) and tabulates Kimi-sized stacks
(``--table``).

Search: for V = 1 an exact O(P L^2) dynamic programme minimises the maximum stage cost; for
V > 1 an exhaustive search when the number of splits is small, otherwise a local search
(moving one layer between any two chunks) from the even split and from a DP that balances
chunk costs. Ties are broken by the next-largest stage costs, then by chunk balance; the
plan is never worse than the even split.

Example: ``python tools/plan_pipeline_stages.py --layers 27 --block-size 6 --pp 3``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def load_layout():
    """The plugin's pure layout module, without importing the package (and Megatron)."""
    name = "attnres_megatron.pipeline.layout"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "attnres_megatron/pipeline/layout.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


layout = load_layout()
PipelineLayout = layout.PipelineLayout
even_split = layout.even_split
sources_at = layout.sources_at

EXHAUSTIVE_LIMIT = 20_000
DIGITS = 9
OBJECTIVES = ("stage-sum", "lockstep")


@dataclass(frozen=True)
class CostModel:
    """Relative costs: per layer, per source per sublayer, per received tensor, stage extras."""

    layer_cost: float = 1.0
    source_cost: float = 0.02
    transfer_cost: float = 0.05
    first_stage_extra: float = 0.0
    last_stage_extra: float = 0.5


def layout_string(chunk_layers: Sequence[int], compact: bool = True) -> str:
    """Megatron-Core's ``--pipeline-model-parallel-layout`` for layers per chunk in chunk order
    (chunk ``v * P + r``, Megatron's order of the stages in the string): ``E`` (the embedding)
    opens the first stage, ``L`` (the loss) closes the last, ``t*n`` is ``n`` transformer layers,
    ``|`` separates stages. ``compact`` writes a run of ``k >= 3`` equal middle stages as
    ``(t*n|)*k`` (Megatron unrolls ``(...)*k``; commas are cosmetic), e.g. ``[6, 5, 5, 5, 4]`` ->
    ``Et*6|(t*5|)*3,t*4L``."""
    if not chunk_layers or min(chunk_layers) < 1:
        raise ValueError(f"every chunk needs at least one layer; got {list(chunk_layers)}")
    bodies = ["t" if count == 1 else f"t*{count}" for count in chunk_layers]
    last = len(bodies) - 1
    stages = [
        ("E" if chunk == 0 else "") + body + ("L" if chunk == last else "")
        for chunk, body in enumerate(bodies)
    ]
    if not compact:
        return "|".join(stages)
    # Runs of equal middle stages (the first has E, the last L); each piece ends with its '|'.
    pieces, index = [stages[0] + "|"] if len(stages) > 1 else [], 1
    while index < last:
        run = 1
        while index + run < last and stages[index + run] == stages[index]:
            run += 1
        pieces.append(f"({stages[index]}|)*{run}," if run >= 3 else f"{stages[index]}|" * run)
        index += run
    return "".join(pieces) + stages[last]


def layer_costs(num_layers: int, sublayers_per_block: int, cost: CostModel) -> list[float]:
    """Predicted compute of each transformer layer (its two sublayers' aggregations included)."""
    return [
        cost.layer_cost
        + cost.source_cost
        * (sources_at(2 * layer, sublayers_per_block) + sources_at(2 * layer + 1, sublayers_per_block))
        for layer in range(num_layers)
    ]


def output_cost(num_layers: int, sublayers_per_block: int, cost: CostModel) -> float:
    """The last chunk's extra: output layer and loss, plus the final aggregation over all sources."""
    return cost.last_stage_extra + cost.source_cost * sources_at(2 * num_layers, sublayers_per_block)


def received_tensors(chunk_layers: Sequence[int], pipeline_size: int, sublayers_per_block: int) -> list[int]:
    """Tensors each chunk receives at its start (0 for chunk 0), with the cross-stage cache:
    exactly what the plugin sends (the plugin's own layout)."""
    virtual_size = len(chunk_layers) // pipeline_size
    plan = PipelineLayout.from_layer_counts(pipeline_size, virtual_size, sublayers_per_block, chunk_layers)
    return [0, *plan.hop_sources()]


@dataclass(frozen=True)
class Plan:
    """A split of the layers into chunks, with its predicted per-chunk and per-stage costs."""

    num_layers: int
    sublayers_per_block: int
    pipeline_size: int
    virtual_size: int
    chunk_layers: tuple[int, ...]
    chunk_costs: tuple[float, ...]
    stage_costs: tuple[float, ...]
    received: tuple[int, ...]
    method: str
    cost: CostModel
    objective: str = "stage-sum"

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Layers per physical pipeline stage (sum over its virtual chunks)."""
        return tuple(
            sum(self.chunk_layers[vp * self.pipeline_size + rank] for vp in range(self.virtual_size))
            for rank in range(self.pipeline_size)
        )

    def rank_chunks(self, rank: int) -> tuple[int, ...]:
        """Layers of each virtual chunk of one physical stage, in virtual-stage order."""
        return tuple(self.chunk_layers[vp * self.pipeline_size + rank] for vp in range(self.virtual_size))

    @property
    def bottleneck(self) -> float:
        """The slowest physical stage's predicted cost."""
        return max(self.stage_costs)

    @property
    def virtual_stage_costs(self) -> tuple[float, ...]:
        """Slowest chunk of each virtual stage (over the pipeline ranks)."""
        return tuple(
            max(self.chunk_costs[vp * self.pipeline_size : (vp + 1) * self.pipeline_size])
            for vp in range(self.virtual_size)
        )

    @property
    def lockstep_cost(self) -> float:
        """Per-micro-batch time if the ranks step through the virtual stages together (as in
        interleaved 1F1B's steady state): the sum over virtual stages of the slowest chunk.
        Equals ``bottleneck`` for V = 1."""
        return sum(self.virtual_stage_costs)

    @property
    def objective_value(self) -> float:
        """The value the search minimises: ``bottleneck`` (stage-sum) or ``lockstep_cost``."""
        return self.lockstep_cost if self.objective == "lockstep" else self.bottleneck

    @property
    def imbalance(self) -> float:
        """Bottleneck over mean stage cost (1.0 = perfectly balanced)."""
        return self.bottleneck / (sum(self.stage_costs) / len(self.stage_costs))

    @property
    def is_megatron_default(self) -> bool:
        """Whether Megatron's default split (no uneven-split flags) gives exactly this plan."""
        return len(set(self.chunk_layers)) == 1

    @property
    def layout_string(self) -> str:
        """The plan as a Megatron ``--pipeline-model-parallel-layout`` string (chunk order,
        runs of equal stages written ``(t*n|)*k``)."""
        return layout_string(self.chunk_layers)

    @property
    def first_last_layers(self) -> tuple[int, int] | None:
        """``(first, last)`` layers per physical stage when Megatron's first/last flags express
        the plan (every rank's chunks equal, all middle ranks equal), else ``None``."""
        if self.pipeline_size < 2:
            return None
        per_rank = [self.rank_chunks(rank) for rank in range(self.pipeline_size)]
        if any(len(set(chunks)) != 1 for chunks in per_rank):
            return None
        if len({chunks[0] for chunks in per_rank[1:-1]}) > 1:
            return None
        return self.stage_layers[0], self.stage_layers[-1]

    def megatron_args(self) -> list[str]:
        """Megatron / attnres-pretrain flags that build this split (besides the PP size)."""
        args = []
        if self.virtual_size > 1:
            args += ["--num-virtual-stages-per-pipeline-rank", str(self.virtual_size)]
        if self.is_megatron_default or self.pipeline_size < 2:
            return args
        first_last = self.first_last_layers
        if first_last is not None:
            return args + [
                "--decoder-first-pipeline-num-layers",
                str(first_last[0]),
                "--decoder-last-pipeline-num-layers",
                str(first_last[1]),
            ]
        # The layout sets the virtual stages itself (stages / P); Megatron-LM refuses it beside
        # --num-virtual-stages-per-pipeline-rank.
        return ["--pipeline-model-parallel-layout", self.layout_string]

    def to_dict(self) -> dict:
        """JSON-ready view, derived fields included."""
        data = asdict(self)
        data.update(
            stage_layers=list(self.stage_layers),
            bottleneck=self.bottleneck,
            imbalance=self.imbalance,
            lockstep_cost=self.lockstep_cost,
            layout_string=self.layout_string,
            megatron_args=self.megatron_args(),
        )
        return data


def evaluate_split(
    chunk_layers: Sequence[int],
    sublayers_per_block: int,
    pipeline_size: int,
    virtual_size: int = 1,
    cost: CostModel | None = None,
    method: str = "given",
    objective: str = "stage-sum",
    _layer_prefix: Sequence[float] | None = None,
) -> Plan:
    """Predicted costs of a given split (layers per chunk, in chunk order)."""
    cost = cost or CostModel()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    chunk_layers = tuple(int(count) for count in chunk_layers)
    num_chunks = pipeline_size * virtual_size
    if len(chunk_layers) != num_chunks:
        raise ValueError(f"need {num_chunks} chunk sizes (P * V); got {len(chunk_layers)}")
    if min(chunk_layers) < 1:
        raise ValueError(f"every chunk needs at least one layer; got {list(chunk_layers)}")
    num_layers = sum(chunk_layers)
    prefix = _layer_prefix
    if prefix is None:
        prefix = [0.0, *itertools.accumulate(layer_costs(num_layers, sublayers_per_block, cost))]
    received = received_tensors(chunk_layers, pipeline_size, sublayers_per_block)
    chunk_costs = []
    start = 0
    for chunk, count in enumerate(chunk_layers):
        value = prefix[start + count] - prefix[start] + cost.transfer_cost * received[chunk]
        if chunk == 0:
            value += cost.first_stage_extra
        if chunk == num_chunks - 1:
            value += output_cost(num_layers, sublayers_per_block, cost)
        chunk_costs.append(value)
        start += count
    stage_costs = tuple(
        sum(chunk_costs[vp * pipeline_size + rank] for vp in range(virtual_size))
        for rank in range(pipeline_size)
    )
    return Plan(
        num_layers,
        sublayers_per_block,
        pipeline_size,
        virtual_size,
        chunk_layers,
        tuple(chunk_costs),
        stage_costs,
        tuple(received),
        method,
        cost,
        objective,
    )


def plan_key(plan: Plan) -> tuple:
    """Order of preference. ``stage-sum``: stage costs sorted descending (bottleneck first), then
    the lockstep cost, then chunk costs sorted descending. ``lockstep``: the lockstep cost first."""
    stages = tuple(sorted((round(value, DIGITS) for value in plan.stage_costs), reverse=True))
    chunks = tuple(sorted((round(value, DIGITS) for value in plan.chunk_costs), reverse=True))
    lockstep = round(plan.lockstep_cost, DIGITS)
    if plan.objective == "lockstep":
        return lockstep, stages, chunks
    return stages, lockstep, chunks


def dp_min_max(
    num_layers: int,
    num_groups: int,
    group_cost: Callable[[int, int, int], float],
) -> list[int]:
    """Split ``range(num_layers)`` into ``num_groups`` contiguous non-empty groups minimising
    the maximum of ``group_cost(group, start, end)`` (exact, O(groups * L^2))."""
    inf = math.inf
    best = [[inf] * (num_layers + 1) for _ in range(num_groups + 1)]
    back = [[0] * (num_layers + 1) for _ in range(num_groups + 1)]
    best[0][0] = -inf
    for group in range(1, num_groups + 1):
        # group ``group - 1`` ends at ``end``; leave room for the groups after it
        for end in range(group, num_layers - (num_groups - group) + 1):
            for start in range(group - 1, end):
                if best[group - 1][start] == inf:
                    continue
                value = max(best[group - 1][start], group_cost(group - 1, start, end))
                if value < best[group][end] - 1e-12:
                    best[group][end] = value
                    back[group][end] = start
    sizes = []
    end = num_layers
    for group in range(num_groups, 0, -1):
        start = back[group][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def local_search(plan: Plan, prefix: Sequence[float]) -> Plan:
    """Move one layer between any two chunks while the plan's key strictly improves."""
    current, current_key = plan, plan_key(plan)
    improved = True
    while improved:
        improved = False
        counts = list(current.chunk_layers)
        for source, target in itertools.permutations(range(len(counts)), 2):
            if counts[source] < 2:
                continue
            trial = counts.copy()
            trial[source] -= 1
            trial[target] += 1
            candidate = evaluate_split(
                trial,
                current.sublayers_per_block,
                current.pipeline_size,
                current.virtual_size,
                current.cost,
                current.method,
                current.objective,
                prefix,
            )
            key = plan_key(candidate)
            if key < current_key:
                current, current_key, improved = candidate, key, True
                break
    return current


def compositions(total: int, parts: int) -> Iterator[list[int]]:
    """All ways to write ``total`` as ``parts`` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[index + 1] - bounds[index] for index in range(parts)]


def plan_stages(
    num_layers: int,
    sublayers_per_block: int,
    pipeline_size: int,
    virtual_size: int = 1,
    cost: CostModel | None = None,
    objective: str = "stage-sum",
) -> Plan:
    """The AttnRes-aware split, never worse than the even split on ``objective``.

    ``stage-sum`` (default) minimises the slowest physical stage, a stage costing the sum of
    its V chunks. ``lockstep`` (V > 1 only differs) minimises the sum over virtual stages of
    the slowest chunk, which also penalises splits whose chunks are uneven within a virtual
    stage (ranks of an interleaved schedule wait for each other at every step).
    """
    cost = cost or CostModel()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
    if min(num_layers, sublayers_per_block, pipeline_size, virtual_size) < 1:
        raise ValueError("layers, block size, pipeline and virtual sizes must be positive")
    num_chunks = pipeline_size * virtual_size
    if num_layers < num_chunks:
        raise ValueError(
            f"{num_layers} layers cannot give each of the {num_chunks} chunks (PP * V) a layer; "
            "AttnRes needs at least one layer per chunk"
        )
    prefix = [0.0, *itertools.accumulate(layer_costs(num_layers, sublayers_per_block, cost))]

    def evaluate(counts: Sequence[int], method: str) -> Plan:
        return evaluate_split(
            counts, sublayers_per_block, pipeline_size, virtual_size, cost, method, objective, prefix
        )

    def chunk_cost(chunk: int, start: int, end: int) -> float:
        # Exact for V = 1 (a chunk's received tensors only depend on its start); for V > 1 it
        # ignores the cache (a DP seed, refined on the exact objective below).
        value = prefix[end] - prefix[start]
        if start > 0:
            value += cost.transfer_cost * (layout.completed_blocks_before(2 * start, sublayers_per_block) + 2)
        if chunk == 0:
            value += cost.first_stage_extra
        if chunk == num_chunks - 1:
            value += output_cost(num_layers, sublayers_per_block, cost)
        return value

    even = evaluate(even_split(num_layers, num_chunks), "even split")
    if virtual_size == 1:
        seeds = [evaluate(dp_min_max(num_layers, num_chunks, chunk_cost), "exact DP")]
    elif math.comb(num_layers - 1, num_chunks - 1) <= EXHAUSTIVE_LIMIT:
        exhaustive = min(
            (evaluate(counts, "exhaustive (exact)") for counts in compositions(num_layers, num_chunks)),
            key=plan_key,
        )
        seeds = [exhaustive]
    else:
        # Seeds: one DP over all chunks; one DP per virtual stage over an even split of the
        # layers into V groups; the even split. Each is refined on the exact objective.
        grouped = []
        offset = 0
        for vp, group_layers in enumerate(even_split(num_layers, virtual_size)):
            base = offset

            def group_cost(rank: int, start: int, end: int, base: int = base, vp: int = vp) -> float:
                return chunk_cost(vp * pipeline_size + rank, base + start, base + end)

            grouped += dp_min_max(group_layers, pipeline_size, group_cost)
            offset += group_layers
        seeds = [
            evaluate(dp_min_max(num_layers, num_chunks, chunk_cost), "chunk DP + local search"),
            evaluate(grouped, "per-virtual-stage DP + local search"),
            evaluate(even.chunk_layers, "even split + local search"),
        ]
    refined = [local_search(seed, prefix) for seed in seeds]
    best = min([even, *refined], key=plan_key)
    if best is even:
        exact = "exact" in seeds[0].method
        verdict = "the even split is already optimal" if exact else "no better split found"
        return replace(even, method=f"{seeds[0].method}; {verdict}")
    return best


def even_plan(
    num_layers: int,
    sublayers_per_block: int,
    pipeline_size: int,
    virtual_size: int = 1,
    cost: CostModel | None = None,
    objective: str = "stage-sum",
) -> Plan:
    """The even split (Megatron's default when P * V divides L; else remainder to the last chunks)."""
    counts = even_split(num_layers, pipeline_size * virtual_size)
    method = "Megatron even split" if num_layers % len(counts) == 0 else "even split, remainder last"
    return evaluate_split(counts, sublayers_per_block, pipeline_size, virtual_size, cost, method, objective)


def resolve_block_size(num_layers: int, block_size: int | None, num_blocks: int | None) -> int:
    """S from ``--block-size`` or ``--num-blocks`` (S = ceil(2L / N)), as the plugin's config does."""
    if (block_size is None) == (num_blocks is None):
        raise ValueError("give exactly one of --block-size and --num-blocks")
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"--block-size must be >= 1; got {block_size}")
        return block_size
    if not 1 <= num_blocks <= 2 * num_layers:
        raise ValueError(f"--num-blocks must be in [1, {2 * num_layers}] (2L sublayers); got {num_blocks}")
    return math.ceil(2 * num_layers / num_blocks)


def _stage_cell(plan: Plan, rank: int) -> str:
    chunks = plan.rank_chunks(rank)
    return str(chunks[0]) if len(chunks) == 1 else "+".join(map(str, chunks)) + f" = {sum(chunks)}"


def report(plan: Plan, baseline: Plan) -> str:
    """Human-readable comparison of the plan with the even split, plus the Megatron flags."""
    cost = plan.cost
    num_blocks = layout.num_blocks(plan.num_layers, plan.sublayers_per_block)
    lines = [
        f"AttnRes-aware pipeline split: L={plan.num_layers} layers, S={plan.sublayers_per_block} "
        f"sublayers per block (N={num_blocks} blocks + b0), PP={plan.pipeline_size}, "
        f"V={plan.virtual_size}",
        f"cost model: layer {cost.layer_cost:g}, source {cost.source_cost:g} per source per sublayer, "
        f"transfer {cost.transfer_cost:g} per received tensor, first-stage extra "
        f"{cost.first_stage_extra:g}, last-stage extra {cost.last_stage_extra:g}",
        f"search: {plan.method}; objective: "
        + (
            "slowest physical stage (sum of its chunks)"
            if plan.objective == "stage-sum"
            else "lockstep (sum over virtual stages of the slowest chunk)"
        ),
        "",
        f"| stage | {baseline.method}: layers | cost | AttnRes plan: layers | cost |",
        "|---:|---|---:|---|---:|",
    ]
    for rank in range(plan.pipeline_size):
        lines.append(
            f"| {rank} | {_stage_cell(baseline, rank)} | {baseline.stage_costs[rank]:.3f} "
            f"| {_stage_cell(plan, rank)} | {plan.stage_costs[rank]:.3f} |"
        )
    lines += [
        f"| max (bottleneck) | | {baseline.bottleneck:.3f} | | {plan.bottleneck:.3f} |",
        f"| imbalance (max/mean) | | {baseline.imbalance:.3f} | | {plan.imbalance:.3f} |",
    ]
    if plan.virtual_size > 1:
        lines.append(
            f"| lockstep (sum over virtual stages of the slowest chunk) | | {baseline.lockstep_cost:.3f} "
            f"| | {plan.lockstep_cost:.3f} |"
        )
    what = "bottleneck" if plan.objective == "stage-sum" else "lockstep cost"
    lines += [
        "",
        f"predicted speedup of the plan: {baseline.objective_value / plan.objective_value:.3f}x "
        f"(even-split {what} / planned {what})",
    ]
    if plan.virtual_size > 1 and plan.lockstep_cost > baseline.lockstep_cost + 1e-9:
        lines.append(
            f"warning: if the ranks step through the virtual stages together (interleaved 1F1B), this "
            f"plan is slower than the even split ({plan.lockstep_cost:.3f} vs {baseline.lockstep_cost:.3f}); "
            "compare with --vpp-objective lockstep."
        )
    if plan.virtual_size > 1:
        lines.append(f"tensors received per chunk (cached): {list(plan.received[1:])}")
    else:
        lines.append(f"tensors received per stage: {list(plan.received[1:])}")
    args = plan.megatron_args()
    if plan.is_megatron_default:
        lines.append(
            "Megatron: the plan is Megatron's default even split"
            + (f"; pass {' '.join(args)}" if args else "; no extra flags")
        )
    else:
        lines.append("Megatron flags: " + " ".join(_quote(arg) for arg in args))
    if "--pipeline-model-parallel-layout" not in args and plan.pipeline_size > 1:
        lines.append(
            "as a layout (sets the virtual stages itself): --pipeline-model-parallel-layout "
            + _quote(plan.layout_string)
        )
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(char in arg for char in "|*()") else arg


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class TableRow:
    """One PP x V combination: traffic and predicted imbalance of the even and the planned split."""

    pp: int
    vpp: int
    even: Plan
    plan: Plan
    tensor_bytes: int

    def tensors(self, which: str, cached: bool = True) -> int:
        """[s, b, h] tensors crossing every hop of one micro-batch, forward (backward: the same)."""
        split = self.even if which == "even" else self.plan
        plan = PipelineLayout.from_layer_counts(
            self.pp, self.vpp, split.sublayers_per_block, split.chunk_layers
        )
        return sum(plan.hop_sources(cached))

    def to_dict(self) -> dict:
        return {
            "pp": self.pp,
            "vpp": self.vpp,
            "even_chunk_layers": list(self.even.chunk_layers),
            "plan_chunk_layers": list(self.plan.chunk_layers),
            "plan_layout": self.plan.layout_string,
            "plan_megatron_args": self.plan.megatron_args(),
            "tensor_bytes": self.tensor_bytes,
            **{
                f"{which}_{kind}_tensors": self.tensors(which, kind == "cached")
                for which in ("even", "plan")
                for kind in ("naive", "cached")
            },
            "even_imbalance": self.even.imbalance,
            "plan_imbalance": self.plan.imbalance,
            "even_objective": self.even.objective_value,
            "plan_objective": self.plan.objective_value,
            "speedup": self.even.objective_value / self.plan.objective_value,
        }


def balance_table(
    num_layers: int,
    sublayers_per_block: int,
    pp_sizes: Sequence[int],
    vpp_sizes: Sequence[int],
    tensor_bytes: int,
    cost: CostModel | None = None,
    objective: str = "lockstep",
) -> tuple[list[TableRow], list[str]]:
    """Every PP x V combination with at least one layer per chunk (the others are returned as
    skip notes): the even split and the planned one."""
    rows, skipped = [], []
    for pp in pp_sizes:
        for vpp in vpp_sizes:
            if pp * vpp > num_layers:
                skipped.append(
                    f"PP={pp} x V={vpp}: {pp * vpp} chunks for {num_layers} layers (one layer each needed)"
                )
                continue
            even = even_plan(num_layers, sublayers_per_block, pp, vpp, cost, objective)
            plan = plan_stages(num_layers, sublayers_per_block, pp, vpp, cost, objective)
            rows.append(TableRow(pp, vpp, even, plan, tensor_bytes))
    return rows, skipped


def _split_cell(chunk_layers: Sequence[int]) -> str:
    """Layers per chunk in chunk order, runs written ``n xk`` (``3 x6, 5`` = six chunks of 3 layers,
    then one of 5)."""
    runs: list[list[int]] = []
    for count in chunk_layers:
        if runs and runs[-1][0] == count:
            runs[-1][1] += 1
        else:
            runs.append([count, 1])
    return ", ".join(f"{count}" if times == 1 else f"{count} x{times}" for count, times in runs)


def table_markdown(rows: Sequence[TableRow], skipped: Sequence[str], header: str) -> str:
    """The table as markdown, with the cost model and the skipped combinations."""
    mib = 1 << 20
    lines = [
        header,
        "",
        "| PP | V | even split: layers per chunk | naive MiB (tensors) | cached MiB (tensors) | imbalance "
        "| balanced split: layers per chunk | cached MiB (tensors) | imbalance | speedup |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        cells = []
        for which in ("even", "plan"):
            split = row.even if which == "even" else row.plan
            cells.append(_split_cell(split.chunk_layers))
            kinds = ("naive", "cached") if which == "even" else ("cached",)
            for kind in kinds:
                tensors = row.tensors(which, kind == "cached")
                cells.append(f"{tensors * row.tensor_bytes / mib:,.0f} ({tensors})")
            cells.append(f"{split.imbalance:.3f}")
        speedup = row.even.objective_value / row.plan.objective_value
        lines.append(f"| {row.pp} | {row.vpp} | " + " | ".join(cells) + f" | {speedup:.3f} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def table_header(args: argparse.Namespace, block_size: int, cost: CostModel, tensor_bytes: int) -> str:
    return (
        f"L={args.layers} layers, S={block_size} sublayers per block "
        f"(N={layout.num_blocks(args.layers, block_size)} blocks + b0); one tensor [s={args.seq}, "
        f"b={args.micro_batch}, h={args.hidden}] x {args.bytes_per_element} B = "
        f"{tensor_bytes / (1 << 20):.2f} MiB. "
        "Bytes: every hop of one micro-batch, forward (backward sends as many); naive = every source the "
        "receiver reads, cached = the strict minimum (what the plugin sends). Imbalance: slowest "
        "physical stage / mean stage (a stage = the sum of its V chunks), predicted by the cost model "
        f"(layer {cost.layer_cost:g}, source {cost.source_cost:g}, transfer {cost.transfer_cost:g}, "
        f"first-stage extra {cost.first_stage_extra:g}, last-stage extra {cost.last_stage_extra:g}). "
        "Layers per chunk in chunk order (v P + r), `n xk` = k chunks of n layers. "
        "Even: L / (P V) per chunk, remainder to the last chunks. Balanced: the planner's split "
        f"(objective {args.vpp_objective} for V > 1); speedup = even / balanced on that objective."
    )


def parse_split(text: str) -> list[int]:
    """``--split 10,9,8`` -> ``[10, 9, 8]``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts, e.g. 10,9,8; got {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="AttnRes-aware pipeline stage balance planner.")
    parser.add_argument("--layers", type=int, required=True, help="transformer layers L")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--block-size", type=int, help="sublayers per AttnRes block S (1 = Full AttnRes)")
    size.add_argument("--num-blocks", type=int, help="AttnRes blocks N (S = ceil(2L / N))")
    parser.add_argument(
        "--pp", type=int, nargs="+", required=True, help="pipeline-parallel size P (several with --table)"
    )
    parser.add_argument(
        "--vpp",
        type=int,
        nargs="+",
        default=[1],
        help="virtual stages per pipeline rank V (several with --table)",
    )
    parser.add_argument("--layer-cost", type=float, default=1.0, help="compute per transformer layer")
    parser.add_argument(
        "--source-cost", type=float, default=0.02, help="aggregation cost per source per sublayer"
    )
    parser.add_argument(
        "--transfer-cost", type=float, default=0.05, help="cost per tensor received at a boundary"
    )
    parser.add_argument("--first-stage-extra", type=float, default=0.0, help="embedding cost")
    parser.add_argument("--last-stage-extra", type=float, default=0.5, help="output layer + loss cost")
    parser.add_argument(
        "--vpp-objective",
        choices=OBJECTIVES,
        default="lockstep",
        help="V > 1: minimise the lockstep cost (sum over virtual stages of the slowest chunk; "
        "default, as interleaved 1F1B advances stage by stage) or the slowest physical stage "
        "(sum of its chunks)",
    )
    parser.add_argument(
        "--split",
        type=parse_split,
        default=None,
        help="evaluate this split (layers per chunk in chunk order v * P + r, comma-separated) "
        "instead of searching one",
    )
    parser.add_argument(
        "--print-layout",
        action="store_true",
        help="print only the plan's --pipeline-model-parallel-layout string, e.g. for "
        '--pipeline-model-parallel-layout "$(python tools/plan_pipeline_stages.py ... --print-layout)"',
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="a markdown table over every --pp x --vpp combination: bytes per micro-batch (naive, "
        "cached) and predicted imbalance of the even and the balanced split",
    )
    parser.add_argument("--hidden", type=int, default=2304, help="--table: hidden size h")
    parser.add_argument("--seq", type=int, default=4096, help="--table: sequence length s")
    parser.add_argument("--micro-batch", type=int, default=1, help="--table: micro-batch size b")
    parser.add_argument("--bytes-per-element", type=int, default=2, help="--table: 2 for bf16, 4 for fp32")
    parser.add_argument("--markdown", default=None, help="--table: also write the markdown here")
    parser.add_argument(
        "--output", default=None, help="write the plan and the even split (or the table) as JSON"
    )
    args = parser.parse_args(argv)
    if not args.table and (len(args.pp) > 1 or len(args.vpp) > 1):
        parser.error("several --pp or --vpp values need --table")
    if args.table and (args.split is not None or args.print_layout):
        parser.error("--table plans every combination; drop --split / --print-layout")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cost = CostModel(
        args.layer_cost, args.source_cost, args.transfer_cost, args.first_stage_extra, args.last_stage_extra
    )
    try:
        block_size = resolve_block_size(args.layers, args.block_size, args.num_blocks)
        if args.table:
            return write_table(args, block_size, cost)
        pp, vpp = args.pp[0], args.vpp[0]
        baseline = even_plan(args.layers, block_size, pp, vpp, cost, args.vpp_objective)
        if args.split is not None:
            if sum(args.split) != args.layers:
                raise ValueError(
                    f"--split {args.split} has {sum(args.split)} layers; --layers is {args.layers}"
                )
            plan = evaluate_split(args.split, block_size, pp, vpp, cost, "given split", args.vpp_objective)
        else:
            plan = plan_stages(args.layers, block_size, pp, vpp, cost, args.vpp_objective)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_layout:
        print(plan.layout_string)
        return 0
    print(report(plan, baseline), end="")
    if args.output:
        data = {
            "plan": plan.to_dict(),
            "even_split": baseline.to_dict(),
            "objective": plan.objective,
            "speedup": baseline.objective_value / plan.objective_value,
        }
        Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def write_table(args: argparse.Namespace, block_size: int, cost: CostModel) -> int:
    """``--table``: print (and write) the markdown table, the JSON with ``--output``."""
    tensor_bytes = args.seq * args.micro_batch * args.hidden * args.bytes_per_element
    rows, skipped = balance_table(
        args.layers, block_size, args.pp, args.vpp, tensor_bytes, cost, args.vpp_objective
    )
    text = table_markdown(rows, skipped, table_header(args, block_size, cost, tensor_bytes))
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.output:
        data = {"rows": [row.to_dict() for row in rows], "skipped": skipped, "cost": asdict(cost)}
        Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
