"""llmudf.engine.models"""
