"""Running planned calls: the executor (plan -> result cache -> one client batch -> parse ->
fan out), the query driver (a rewrite's plan run through a connector), the engine clients
(in-process, Flight server, OpenAI-compatible endpoint), the result cache, progress, paths."""
