"""Launcher discovery: rank, world size and rendezvous from torchrun, mpirun, srun or nothing.

``discover_launch_env`` reads the variables each launcher sets and returns one
``LaunchEnv``; ``export_for_torch`` writes it back as the ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` variables that ``init_process_group(init_method="env://")``
reads. Launchers are tried in this order:

1. torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
2. MPI: OpenMPI's ``mpirun`` (``OMPI_COMM_WORLD_*``) or an MPICH-like one (``PMI_RANK``,
   ``PMI_SIZE``). Rank 0 picks the rendezvous address and a free port and broadcasts them
   with mpi4py, unless ``MASTER_ADDR`` and ``MASTER_PORT`` are both set (export them to
   every rank, e.g. ``mpirun -x MASTER_ADDR -x MASTER_PORT``).
3. Slurm's ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ...): the first host of the
   nodelist is the rendezvous address and the port is derived from the job id.
4. A single process.

An incomplete or inconsistent environment raises ``LaunchEnvError`` naming the variable
and the fix, before any process group is created.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "LaunchEnv",
    "LaunchEnvError",
    "discover_launch_env",
    "expand_nodelist",
    "export_for_torch",
    "first_host",
    "parse_tasks_per_node",
]

LOOPBACK = "127.0.0.1"
TORCHRUN_FIX = "launch with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
MPI_FIX = (
    "install the mpi extra: pip install 'attnres-megatron[mpi]' "
    "(needs OpenMPI: apt-get install libopenmpi-dev openmpi-bin)"
)
MPI_ADDR_FIX = "set MASTER_ADDR and MASTER_PORT for every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)"
SLURM_FIX = "launch one task per process with srun inside an allocation (sbatch/salloc)"
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000
SLURM_DEFAULT_PORT = 29500
_INT = re.compile(r"[+-]?[0-9]+")


class LaunchEnvError(ValueError):
    """The launcher's environment is incomplete or inconsistent; the message names the fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job and where the rendezvous is."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "mpirun", "slurm" or "single"


def export_for_torch(env: LaunchEnv) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for env://."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def discover_launch_env(
    environ: Optional[Mapping[str, str]] = None, use_mpi: Optional[bool] = None
) -> LaunchEnv:
    """Detect torchrun, mpirun, srun or a single process from ``environ`` (default os.environ)."""
    # use_mpi (MPI launchers only): None imports mpi4py only when MASTER_ADDR, MASTER_PORT or the
    # local rank/size variables are missing; False never imports it (they must all be set);
    # True always does, and checks the rank and size against MPI.COMM_WORLD.
    env = os.environ if environ is None else environ
    if _present(env, "RANK") or _present(env, "WORLD_SIZE"):
        return _from_torchrun(env)
    if _present(env, "OMPI_COMM_WORLD_RANK") or _present(env, "OMPI_COMM_WORLD_SIZE"):
        return _from_mpi(env, use_mpi, openmpi=True)
    # Under srun with --mpi=pmi2 Slurm also sets PMI_RANK; its own variables need no mpi4py.
    if (_present(env, "PMI_RANK") or _present(env, "PMI_SIZE")) and not _present(env, "SLURM_PROCID"):
        return _from_mpi(env, use_mpi, openmpi=False)
    if _present(env, "SLURM_PROCID"):
        return _from_slurm(env)
    return _single(env)


# ---------------------------------------------------------------------------- helpers


def _present(env: Mapping[str, str], name: str) -> bool:
    """True when ``name`` is set to a non-blank value."""
    return bool(env.get(name, "").strip())


def _int(env: Mapping[str, str], name: str, context: str, fix: str) -> int:
    """The integer value of a required variable, or a LaunchEnvError naming it and the fix."""
    if not _present(env, name):
        raise LaunchEnvError(f"{context}: {name} is not set; {fix}")
    return _parse_int(env[name], name, context, fix)


def _parse_int(value: str, name: str, context: str, fix: str) -> int:
    """The decimal integer in ``value`` or a LaunchEnvError quoting the bad value."""
    if _INT.fullmatch(value.strip()) is None:  # int() would also take '1_0' and other spellings
        raise LaunchEnvError(f"{context}: {name}={value!r} is not an integer; {fix}")
    return int(value.strip())


def _port(value: str, name: str, context: str, fix: str) -> int:
    """A TCP port number in 1..65535."""
    port = _parse_int(value, name, context, fix)
    if not 1 <= port <= 65535:
        raise LaunchEnvError(f"{context}: {name}={port} is not a TCP port (1-65535); {fix}")
    return port


def _check(env: LaunchEnv, context: str, names: tuple[str, str, str, str], fix: str) -> LaunchEnv:
    """Reject negative ranks, empty worlds and ranks outside their world."""
    rank_name, size_name, local_rank_name, local_size_name = names
    if env.world_size < 1:
        raise LaunchEnvError(f"{context}: {size_name}={env.world_size} must be at least 1; {fix}")
    if not 0 <= env.rank < env.world_size:
        raise LaunchEnvError(
            f"{context}: {rank_name}={env.rank} is outside 0..{size_name}-1 "
            f"({size_name}={env.world_size}); {fix}"
        )
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise LaunchEnvError(
            f"{context}: {local_size_name}={env.local_world_size} must be in 1..{size_name} "
            f"({size_name}={env.world_size}); {fix}"
        )
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchEnvError(
            f"{context}: {local_rank_name}={env.local_rank} is outside 0..{local_size_name}-1 "
            f"({local_size_name}={env.local_world_size}); {fix}"
        )
    if not env.master_addr:
        raise LaunchEnvError(f"{context}: MASTER_ADDR is empty; {fix}")
    return env


def free_port(host: str = "") -> int:
    """A TCP port that is free right now on ``host`` (all interfaces by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_loopback(addr: str) -> bool:
    """True for 127.0.0.0/8 and ::1."""
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- torchrun


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    context = "torchrun-style launch"
    rank = _int(env, "RANK", context, TORCHRUN_FIX)
    world_size = _int(env, "WORLD_SIZE", context, TORCHRUN_FIX)
    if not _present(env, "MASTER_ADDR"):
        raise LaunchEnvError(f"{context}: MASTER_ADDR is not set; {TORCHRUN_FIX}")
    if not _present(env, "MASTER_PORT"):
        raise LaunchEnvError(f"{context}: MASTER_PORT is not set; {TORCHRUN_FIX}")
    port = _port(env["MASTER_PORT"], "MASTER_PORT", context, TORCHRUN_FIX)
    # torchrun always sets both; a hand-made environment without them is taken as one node.
    local_rank = _parse_int(env.get("LOCAL_RANK") or str(rank), "LOCAL_RANK", context, TORCHRUN_FIX)
    local_size = _parse_int(
        env.get("LOCAL_WORLD_SIZE") or str(world_size), "LOCAL_WORLD_SIZE", context, TORCHRUN_FIX
    )
    launch = LaunchEnv(rank, world_size, local_rank, local_size, env["MASTER_ADDR"].strip(), port, "torchrun")
    return _check(launch, context, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), TORCHRUN_FIX)


# ---------------------------------------------------------------------------- MPI


def _mpi_comm_world(why: str) -> Any:
    """``mpi4py.MPI.COMM_WORLD`` (initialises MPI), or a LaunchEnvError with the install fix."""
    try:
        from mpi4py import MPI
    except (ImportError, OSError, RuntimeError) as exc:
        raise LaunchEnvError(
            f"mpirun launch ({why}): mpi4py cannot be imported ({exc}); {MPI_FIX}; "
            f"or {MPI_ADDR_FIX} to skip mpi4py"
        ) from exc
    return MPI.COMM_WORLD


def _local_from_hosts(hostnames: list[str], rank: int) -> tuple[int, int]:
    """Rank and count among the ranks on this rank's host, from every rank's hostname."""
    mine = hostnames[rank]
    return sum(1 for host in hostnames[:rank] if host == mine), hostnames.count(mine)


def _host_address(hostname: str) -> Optional[str]:
    """A non-loopback IPv4 address of ``hostname``, or None when it resolves to none."""
    try:
        addr = socket.gethostbyname(hostname)
    except OSError:
        addr = None
    if addr and not _is_loopback(addr):
        return addr
    try:
        infos = socket.getaddrinfo(hostname, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        candidate = str(info[4][0])
        if not _is_loopback(candidate):
            return candidate
    return None


def _mpi_rendezvous(
    comm: Any, hostnames: list[str], addr: Optional[str], port: Optional[int]
) -> tuple[str, int]:
    """Rank 0 picks the address (127.0.0.1 when all ranks share a host) and a free port; all get them."""
    payload: tuple[Optional[str], Optional[int], Optional[str]] = (None, None, None)
    if comm.Get_rank() == 0:
        error = None
        if addr is None:
            if len(set(hostnames)) == 1:
                addr = LOOPBACK
            else:
                addr = _host_address(hostnames[0])
                if addr is None:
                    error = (
                        f"mpirun launch: rank 0's host {hostnames[0]!r} does not resolve to an address "
                        f"the other hosts can reach; {MPI_ADDR_FIX}"
                    )
        if port is None and error is None:
            port = free_port()
        payload = (addr, port, error)
    addr, port, error = comm.bcast(payload, root=0)
    if error is not None:
        raise LaunchEnvError(error)
    assert addr is not None and port is not None
    return addr, port


def _from_mpi(env: Mapping[str, str], use_mpi: Optional[bool], openmpi: bool) -> LaunchEnv:
    """OpenMPI's OMPI_COMM_WORLD_* or MPICH-like PMI_* variables; rendezvous via mpi4py."""
    if openmpi:
        names = (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        )
    else:
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    context = "mpirun launch"
    fix = "launch with mpirun -np N"
    rank = _int(env, names[0], context, fix)
    world_size = _int(env, names[1], context, fix)
    addr = env["MASTER_ADDR"].strip() if _present(env, "MASTER_ADDR") else None
    port = (
        _port(env["MASTER_PORT"], "MASTER_PORT", context, MPI_ADDR_FIX)
        if _present(env, "MASTER_PORT")
        else None
    )
    have_local = _present(env, names[2]) and _present(env, names[3])

    missing = [n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if v is None]
    missing += [n for n in names[2:] if not _present(env, n)]
    if use_mpi is False and missing:
        raise LaunchEnvError(
            f"{context} without mpi4py (use_mpi=False): {', '.join(missing)} not set; "
            f"{MPI_ADDR_FIX}, or allow mpi4py ({MPI_FIX})"
        )

    if use_mpi or missing:
        why = f"{names[0]} set, {', '.join(missing)} to be found over MPI" if missing else "use_mpi=True"
        comm = _mpi_comm_world(why)
        if (int(comm.Get_rank()), int(comm.Get_size())) != (rank, world_size):
            raise LaunchEnvError(
                f"{context}: {names[0]}={rank}, {names[1]}={world_size} disagree with MPI.COMM_WORLD "
                f"(rank {comm.Get_rank()} of {comm.Get_size()}): the variables are stale (this process "
                f"was not started by mpirun) or mpi4py uses a different MPI than that mpirun; "
                f"launch with mpirun, or rebuild mpi4py against it "
                f"(pip install --no-cache-dir --force-reinstall mpi4py)"
            )
        hostnames = [str(host) for host in comm.allgather(socket.gethostname())]
        if have_local:
            local_rank = _int(env, names[2], context, fix)
            local_size = _int(env, names[3], context, fix)
        else:
            local_rank, local_size = _local_from_hosts(hostnames, rank)
        addr, port = _mpi_rendezvous(comm, hostnames, addr, port)
    else:
        local_rank = _int(env, names[2], context, fix)
        local_size = _int(env, names[3], context, fix)
    assert addr is not None and port is not None
    launch = LaunchEnv(rank, world_size, local_rank, local_size, addr, port, "mpirun")
    return _check(launch, context, names, fix)


# ---------------------------------------------------------------------------- Slurm

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str, what: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"Slurm nodelist {what!r}: nested '[' is not valid")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"Slurm nodelist {what!r}: unbalanced ']'")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchEnvError(f"Slurm nodelist {what!r}: unbalanced '['")
    parts.append(text[start:])
    return parts


def _parse_ranges(body: str, what: str) -> list[tuple[int, int, int]]:
    """'01-03,7' -> [(1, 3, 2), (7, 7, 1)]: (first, last, zero-padded width) per item."""
    ranges: list[tuple[int, int, int]] = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if match is None:
            raise LaunchEnvError(f"Slurm nodelist {what!r}: bad range {item!r} in '[{body}]'")
        lo_text, hi_text = match.group(1), match.group(2) or match.group(1)
        if int(hi_text) < int(lo_text):
            raise LaunchEnvError(f"Slurm nodelist {what!r}: descending range {item!r}")
        ranges.append((int(lo_text), int(hi_text), len(lo_text)))
    return ranges


def _iter_ranges(ranges: list[tuple[int, int, int]]) -> Iterator[str]:
    """The numbers of parsed ranges as strings, keeping each range's zero padding."""
    for lo, hi, width in ranges:
        for number in range(lo, hi + 1):
            yield str(number).zfill(width)


def _expand_pattern(pattern: str, what: str) -> Iterator[str]:
    """'rack[1-2]-n[01-02]' -> rack1-n01, rack1-n02, rack2-n01, rack2-n02, lazily."""
    pieces: list[str | list[tuple[int, int, int]]] = []
    pos = 0
    for match in re.finditer(r"\[([^\]]*)\]", pattern):
        pieces += [pattern[pos : match.start()], _parse_ranges(match.group(1), what)]
        pos = match.end()
    pieces.append(pattern[pos:])

    def expand(index: int) -> Iterator[str]:
        """Hosts built from pieces[index:]."""
        if index == len(pieces):
            yield ""
            return
        piece = pieces[index]
        for head in [piece] if isinstance(piece, str) else _iter_ranges(piece):
            for tail in expand(index + 1):
                yield head + tail

    return expand(0)


def _iter_nodelist(nodelist: str) -> Iterator[str]:
    """Hosts of a Slurm hostlist expression, in order."""
    text = nodelist.strip()
    if not text:
        raise LaunchEnvError("Slurm nodelist is empty")
    for part in _split_top(text, nodelist):
        part = part.strip()
        if not part:
            raise LaunchEnvError(f"Slurm nodelist {nodelist!r}: empty entry")
        yield from _expand_pattern(part, nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as 'node[01-03,07],gpu5' into host names."""
    return list(_iter_nodelist(nodelist))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist ('node[01-03],gpu5' -> 'node01'), without scontrol."""
    return next(_iter_nodelist(nodelist))


def parse_tasks_per_node(value: str) -> list[int]:
    """Expand Slurm's tasks-per-node syntax: '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise LaunchEnvError(
                f"Slurm tasks per node {value!r}: cannot parse {item!r} (expected e.g. '4(x2),3')"
            )
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _slurm_local_size(env: Mapping[str, str], context: str) -> int:
    """Tasks on this node: step tasks-per-node list, SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if not _present(env, name):
            continue
        counts = parse_tasks_per_node(env[name])
        if len(set(counts)) == 1:
            return counts[0]
        node_id = _int(env, "SLURM_NODEID", context, f"needed to index {name}={env[name]!r}; {SLURM_FIX}")
        if not 0 <= node_id < len(counts):
            raise LaunchEnvError(f"{context}: SLURM_NODEID={node_id} is outside {name}={env[name]!r}")
        return counts[node_id]
    raise LaunchEnvError(
        f"{context}: SLURM_NTASKS_PER_NODE and SLURM_TASKS_PER_NODE are not set; {SLURM_FIX}"
    )


def _from_slurm(env: Mapping[str, str]) -> LaunchEnv:
    """SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, tasks per node and the nodelist of an srun step."""
    context = "Slurm launch"
    rank = _int(env, "SLURM_PROCID", context, SLURM_FIX)
    size_name = (
        "SLURM_NTASKS"
        if _present(env, "SLURM_NTASKS") or not _present(env, "SLURM_NPROCS")
        else "SLURM_NPROCS"
    )
    world_size = _int(env, size_name, context, SLURM_FIX)
    if world_size > 1 and not (_present(env, "SLURM_STEP_ID") or _present(env, "SLURM_STEPID")):
        raise LaunchEnvError(
            f"{context}: SLURM_PROCID is set but SLURM_STEP_ID is not, so this is the batch script itself, "
            f"not one of {world_size} srun tasks; start the job with `srun attnres-pretrain ...`"
        )
    local_rank = _int(env, "SLURM_LOCALID", context, SLURM_FIX)
    # A step may run fewer tasks than the allocation's per-node count (srun -n 1).
    local_size = min(_slurm_local_size(env, context), world_size)

    # srun's default block distribution puts task 0 on the first node of the step; set
    # MASTER_ADDR when another distribution (arbitrary, cyclic over a hostfile) moves it.
    if _present(env, "MASTER_ADDR"):
        addr = env["MASTER_ADDR"].strip()
    else:
        for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
            if _present(env, name):
                addr = first_host(env[name])
                break
        else:
            raise LaunchEnvError(
                f"{context}: SLURM_NODELIST / SLURM_JOB_NODELIST is not set; {SLURM_FIX}, or set MASTER_ADDR"
            )
    if _present(env, "MASTER_PORT"):
        port = _port(env["MASTER_PORT"], "MASTER_PORT", context, "set MASTER_PORT to a free TCP port")
    else:
        job_name = "SLURM_JOB_ID" if _present(env, "SLURM_JOB_ID") else "SLURM_JOBID"
        if _present(env, job_name):
            job_id = _parse_int(env[job_name], job_name, context, "set MASTER_PORT instead")
            port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
        else:
            port = SLURM_DEFAULT_PORT
    launch = LaunchEnv(rank, world_size, local_rank, local_size, addr, port, "slurm")
    names = ("SLURM_PROCID", size_name, "SLURM_LOCALID", "SLURM tasks per node")
    return _check(launch, context, names, SLURM_FIX)


# ---------------------------------------------------------------------------- single process


def _single(env: Mapping[str, str]) -> LaunchEnv:
    """One process: rank 0 of 1 on 127.0.0.1 (or MASTER_ADDR) and a free port (or MASTER_PORT)."""
    addr = env["MASTER_ADDR"].strip() if _present(env, "MASTER_ADDR") else LOOPBACK
    if _present(env, "MASTER_PORT"):
        port = _port(
            env["MASTER_PORT"], "MASTER_PORT", "single-process launch", "set MASTER_PORT to a free TCP port"
        )
    else:
        port = free_port(LOOPBACK)
    return LaunchEnv(0, 1, 0, 1, addr, port, "single")
