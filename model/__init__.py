"""Pure-torch model code: backbones, DeepLabV3+, reconstruction head, S4MIM losses and masking.

Nothing in this package imports Ray or MLflow or touches files beyond what a caller asks for.
"""
