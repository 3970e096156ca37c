"""Reading a person's (or a pipe's) lines: shared by the commands that answer line by line (classify, chat)."""

from __future__ import annotations

import sys
from typing import Iterator, Optional, TextIO


def input_lines(stdin: TextIO, prompt: Optional[str] = None) -> Iterator[str]:
    """Lines until the end of input. With a prompt (a person at the terminal), lines are read through
    input() so they can be edited, and Ctrl-D or Ctrl-C at the prompt end the session quietly."""
    while True:
        if prompt is not None and stdin is sys.stdin:
            try:
                line = input(prompt)
            except (EOFError, KeyboardInterrupt):
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line
