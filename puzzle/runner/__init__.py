"""Running jobs: the stage contract (`stage`), the ordered stage list (`pipeline`), checks before compute
(`validate`), `puzzle run` with its run directory, hashes and manifests (`run`), and Ray Jobs (`jobs`).
"""
