"""Serving constants, declared once. The handler, the build (``scripts/build_mar.py`` and the archive's
model-config.yaml), the KServe configs, the page server and the CLIs' help all read them; a test compares the
shipped ``config.properties`` with them.

The batching figures come from ``scripts/bench.py`` on two CPU cores (docs/performance.md): one worker already
spreads each batch over every core with torch's intra-op threads; batches of up to 8 let concurrent requests share
one forward pass; a lone request waits at most 1 ms for company (1 and 5 ms served as fast under load).
"""

from __future__ import annotations

MiB = 1024 * 1024

# --- Batching and workers (the archive's model-config.yaml) ---
BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 1
WORKERS = 1
RESPONSE_TIMEOUT_S = 120
"""TorchServe's responseTimeout and default_response_timeout: a full batch of the largest allowed requests on a slow
CPU stays well inside it."""

# --- The engine ---
SCORECAM_CHANNELS = 64
"""Channels a perturbation method (ScoreCAM, Ablation-CAM) scores per map, one forward pass each."""
PRECISION = "fp32"
CHANNELS_LAST_FROM = 4
"""The smallest batch that runs in the channels_last memory format (1: every batch, 0: none)."""
COMPILE = False
"""Whether the network before the default layer runs compiled (``torch.compile``, CPU only;
:mod:`camserve.cam.compiled`): faster batches, after a compile of about a minute and a half when the worker starts."""
STARTUP_TIMEOUT_S = 120
"""TorchServe's startupTimeout: the worker's load, its own default."""
COMPILE_STARTUP_TIMEOUT_S = 600
"""TorchServe's startupTimeout for an archive that compiles when its worker starts."""

# --- What an upload may be, checked before any pixel is decoded ---
MAX_IMAGE_BYTES = 20 * MiB
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 16
MAX_REQUEST_BYTES = 25 * MiB
"""TorchServe's max_request_size: a 20 MB photo as multipart, or base64 JSON of a 15 MB one."""

MAX_VOLUME_VOXELS = 40_000_000
"""A NIfTI volume's declared voxels (a 512x512x150 CT is 39 million), checked in its header before any voxel is
read; a 3D archive's build may lower it (``--max-voxels``)."""

# --- The work budget: what one request may ask of a worker ---
DEFAULT_OUTPUT_SIDE = 2048
"""The overlays' longer side when a request gives no ``max_side``."""
MIN_OUTPUT_SIDE, MAX_OUTPUT_SIDE = 16, 16384
"""The ``max_side`` a request may give."""
MAX_OUTPUT_PIXELS = 40_000_000
"""Output pixels × explanations, per request."""
MAX_OUTPUT_VOXELS = 80_000_000
"""A volume's voxels × explanations, per request: each explanation's map is upsampled to the volume's shape."""
MAX_FORWARD_PASSES = 100
"""Forward passes per request, as the method records count them."""
MAX_RESPONSE_BYTES = 100 * MiB
"""The largest response body: TorchServe's max_response_size."""

# --- A detector's detections, when a request gives no score_threshold or max_detections ---
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS, MAX_DETECTIONS = 20, 100

# --- Zero-shot prompts and similarity references (camserve.tasks.zero_shot, camserve.tasks.embedding) ---
MAX_PROMPTS = 64
"""Prompts one request may give a zero-shot model."""
MAX_PROMPT_CHARACTERS = 300
"""The longest prompt, in characters, before tokenising (its tokens are checked against the model's context)."""
PROMPT_CACHE_SIZE = 4096
"""Text embeddings a worker keeps, one per distinct prompt, least recently used first out: a repeated prompt
costs no text forward pass."""
MAX_REFERENCES = 8
"""References (images and embeddings together) one request may give an embedding model; each is explained."""
MAX_EMBEDDING_SIZE = 16384
"""The longest ``reference_embedding`` read: longer lists are refused before any number is parsed."""

# --- Response size accounting: the JSON around a response's images, and around each explanation's ---
RESPONSE_OVERHEAD_BYTES = 2048
EXPLANATION_OVERHEAD_BYTES = 512

# --- Addresses (loopback by default) ---
INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT = 8080, 8081, 8082
PAGE_PORT = 8000
