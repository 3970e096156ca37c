"""What a run tells its user before it has much to show: what is being built on a CPU, and how long the
run will take once the first step has been timed."""

from __future__ import annotations

from typing import Optional

CPU_COMFORTABLE_PARAMETERS = 20_000_000  # `baby` (10.7M) trains in minutes per hundred steps on a laptop CPU


def cpu_model_notice(parameters: int, device_type: str) -> Optional[str]:
    """A warning for a model too large to train comfortably on a CPU, suggesting the presets that are not."""
    if device_type != "cpu" or parameters <= CPU_COMFORTABLE_PARAMETERS:
        return None
    return (f"note: training {parameters / 1e6:.0f}M parameters on a CPU (GPT-2 124M, the default, takes many "
            "seconds per step); for a first run try --model.preset small-cpu (0.8M) or baby (10.7M). The time "
            "per step is shown after the first step.")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def first_step_notice(step_s: float, steps_left: int) -> str:
    """After the first step: its time, and the rest of the run at that pace (the first step pays one-off
    costs, so this leans long)."""
    return (f"first step took {step_s:.2f} s: about {duration(step_s * steps_left)} for the remaining "
            f"{steps_left:,} steps at this pace (evaluations and checkpoints add to it)")
