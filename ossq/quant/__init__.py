"""Quantizers: MLX affine groups (`affine`), MXFP4 blocks (`mxfp4`), and which tensor gets which (`recipe`).

`affine` and `mxfp4` are plain torch (CPU or CUDA) and bit-identical to CPU `mx.quantize`; nothing here
imports mlx.
"""
