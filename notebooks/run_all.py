"""Execute the notebooks top to bottom and save them with their outputs.

    python notebooks/run_all.py                         # every notebook in this folder
    python notebooks/run_all.py 02_pandas_analysis.ipynb

Each runs in a fresh kernel with an empty result cache of its own (LLMUDF_RESULT_CACHE_DIR
in a temporary dir), so the stored outputs show the model's real work, not answers left
in this machine's cache by earlier runs.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, work_dir: str, timeout: int = 600) -> nbformat.NotebookNode:
    """The notebook at `path`, run top to bottom (cwd: its folder) in a python3 kernel of
    this interpreter with an empty result cache; `work_dir` (empty) holds the kernelspec,
    the kernel's sockets and the cache. Raises on an error cell; writes nothing to `path`."""
    notebook = nbformat.read(path, as_version=4)
    # a kernelspec of our own: a fresh machine may have none, and a user's python3 may be
    # another environment's
    specs = os.path.join(work_dir, "kernels")
    write_kernel_spec(os.path.join(specs, "python3"))
    kernel = AsyncKernelManager(
        kernel_name="python3",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[specs]),
        # IPC sockets: a TCP port picked before the kernel binds it can be taken meanwhile
        transport="ipc",
        ip=os.path.join(work_dir, "kernel"),
    )
    client = NotebookClient(
        notebook,
        km=kernel,
        timeout=timeout,
        record_timing=False,  # no per-cell timestamps: re-running changes only outputs
        coalesce_streams=True,  # a progress bar's \r updates: only its last state
        resources={"metadata": {"path": str(path.parent)}},
    )
    results = os.path.join(work_dir, "results")
    client.execute(env={**os.environ, "LLMUDF_RESULT_CACHE_DIR": results})
    for cell in notebook.cells:
        if cell.cell_type == "code":  # a closed progress bar leaves a line of blanks
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o.text.strip()]
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook files (default: all in this folder)")
    args = parser.parse_args()
    paths = [HERE / n for n in args.names] if args.names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="llmudf-notebook-") as work_dir:
            notebook = execute(path, work_dir)
        nbformat.write(notebook, path)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
