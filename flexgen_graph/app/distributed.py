"""Runs over several processes on torch.distributed, launched by torchrun.

Data parallel (a plain plan): every rank replays the same plan over its shard of the input.

    torchrun --nnodes N --nproc-per-node G -m flexgen_graph run --plan P --input in.jsonl --output out.jsonl

Pipeline (a plan compiled with --stages S; `Pipeline` below): rank i runs stage i of every block, so
the world size must be S. Every rank reads the whole input; rank 0 writes the output file (with a
single run's crash safety and resume), the others learn from it which ids are done.

Sharding: an input line belongs to rank sha256(key) mod world size, its key being jobs.line_key (the
JSON of its id, or "line:N" for a line without a valid id). The hash is stable across processes and
machines (unlike Python's salted hash()), so a re-launch with the same world size gives every rank the
same lines again and each resumes its own shard.

Files: rank R of W writes OUTPUT.shards/rank-R-of-W.jsonl with a single run's crash safety
(jobs.OutputFile: whole fsynced records, torn-line repair, resume). When every rank has reported its
shard finished (an all-gather, which is also the barrier), rank 0 appends the shards' records to
OUTPUT in rank order, skipping keys OUTPUT already holds, then deletes the shards. A rank that dies
loses only its block in flight; re-launching resumes every shard, and keys already in OUTPUT (an
earlier merge cut short, or a single-process run) are skipped, so each id ends up in OUTPUT once.

The ranks exchange only a few small objects (the barrier, summaries), over gloo; on a GPU the
process group also gets nccl for CUDA tensors, as torch recommends. With several machines, OUTPUT must
be on a folder they all share: rank 0 checks that it sees every rank's shard before generating.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

from flexgen_graph.app.jobs import JobSummary, OutputFile, OutputLock, answer_key, done_keys, errors_path
from flexgen_graph.errors import UserError
from flexgen_graph.hardware import usable_cores

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The final barrier waits for the slowest shard, which on a long job can finish hours after the
# others; a rank that dies is caught by torchrun, which tears the whole group down.
FINISH_TIMEOUT = timedelta(days=7)
SHARD_NAME = re.compile(r"rank-(\d+)-of-(\d+)\.jsonl")
MERGE_BATCH = 4096  # records appended per fsync while merging


class LaunchError(UserError):
    """The process was not launched the way a distributed run needs (torchrun's variables)."""


class ShardMismatchError(UserError):
    """Shards on disk that this launch cannot resume (another world size)."""


class PeerLostError(ConnectionError):
    """Another rank went away while this one waited for it."""


@dataclass(frozen=True, slots=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int  # index on this machine: picks cuda:LOCAL_RANK
    local_world_size: int  # processes on this machine: they share its cores


def from_env(required: bool, env: Mapping[str, str] = os.environ) -> Rank | None:
    """This process's place in a torchrun launch, or None for a plain single-process run.

    A launch is recognized by RANK and WORLD_SIZE (torchrun sets them); required (--distributed)
    turns their absence into an error."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        if not required:
            return None
        raise LaunchError("--distributed needs torchrun's environment (RANK, WORLD_SIZE, ...): launch with "
                          "`torchrun --nproc-per-node G -m flexgen_graph run ...`")
    missing = [v for v in LAUNCH_VARS if v not in env]
    if missing:
        raise LaunchError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: launch with torchrun, "
                          "which sets them all")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        try:
            values[name] = int(env[name])
        except ValueError:
            raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    rank = Rank(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if not (0 <= rank.rank < rank.world_size and 0 <= rank.local_rank < rank.local_world_size <= rank.world_size):
        raise LaunchError(f"inconsistent launch: RANK {rank.rank}, WORLD_SIZE {rank.world_size}, "
                          f"LOCAL_RANK {rank.local_rank}, LOCAL_WORLD_SIZE {rank.local_world_size}")
    return rank


def shard_of(key: str, world_size: int) -> int:
    """The rank a line's key belongs to: a stable hash, the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % world_size


def shard_folder(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_path(output: Path, rank: int, world_size: int) -> Path:
    return shard_folder(output) / f"rank-{rank}-of-{world_size}.jsonl"


def check_resumable(output: Path, world_size: int) -> None:
    """Refuse shards left by a launch of another world size: their lines were split another way."""
    folder = shard_folder(output)
    if not folder.is_dir():
        return
    sizes = {int(m.group(2)) for p in folder.iterdir() if (m := SHARD_NAME.fullmatch(p.name))}
    other = sorted(sizes - {world_size})
    if other:
        raise ShardMismatchError(
            f"{folder} holds the unfinished shards of a run with {other[0]} processes, not {world_size}: re-launch "
            f"with {other[0]} processes in all (e.g. torchrun --nproc-per-node {other[0]} ...) to resume and merge "
            f"them, or delete {folder} to generate those prompts again")


@dataclass(frozen=True, slots=True)
class Shard:
    """One rank's part of a distributed run: where it writes, which lines are its, what is done."""
    output: Path  # the merged file rank 0 writes
    rank: Rank

    @classmethod
    def for_output(cls, output: str | None, rank: Rank) -> "Shard":
        """Checks --output and leftover shards before the rendezvous, so a bad launch fails at once."""
        if not output:
            raise UserError("a distributed run writes one shard per rank and merges them: pass --output FILE")
        path = Path(output)
        if not path.parent.is_dir():
            raise UserError(f"--output {path}: folder {path.parent} does not exist")
        check_resumable(path, rank.world_size)
        return cls(path, rank)

    @property
    def path(self) -> Path:
        return shard_path(self.output, self.rank.rank, self.rank.world_size)

    def mine(self, key: str) -> bool:
        return shard_of(key, self.rank.world_size) == self.rank.rank

    def lock(self) -> OutputLock:
        """This rank's shard, owned by this process from before any work (a second launch fails at once)."""
        shard_folder(self.output).mkdir(exist_ok=True)
        return OutputLock(self.path)

    def open(self) -> OutputFile:
        shard_folder(self.output).mkdir(exist_ok=True)
        return OutputFile(self.path)

    def done_in_output(self) -> frozenset[str]:
        """Keys the merged output already holds. Read only: rank 0 repairs a torn tail when it merges."""
        return frozenset(done_keys(self.output.read_bytes())) if self.output.exists() else frozenset()

    def offload_dir(self, given: str | None) -> str | None:
        # ranks on one machine would overwrite each other's scratch files (named by buffer) in one folder
        return str(Path(given) / f"rank-{self.rank.rank}") if given else None

    def check_visible(self) -> None:
        """After every rank opened its shard: rank 0 must see them all, or it could not merge them."""
        sync()
        missing = None
        if self.rank.rank == 0:
            missing = [r for r in range(self.rank.world_size)
                       if not shard_path(self.output, r, self.rank.world_size).exists()]
        missing = gather(missing)[0]
        if missing:
            raise UserError(f"rank 0 ({socket.gethostname()}) does not see the shards of rank(s) {missing} under "
                             f"{shard_folder(self.output)}: with several machines, --output must be on a folder "
                             "they all share")


def start(rank: Rank, cuda: bool) -> None:
    """The rendezvous (torchrun's MASTER_ADDR/MASTER_PORT): gloo, plus nccl for CUDA tensors on a GPU."""
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank.rank, world_size=rank.world_size,
                            timeout=FINISH_TIMEOUT)


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any) -> list[Any]:
    """Every rank's obj, on every rank. torch picks the gloo (CPU) side of the group for objects."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as e:  # gloo reports a vanished peer as a bare RuntimeError
        # the usual cause is another rank that failed first: its own error is the one to read
        raise PeerLostError(f"rank {dist.get_rank()}: another rank went away while this one waited for it; its own "
                            "error says why (torchrun names the rank that failed first). gloo: "
                            + str(e).splitlines()[0].split(". This is typically")[0]) from None
    return out


def sync() -> None:
    gather(None)  # a barrier that stays on gloo (dist.barrier would pick nccl on a GPU)


@contextmanager
def leaders_first(rank: Rank | None) -> Iterator[None]:
    """Run the block on rank 0, then on the first rank of each other machine, then on the rest.

    Importing weights and compiling a plan write into the cache folder, which two processes must
    not write at once; later ones find the results cached, whether machines share the folder or not."""
    if rank is None:
        yield
        return
    turn = 0 if rank.rank == 0 else 1 if rank.local_rank == 0 else 2
    for phase in range(3):
        if phase == turn:
            yield
        sync()


def pick_device(rank: Rank, plan, requested: str) -> str:
    """cuda bound to cuda:LOCAL_RANK when the plan is for a GPU and CUDA is visible (or --device cuda);
    else cpu, with this rank's share of the cores as torch threads (ranks on one machine share them,
    and more threads than cores make each matmul wait for the others)."""
    import torch

    if requested == "cuda" or (requested == "auto" and plan.profile.has_gpu and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        if rank.local_rank >= n:
            raise LaunchError(f"LOCAL_RANK {rank.local_rank} needs a CUDA device but {n} are visible: launch at "
                              f"most {n} processes per machine (--nproc-per-node {n})")
        torch.cuda.set_device(rank.local_rank)
        return "cuda"
    torch.set_num_threads(max(1, usable_cores() // rank.local_world_size))
    return "cpu"


def combine(summaries: list[JobSummary]) -> JobSummary:
    """The run's summary from the ranks': counts add up, the wall time is the slowest rank's."""
    total = JobSummary()
    for s in summaries:
        total.prompts += s.prompts
        total.errors += s.errors
        total.skipped += s.skipped
        total.tokens += s.tokens
        total.wall_s = max(total.wall_s, s.wall_s)
        total.interrupted |= s.interrupted
        for x in s.predicted_tokens_per_s:
            if x not in total.predicted_tokens_per_s:
                total.predicted_tokens_per_s.append(x)
        for tier, n in s.peak_bytes.items():
            total.peak_bytes[tier] = max(total.peak_bytes.get(tier, 0), n)
        for r in s.plans:  # the ranks ran their blocks at once: a plan's time is its slowest rank's
            mine = next((x for x in total.plans if (x.prompt_len, x.gen_len) == (r.prompt_len, r.gen_len)), None)
            if mine is None:
                total.plans.append(dataclasses.replace(r, blocks=list(r.blocks)))
                continue
            mine.blocks += r.blocks
            mine.tokens += r.tokens
            mine.block_s, mine.predicted_s = max(mine.block_s, r.block_s), max(mine.predicted_s, r.predicted_s)
    total.plans.sort(key=lambda x: (x.prompt_len, x.gen_len))
    return total


@dataclass(frozen=True, slots=True)
class Merged:
    appended: int  # records moved from the shards into the output
    already: int  # records the output held already (a merge cut short and re-run)


def merge(output: Path, world_size: int) -> Merged:
    """Append every shard's answers to output, each id once, and their error records to output's errors
    file (rewritten), then delete the shards.

    Safe to cut short anywhere: the shards stay until the output holds all their records, and a
    re-run skips the ids the output already answers (OutputFile cuts a torn last line first)."""
    out = OutputFile(output)
    appended = already = 0
    try:
        for r in range(world_size):
            path = shard_path(output, r, world_size)
            batch: list[str] = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    key = answer_key(json.loads(line)) if line.endswith("\n") else None
                    if key is None:
                        raise UserError(f"{path} line {n} is not a whole answer record although rank {r} finished: "
                                        "the shard was changed by something else; delete it and re-launch to "
                                        "regenerate it")
                    if key in out.done:
                        already += 1
                        continue
                    out.done.add(key)
                    batch.append(line)
                    if len(batch) >= MERGE_BATCH:
                        out.write_lines(batch)
                        appended, batch = appended + len(batch), []
            out.write_lines(batch)
            appended += len(batch)
        for r in range(world_size):
            errs = errors_path(shard_path(output, r, world_size))
            if errs.is_file():
                out.write_error_lines(errs.read_text(encoding="utf-8").splitlines(keepends=True))
    finally:
        out.close()
    for r in range(world_size):
        shard_path(output, r, world_size).unlink()
        errors_path(shard_path(output, r, world_size)).unlink(missing_ok=True)
    folder = shard_folder(output)
    if not any(folder.iterdir()):  # a file someone else put there stays, with its folder
        folder.rmdir()
    return Merged(appended, already)


def finish(shard: Shard, summary: JobSummary) -> tuple[JobSummary, Merged | None]:
    """Report this rank's shard finished; once all are (the all-gather is the barrier), rank 0
    merges. The run's combined summary, and on rank 0 what the merge did."""
    summaries = gather(summary)
    merged = merge(shard.output, shard.rank.world_size) if shard.rank.rank == 0 else None
    return combine(summaries), merged


@dataclass(frozen=True, slots=True)
class Pipeline:
    """This process's part of a pipeline run: stage `rank.rank` of every plan in the file."""

    rank: Rank
    output: Path | None

    @classmethod
    def for_launch(cls, rank: Rank | None, stages: int, output: str | None) -> "Pipeline":
        """Checks the launch before the rendezvous, so a bad one fails at once with what to do."""
        if rank is None:
            raise LaunchError(f"the plan is a pipeline of {stages} stages: launch it with torchrun, one process per "
                              f"stage (torchrun --nproc-per-node {stages} -m flexgen_graph run --plan ...)")
        if rank.world_size != stages:
            raise LaunchError(f"the plan is a pipeline of {stages} stages but {rank.world_size} processes were "
                              f"launched: launch {stages} in all, or compile the plan with --stages {rank.world_size}")
        path = Path(output) if output else None
        if path is not None and not path.parent.is_dir():
            raise UserError(f"--output {path}: folder {path.parent} does not exist")
        return cls(rank, path)

    def same_plans(self, plans: list | None) -> list:
        """Stage 0's plans (given, or compiled by stage 0 alone) on every stage: two loads of one file on two
        machines, or two compiles (a profile measured on the spot: free disk space moves) could differ, and
        stages of two plans must never meet."""
        from flexgen_graph import planfile

        data = gather(planfile.dumps_set(plans) if self.rank.rank == 0 else None)[0]
        return planfile.loads_set(data, "stage 0's plan")

    def my_stages(self, plans: list) -> list:
        return [p for p in plans if p.stage.index == self.rank.rank]

    def link(self, plan):
        from runtime.stage_link import StageLink

        return StageLink(plan.stage)

    def offload_dir(self, given: str | None) -> str | None:
        return str(Path(given) / f"stage-{self.rank.rank}") if given else None

    def open_output(self) -> tuple[OutputFile, frozenset[str]]:
        """Rank 0's output file (others write nothing), and on the others the keys it already holds, so
        that every stage skips the same lines of a resumed run."""
        out = OutputFile(self.output if self.rank.rank == 0 else None)
        done = gather(sorted(out.done) if self.rank.rank == 0 else None)[0]
        return out, frozenset() if self.rank.rank == 0 else frozenset(done)

    def agree(self, stop: list[int]) -> bool:
        """Whether any stage was asked to stop (`stop`: the signals this one got): all stop at the same block
        boundary, or none; a stage that got no signal records the first one another stage got."""
        signals = [sig for sig in gather(stop[0] if stop else 0) if sig]
        if signals and not stop:
            stop.append(signals[0])
        return bool(signals)
