"""A tqdm progress bar for one LLM batch: prompts done, cache hits, tokens/s.

Shown when the Config asks for it and someone watches: on a terminal, or under the cell in
a Jupyter notebook (tqdm.auto: a widget with ipywidgets installed, else text); scripts and
tests piped to files print nothing.

>>> with BatchProgress("llm #1", 10, num_prompts=4, num_cache_hits=1, enabled=False) as bar:
...     bar.advance(3)
"""

from __future__ import annotations

import sys
import time
import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    # in a notebook without ipywidgets tqdm.auto falls back to a text bar, which Jupyter
    # shows as well; its warning about that would appear at `%load_ext llmudf`
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm


class BatchProgress:
    def __init__(
        self, label: str, num_rows: int, num_prompts: int, num_cache_hits: int, enabled: bool
    ):
        self.start = time.perf_counter()
        self.num_cache_hits = num_cache_hits
        self._bar = tqdm(
            total=num_prompts,
            initial=num_cache_hits,
            desc=f"{label} ({num_rows} rows)",
            unit="prompt",
            disable=not (enabled and is_watched()),
            leave=False,
        )
        self._bar.set_postfix(cache_hits=num_cache_hits)

    def advance(self, num_done: int, num_total: int | None = None) -> None:
        """The client's progress callback: `(done, total)` counts so far (the Engine), or
        `(n)` more done (remote clients)."""
        if num_total is None:
            self._bar.update(num_done)
        else:
            self._bar.update(self.num_cache_hits + num_done - self._bar.n)

    def finish(self, num_tokens: int) -> None:
        rate = num_tokens / max(time.perf_counter() - self.start, 1e-9)
        self._bar.set_postfix(cache_hits=self.num_cache_hits, tokens_per_s=f"{rate:.0f}")

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def is_watched() -> bool:
    """Whether stderr is a terminal or a Jupyter kernel's cell output (not a TTY)."""
    return getattr(sys.stderr, "isatty", lambda: False)() or _in_jupyter_kernel()


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # never imported just to ask
    if "ipykernel" not in sys.modules or ipython is None:
        return False
    return getattr(ipython.get_ipython(), "kernel", None) is not None
