"""The long fault runs, one kind at a time; each prints its report as JSON and exits 1 if it
found a fault not survived.

    python -m loraplex.faults soak [--requests 10000] [--tenants 16] [--concurrency 32]
    python -m loraplex.faults crash [--rounds 3]
    python -m loraplex.faults disk-full [--rounds 3]   (as root: it mounts a small tmpfs)
    python -m loraplex.faults corrupt [--rounds 3]
    python -m loraplex.faults fuzz [--examples 1000] [--seed 0] [--targets chat_completions,...]
    python -m loraplex.faults stateful [--examples 1000] [--seed 0]

Each run works in a fresh temp dir (kept with --keep, to read its serve.log), on a tiny random
model built there (seconds); nothing is downloaded.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def _soak(options, root: Path) -> dict:
    from loraplex.faults.soak import run_soak

    report = run_soak(root, num_requests=options.requests, num_tenants=options.tenants,
                      concurrency=options.concurrency, seed=options.seed)
    result = report.as_dict()
    result["engine_end"] = {k: result["engine_end"].get(k) for k in (
        "running", "waiting", "kv_blocks_free", "kv_blocks_total", "adapters_loading",
        "generated_tokens", "steps", "slot_misses", "host_misses")}
    return result


def _crash(options, root: Path) -> dict:
    from loraplex.faults.crash import run_crash

    return run_crash(root, rounds=options.rounds).as_dict()


def _fuzz(options, root: Path) -> dict:
    from loraplex.faults.fuzz import run_fuzz

    targets = tuple(options.targets.split(",")) if options.targets else None
    return run_fuzz(root, options.examples, options.seed, targets=targets).as_dict()


def _stateful(options, root: Path) -> dict:
    from loraplex.faults.api_stateful import run_stateful

    return run_stateful(root, options.examples, options.seed).as_dict()


def _disk_full(options, root: Path) -> dict:
    from loraplex.faults.disk_full import run_disk_full

    return run_disk_full(root, rounds=options.rounds).as_dict()


def _corrupt(options, root: Path) -> dict:
    from loraplex.faults.corruption import run_corruption

    return run_corruption(root, rounds=options.rounds).as_dict()


KINDS = {"soak": _soak, "crash": _crash, "fuzz": _fuzz, "stateful": _stateful,
         "disk-full": _disk_full, "corrupt": _corrupt}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.faults",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--requests", type=int, default=10_000, help="soak: requests in all")
    parser.add_argument("--tenants", type=int, default=16, help="soak: tenants")
    parser.add_argument("--concurrency", type=int, default=32, help="soak: clients at once")
    parser.add_argument("--seed", type=int, default=0, help="the run's random choices")
    parser.add_argument("--examples", type=int, default=1000,
                        help="fuzz: inputs per target; stateful: scenarios")
    parser.add_argument("--targets", default="", help="fuzz: only these targets (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="crash: kills of each kind; disk-full, corrupt: rounds")
    parser.add_argument("--keep", action="store_true", help="keep the run's temp dir")
    options = parser.parse_args(argv)
    if min(options.requests, options.tenants, options.concurrency, options.rounds,
           options.examples) < 1:
        parser.error("counts must be at least 1")
    root = Path(tempfile.mkdtemp(prefix=f"loraplex-faults-{options.kind}-"))
    try:
        result = KINDS[options.kind](options, root)
    except ValueError as e:  # an option the run itself refused, e.g. an unknown fuzz target
        parser.error(str(e))
    finally:
        if options.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
