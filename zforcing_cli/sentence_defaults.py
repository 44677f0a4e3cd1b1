"""What decoding sentences takes unless told otherwise (sentences.py), in a module without
torch, since the command line's help shows it."""

DEFAULT_LENGTH = 20  # tokens generated at most per sentence (the authors' decoder: 20)
INTERPOLATION_TOP_K = 10  # the sampled column of an interpolation draws from this many tokens
