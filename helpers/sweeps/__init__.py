"""The runner: a sweep file to executed notebooks, sidecars, summary and report.

sweep    grid -> papermill, exit codes, interrupts, the GPU queue (`python -m helpers.sweep`)
cluster  the same runs on Ray (ray imported only when used)
kernels  how notebooks are executed
report   summary + notebook 02 + offline HTML (`python -m helpers.report`)
publish  local runs -> the published reference (`python -m helpers.publish`)
"""
