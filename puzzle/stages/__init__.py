"""The pipeline's stages, one module (or package) each, named as the stage is, in the order data flows:

    parent -> data -> bld -> score -> profile -> search -> gkd -> evaluate -> export

Every stage exposes `run(ctx) -> StageResult` (in `<stage>.py`, or `<stage>/stage.py` for a package); the runner
(`puzzle.runner`) decides which stages run. docs/architecture.md describes each stage's inputs and artifacts.
"""
