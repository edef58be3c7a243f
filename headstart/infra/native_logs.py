"""Native libraries' start-up notices, kept out of the user's terminal and a worker's logs.

TensorFlow and LiteRT write a few lines straight to file descriptor 2 from C++ whatever the
log level: that no CUDA driver was found (on a CPU machine, by design), that absl logging is
not initialised yet, that oneDNN's operations are on, that the XNNPACK delegate was created.
Around the calls that print them, the descriptor is captured and every other line written back
afterwards; nothing else is lost.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager

KNOWN_NOTICES = re.compile(
    "|".join(
        [
            r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
            r"cudart_stub\.cc:\d+\] Could not find cuda drivers",
            r"cuda_platform\.cc:\d+\] failed call to cuInit",
            r"cuda_executor\.cc:\d+\] .*(CUDA|cuda)",
            r"Created TensorFlow Lite XNNPACK delegate for CPU",
            r"port\.cc:\d+\] oneDNN custom operations are on",
            # The TFLite converter's quantizer reports its settings on standard output.
            r"fully_quantize: \d+, inference_type: \d+, input_inference_type: ",
        ]
    )
)


@contextmanager
def native_notices_dropped(descriptor: int = 2):
    """Runs the block with the descriptor (2, or 1 for standard output) captured, then writes back
    each line that is not a known notice."""
    stream = sys.stderr if descriptor == 2 else sys.stdout
    stream.flush()
    saved = os.dup(descriptor)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), descriptor)
        try:
            yield
        finally:
            stream.flush()
            os.dup2(saved, descriptor)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not KNOWN_NOTICES.search(line.decode(errors="replace"))
            ]
            if kept:
                os.write(descriptor, b"".join(kept))
