"""llmudf.optimizer"""
