"""llmudf.engine"""
