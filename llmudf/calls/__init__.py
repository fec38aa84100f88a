"""The call vocabulary: `Config`, the five LLM functions (specs, binding, option checks,
answer types) and prompt rendering. Pure: imports nothing of llmudf's other layers, so the
optimizer, the runtime, the connectors and the face share one meaning of a call."""
