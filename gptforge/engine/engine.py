"""`Engine`: token generation in one call (`generate`, `stream`), each call driving a `DecodeBatch` of its
own. How decoding runs is described in `gptforge.engine`."""

from __future__ import annotations

from typing import Iterator, Optional, Union

import torch

from gptforge.common import Runtime, UserError
from gptforge.engine.batch import DecodeBatch
from gptforge.engine.runner import ModelRunner
from gptforge.engine.sampling import SamplingParams, StepOutput, StopCheck


class Engine(ModelRunner):
    """Batched token generation: each call decodes its rows in a `DecodeBatch` of its own, driven here.

    model, runtime: as `ModelRunner` takes them. Calls keep no state on the engine.
    max_batch_rows: the most rows (prompts x samples) one call decodes at once; the others wait for rows
        to end. Bounds the key/value buffers (they grow with the rows running: thousands of prompts at once
        would not fit in memory). None: no cap.
    """

    def __init__(self, model: torch.nn.Module, runtime: Union[Runtime, torch.device, str, None] = None,
                 max_batch_rows: Optional[int] = 64):
        if max_batch_rows is not None and (not isinstance(max_batch_rows, int) or max_batch_rows < 1):
            raise UserError(f"max_batch_rows must be an integer >= 1 or None, got {max_batch_rows!r}")
        super().__init__(model, runtime)
        self.max_batch_rows = max_batch_rows

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_check: Optional[StopCheck] = None,
                 use_cache: bool = True, truncate: Optional[str] = None) -> list[list[int]]:
        """Generated ids of each row (prompt and stop token not included)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params, stop_check, use_cache, truncate):
            for row, tok in zip(out, step.tokens):
                if tok is not None:
                    row.append(tok)
        return out

    def stream(self, prompts: list[list[int]], params: SamplingParams, stop_check: Optional[StopCheck] = None,
               use_cache: bool = True, truncate: Optional[str] = None,
               logprobs: Optional[int] = None) -> Iterator[StepOutput]:
        """One StepOutput per decoding step, until every row has ended or max_new_tokens steps.

        stop_check(row, generated_ids) is called after each token a row keeps; True ends the row
        (the token that triggered it is still returned). truncate='left' keeps the last block_size
        tokens of a prompt that is too long (otherwise it is a UserError). logprobs=n also reports the
        chosen token's logprob and the n most likely alternatives (0: chosen token only).
        Bad input raises here, at the call, not at the first step.
        """
        batch = DecodeBatch(self, use_cache=use_cache, max_rows=self.max_batch_rows)
        group = batch.add(prompts, params, stop_check, logprobs, truncate)
        return batch.outputs_of(group)
