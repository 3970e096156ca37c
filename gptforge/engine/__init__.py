"""Token-level generation: the one engine behind the CLI, the HTTP server, eval and the web UI.

The engine works on token ids only and never decodes text; `gptforge.textgen` puts text on top of it.

The pieces, each driving the next (no call goes back up):
    Engine (engine.py)         one call in, its tokens out: generate(), stream(); a DecodeBatch per call
    DecodeBatch (batch.py)     continuous batching of many calls' rows over shared key/value buffers
    ModelRunner (runner.py)    the model on its device: prompt checks, forward passes under autocast
    sampling.py                SamplingParams, logits processing, StepOutput
The server's worker drives one long-lived DecodeBatch itself, over an Engine (an Engine is a ModelRunner).

How decoding runs:
- Requests ("groups" of rows: several prompts, or n samples of one) join and leave a running batch
  between steps (continuous batching). Each step feeds one token per running row; rows that joined are
  prefilled in the same step, so they get their first token without waiting for the others to finish.
- At most `max_batch_rows` rows run at once (the key/value buffers grow with it); the rest of a call's
  rows wait and start, in prompt order, as running rows end. A call's rows share one random generator,
  so a seeded call with more rows than the cap samples differently from an uncapped one (greedy rows
  that fit their window do not change).
- Rows sit LEFT-padded in one set of key/value buffers with a common write position; `pad_lens` masks each
  row's padding, and positions count from each row's first real token. A row joining with a prompt
  longer than the rows already there shifts their contents right; a finished row's buffer row is reused.
- Each group keeps its own sampling parameters, random generator, penalties and logprob request, so a
  request's output does not depend on what else is in the batch (up to float rounding in batched math).
- When the buffers are full at `block_size`, rows whose window is full slide: they are rebuilt from
  their newest `block_size * WINDOW_KEEP_FRACTION` tokens, and every row's contents move left, so models
  with a small context (64, 256) still write long samples (as nanoGPT's sample.py does by cropping).
  Rows that would fill their window soon anyway (within block_size/8) slide with them, so a batched row
  may slide a little earlier than it would alone; a row whose prompt + max_new_tokens fits the window
  never slides, so batching never changes what it generates (greedy; up to float rounding).
- `use_cache=False` is the reference path: every step runs a full forward over each row's last
  `block_size` tokens. Greedy outputs of both paths are identical as long as no window slide happens;
  after one they differ, because the cached path restarts from half a window while the uncached path
  keeps a full, one-token-shifted window every step.
"""

from gptforge.engine.batch import SLIDE_MARGIN_FRACTION, WINDOW_KEEP_FRACTION, DecodeBatch
from gptforge.engine.engine import Engine
from gptforge.engine.runner import ModelRunner
from gptforge.engine.sampling import (GREEDY_BELOW, LIMITS, InvalidParam, SamplingParams, StepOutput, StopCheck,
                                      presence_mask, process_logits, sample_next)

__all__ = ["Engine", "DecodeBatch", "ModelRunner", "SamplingParams", "StepOutput", "StopCheck", "presence_mask",
           "process_logits", "sample_next", "WINDOW_KEEP_FRACTION", "SLIDE_MARGIN_FRACTION", "GREEDY_BELOW", "LIMITS",
           "InvalidParam"]
