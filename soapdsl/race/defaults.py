"""The defaults of `soapdsl race`, apart from the runner so that the command line's parser
can show them without importing torch."""

TASKS = ("charlm",)

#: four recipes run in about 3.5 minutes on 2 CPU cores
DEFAULT_STEPS = 300
DEFAULT_BATCH = 32
DEFAULT_CONTEXT = 128
DEFAULT_D_MODEL = 128
DEFAULT_LAYERS = 2
DEFAULT_HEADS = 4
DEFAULT_EVAL_BATCHES = 4
#: a race never takes more threads than this (a tiny model gains nothing from more)
MAX_THREADS = 8
