"""The compare stage: the Puzzle child against depth, width, random and greedy baselines at the same measured
speed-ups (`baselines.py` picks their architectures, `stage.py` runs each through the closed loop, GKD and
evaluation, `report.py` writes compare.json, compare.md and compare.png)."""
