"""The DVC pipeline's stages as library functions, one module each (download, latency, training, baseline,
evaluate_space, compare, specialize), over the typed params (``config``), the supernet's checkpoints (``checkpoint``), the recipe of
progressive shrinking (``recipe``), the stage context every stage after download opens (``context``) and the
stage script's process (``process``). ``stages/*.py`` call these.
"""
