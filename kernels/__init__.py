"""llmudf.kernels"""
