"""gptforge: from raw text to a GPT-2 model you trained yourself."""

__version__ = "0.1.0"
