"""What the benchmark measures unless told otherwise: the sizes it knows and its default
counts, in a module without torch, since the command line's help shows them."""

SIZES = ("small", "paper", "tiny")
DEFAULT_UPDATES = 10  # timed updates of each implementation (speed.py)
DEFAULT_HOURS = 300.0  # of audio in --memory's sparse dataset (memory.py)
DEFAULT_BATCHES = 1000  # fetched by --memory
SYNTHETIC_SEQUENCES = 1024  # sequences in a synthetic set: batches are drawn from these (synthetic.py)
