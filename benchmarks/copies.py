"""The exact-copy invariants, checked on a store after crashes (crash.py) or storage
faults (faults.py): no exact record names a missing archive, every step listed as
exact restores bit for bit to what was pushed for it (or, where the checker does not
hold the pushed checkpoint, to what it restored to the first time, its content digest
matching its record's), its lossy restore has the same tensors, and the run keeps no
more exact steps than a push may leave behind."""

from __future__ import annotations

from excp import api
from excp.chain import Chain
from excp.codec.exact import content_digest
from excp.errors import NotFound
from excp.exact import ExactCopies
from excp.store import Store


def pushed_digest(checkpoint) -> str:
    """The content digest an exact restore of ``checkpoint`` (a path, dict or bundle)
    must have: the one its exact copy's record holds."""
    return content_digest(api.to_bundle(checkpoint))


def check_copies(store: Store, run: str, keep: int, pushed: dict[tuple[str, int], str],
                 seen: dict[tuple[str, int], str]) -> tuple[list[str], int]:
    """Check ``run``'s exact copies; ``pushed`` holds the content digests of checkpoints
    known to have been pushed, ``seen`` what exact steps restored to before (filled in
    here). Returns the violations and how many exact steps exceed ``keep``: one push
    killed after its record and before it dropped the oldest copy leaves one extra,
    which the run's next push drops, so only more than that is a violation."""
    try:
        chain = Chain(store, run)
        chain.config()
    except NotFound:
        return [], 0
    problems = []
    copies = ExactCopies(store, run)
    for record in copies.records():
        if not store.exists(record.archive):
            problems.append(f"{run} step {record.step}: exact record names a missing {record.archive}")
    steps = api.exact_steps(run, store=store)
    for step in steps:
        exact = api.restore(run, step, store=store)
        lossy = api.restore(run, step, store=store, lossy=True)
        record = copies.of(chain.commit(step))
        content = content_digest(exact)
        if record is None or content != record.content:
            problems.append(f"{run} step {step}: exact restore's content digest is not its record's")
        expected = pushed.get((run, step)) or seen.setdefault((run, step), content)
        if content != expected:
            problems.append(f"{run} step {step}: exact restore differs from the pushed or first restore")
        if {n: e.tensor.shape for n, e in exact.tensors.items()} != \
                {n: e.tensor.shape for n, e in lossy.tensors.items()}:
            problems.append(f"{run} step {step}: exact and lossy restores hold different tensors")
    excess = max(0, len(steps) - keep)
    if excess > 1:
        problems.append(f"{run}: {len(steps)} exact steps, more than {keep} + 1")
    return problems, excess
