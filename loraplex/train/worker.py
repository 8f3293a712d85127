"""One training job in its own process: `python -m loraplex.train.worker` (started by jobs.py).

Reads the job as one JSON object on stdin, trains, and reports on stdout as JSON lines:
{"event": "progress", "phase", "step", "num_steps", "loss"} while it runs, and
{"event": "checkpoint", "step", "train_loss", "eval_loss"} at each epoch's end, then exactly one
{"event": "done", "version": N, "label": "vN", "trained_tokens": T} or
{"event": "error", "message": "..."}.
A process of its own keeps the server's event loop and engine free of training work, lets a
job be cancelled with SIGTERM (the trainer then unwinds and registers nothing), and keeps a
crash in training from touching the server.
"""

import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """SIGTERM this worker when the server that started it dies (even by SIGKILL), so it never
    registers a version for a job the restarted server reports as failed; the trainer unwinds
    on SIGTERM and registers nothing. Linux only; elsewhere the broken stdout pipe stops the
    worker at its next progress report."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the server died before the call: nobody to work for
        os.kill(os.getpid(), signal.SIGTERM)


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    from loraplex.model.pull import PullError
    from loraplex.storage import full_disk_as
    from loraplex.train import train_adapter

    die_with_parent()
    job = json.loads(sys.stdin.read())

    def on_progress(phase: str, step: int, num_steps: int, loss: float | None) -> None:
        emit({"event": "progress", "phase": phase, "step": step, "num_steps": num_steps,
              "loss": loss})

    def on_checkpoint(step: int, train_loss: float, eval_loss: float | None) -> None:
        emit({"event": "checkpoint", "step": step, "train_loss": train_loss,
              "eval_loss": eval_loss})

    try:
        # Storing the new version may find no room (a file, the registry's commit): say so.
        with full_disk_as("storing the trained adapter"):
            version = train_adapter(Path(job.pop("home")), job.pop("tenant"), **job,
                                    progress=False, on_progress=on_progress,
                                    on_checkpoint=on_checkpoint)
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        emit({"event": "error", "message": str(e)})
        return 1
    except KeyboardInterrupt:
        emit({"event": "error", "message": "cancelled: no version was created"})
        return 1
    except Exception as e:  # a bug: the server shows the message, the log gets the traceback
        traceback.print_exc()
        emit({"event": "error", "message": f"internal error: {type(e).__name__}: {e}"})
        return 1
    emit({"event": "done", "version": version.number, "label": version.label,
          "trained_tokens": version.training_record["trained_tokens"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
