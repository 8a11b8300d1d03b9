"""Plumbing a reader may skip: what keeps a run safe and fast but is no part of a method or a task.

    cli.py           what every command line shares: one-line errors, the flag parser, the device
    run_folder.py    a run folder on disk: atomic checkpoints, exact resume, metrics.jsonl, Ctrl-C
    checkpoints.py   the published checkpoint files: finding, checking and mapping them
    formats.py       files exchanged with the ecosystem (PEFT adapters, the hub's layout)
    compat.py        old flag spellings and old run folders
    costs.py         FLOPs: iso-FLOP formulas, counted FLOPs, TFLOP/s and MFU
    distributed.py   data parallelism under torchrun
    losses.py        the LM loss a chunk of positions at a time (tasks.py has the plain one)
    memory_fused.py  the fast chapter-memory reads (memory.py has the plain ones)

Nothing here imports a model, method or task module.
"""
