"""Records and names: what every layer agrees on, with no torch import.

registry  model names and shapes, quantizations, levers, the plain stack, parameters added later
params    the run id and type checks against the notebook's declared types
sidecars  the run record on disk, summary.csv, a sweep's plan.json, the out-of-memory test
files     the one atomic writer
paths     the project root, published and local report folders
gpus      which GPUs are visible, pinning a kernel to one
"""
