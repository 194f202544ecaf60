"""Watching and steering a run while it goes on: progress events, live prompts, the preview image.

The live page (``--serve``, :mod:`fifo_stream.web`) and ``--progress json`` read a run's
:class:`Progress`; the page's prompt box and ``--prompts-from`` feed its :class:`LiveControl`.
"""

from .control import LiveControl, PromptRequest, parse_line, read_prompts
from .progress import PROGRESS_MODES, Progress
from .preview import PREVIEW, write_preview
