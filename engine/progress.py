"""Progress of one `Engine.generate` batch: a tqdm bar, a callback, or nothing."""

from __future__ import annotations

from collections.abc import Callable


def progress_reporter(progress, total: int) -> Callable[[int | None], None]:
    """A function to call with the number of answers done after each step, and None at the
    end. progress: falsy (nothing), True (a tqdm bar) or `progress(num_done, num_total)`.

    >>> report = progress_reporter(lambda done, total: print(f"{done}/{total}"), 3)
    >>> report(2); report(None)
    2/3
    """
    if not progress:
        return lambda done: None
    if callable(progress):
        return lambda done: done is not None and progress(done, total)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="req")

    def report(done: int | None) -> None:
        if done is None:
            bar.close()
        else:
            bar.update(done - bar.n)

    return report
