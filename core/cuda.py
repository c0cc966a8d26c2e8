"""The one lock a process's users of the GPU share.

Capturing a CUDA graph (the torch-cuda swap backend) fails, even in the thread-local error mode, when another thread
releases the caching allocator's cached blocks meanwhile: ``torch.cuda.empty_cache``, which ``torch.cuda.graph``
calls before every capture and cuDNN's autotuner calls before it times a convolution shape it has not seen. Two
captures at once (two bundles loading) or a capture beside the face models' convolutions (frames of a model already
serving) could then fail either side. So captures hold this lock, and so do the face models' torch runs; replaying
captured graphs needs no lock. It is uncontended except while a model loads.
"""

from __future__ import annotations

import threading

CAPTURE_LOCK = threading.Lock()
