"""llmudf.connectors"""
