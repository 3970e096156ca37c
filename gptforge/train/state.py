"""What a resumable checkpoint holds besides the weights and the optimizer, and how a resume reads it back.

trainer/state.json = the `TrainState` fields (step, tokens, best validation loss, patience, elapsed time)
+ the state of every other stateful part of a run: the data cursor (`train_batches`), the random generators
(`rng`: rank 0's, `rng_ranks`: every rank's), the float16 loss scaler, and the shape of the run that wrote it
(`world_size`, `tokens_per_step`) so a resume can say what changed.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Optional

import torch

from gptforge.common import Runtime, UserError
from gptforge.config import TrainConfig


@dataclass
class TrainState:
    """Progress of a run; with the model, optimizer, data cursor and RNG, exactly what `latest` saves."""

    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Tokens trained on (targets counted; all ranks)."""
    best_val_loss: Optional[float] = None
    """Lowest validation loss so far (the `best` checkpoint's)."""
    evals_since_best: int = 0
    """Evaluations without improvement (early-stopping patience used)."""
    elapsed_s: float = 0.0
    """Training time so far, summed over every resume."""

    @classmethod
    def from_saved(cls, saved: dict, tokens_per_step: int) -> "TrainState":
        """From a checked trainer/state.json (see trainer_state.check_trainer_state); checkpoints written
        before tokens were counted estimate them from the steps."""
        return cls(step=saved["step"], tokens=saved.get("tokens", saved["step"] * tokens_per_step),
                   best_val_loss=saved["best_val_loss"], evals_since_best=saved["evals_since_best"],
                   elapsed_s=saved["elapsed_s"])


def keep_global_batch(tc: TrainConfig, saved: dict, block_size: int, world_size: int) -> TrainConfig:
    """A resumed run keeps the global batch it was saved with (tokens per optimizer step), on any number of
    processes: gradient accumulation makes up the difference. A different one is refused, in one line saying
    both, unless --train.allow_batch_change."""
    was = saved.get("tokens_per_step")
    per_micro = tc.micro_batch_size * block_size * world_size
    asked = tc.tokens_per_step or per_micro
    if was is None or (tc.allow_batch_change and tc.tokens_per_step is not None):
        return tc
    if tc.tokens_per_step is not None and asked != was and not tc.allow_batch_change:
        raise UserError(f"the run was saved training {was:,} tokens per step (on {saved.get('world_size', 1)} "
                        f"processes); this command asks for train.tokens_per_step {asked:,}: resume with "
                        f"--train.tokens_per_step {was}, or change it on purpose with --train.allow_batch_change true")
    if was % per_micro:
        if tc.allow_batch_change:
            return tc
        fits = [m for m in range(1, tc.micro_batch_size + 1) if was % (m * block_size * world_size) == 0]
        hint = f"--train.micro_batch_size {fits[-1]}" if fits else "another number of processes"
        raise UserError(f"the run was saved training {was:,} tokens per step, which is not a whole number of "
                        f"micro-batches of micro_batch_size {tc.micro_batch_size} x block_size {block_size} x "
                        f"{world_size} processes = {per_micro:,} tokens; use {hint} (or change the global batch "
                        "with --train.allow_batch_change true)")
    return dataclasses.replace(tc, tokens_per_step=was)


def trainer_state_dict(state: TrainState, runtime: Runtime, train_batches, scaler, tokens_per_step: int,
                       gather_rng: bool = True) -> dict:
    """trainer/state.json of a checkpoint. With gather_rng under several processes, every rank's RNG state
    is gathered (a collective: every rank calls it); without, only this rank's is kept."""
    rng = rng_state()
    ranks = [rng]
    if runtime.distributed and gather_rng:
        import torch.distributed as dist

        ranks = [None] * runtime.world_size
        dist.all_gather_object(ranks, rng)
    return {**dataclasses.asdict(state), "world_size": runtime.world_size, "tokens_per_step": tokens_per_step,
            "train_batches": train_batches.state_dict(), "rng": rng, "rng_ranks": ranks,
            "scaler": scaler.state_dict()}


def restore_rng(saved: dict, runtime: Runtime) -> bool:
    """Each rank continues its own random streams when the run resumes on as many processes as it was saved
    from (then training continues bitwise). On another number, the streams cannot be the same: dropout masks
    are drawn per rank, from a generator seeded with seed + rank, over that rank's rows of the global batch,
    and those rows move between ranks when their number changes. The generators then keep their fresh seeding
    (runs without dropout are unaffected). Returns whether the streams were restored."""
    if runtime.world_size != saved.get("world_size", 1):
        return False
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if len(ranks) != runtime.world_size:  # saved without every rank's (an interrupt): fresh streams as well
        return False
    set_rng_state(ranks[runtime.rank])
    return True


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
