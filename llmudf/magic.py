"""IPython magics: SQL with LLM calls in a notebook, on one notebook-wide connection.

    %load_ext llmudf

    %%llm_sql -o kids
    SELECT title, llm_filter('Is it for kids?', title) AS ok FROM movies

`movies` may be a table of the database or a pandas / Polars DataFrame or Arrow table of
the notebook. The result is shown (and with `-o NAME` stored) as a pandas DataFrame;
`%llm_sql QUERY` runs a one-line query. Options, before the query:
- `-o NAME`: also store the result in the notebook's variable NAME;
- `--explain`: the LLM plan instead of the answers, without running the model (an
  `LLMExplain`: a table in the notebook, `.plot()` draws the prompt work per strategy);
- `--model PATH`, `--db FILE`: (re)connect with this model / DuckDB database file.
The connection (`llmudf.connect()`) is made on first use. An error is shown as one line.

From Python: `configure(config)` sets its `llmudf.Config` (engine options, result cache);
`connection()` is the connection itself, e.g. `connection().last_stats`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from llmudf.calls.config import Config
from llmudf.cli import _error_line
from llmudf.connectors.duckdb import Connection, connect, using_namespace


def load_ipython_extension(ipython) -> None:
    if "LLMMagics" not in ipython.magics_manager.registry:  # keep a loaded one's connection
        ipython.register_magics(LLMMagics(ipython))


def configure(config: Config | None = None, database: str = ":memory:", **options) -> None:
    """Set the Config (or Config fields as keywords) and the database of the notebook's
    connection; the next `%%llm_sql` connects with them. Loads the extension if needed.

    >>> llmudf.magic.configure(model="path/to/model", max_tokens=16)  # doctest: +SKIP
    """
    if config is not None and options:
        raise TypeError("pass either config= or keyword options, not both")
    _magics().configure(config or Config.from_kwargs(**options), database)


def connection() -> Connection:
    """The notebook-wide connection of `%%llm_sql` (connected now if it is not yet)."""
    return _magics().connection


@dataclass(slots=True)
class MagicOptions:
    out: str | None = None
    explain: bool = False
    model: str | None = None
    database: str | None = None


@magics_class
class LLMMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self._config: Config | None = None
        self._database = ":memory:"
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = connect(self._database, config=self._config or Config())
        return self._connection

    def configure(self, config: Config | None, database: str) -> None:
        if self._connection is not None:
            self._connection.close()
        self._config, self._database, self._connection = config, database, None

    @line_cell_magic
    def llm_sql(self, line: str, cell: str | None = None):
        """Run SQL with LLM calls: `%llm_sql QUERY` or a `%%llm_sql` cell; the result is a
        pandas DataFrame. Options before the query: -o NAME (store it in NAME), --explain
        (the LLM plan instead, without running the model), --model PATH, --db FILE
        ((re)connect with this model / DuckDB database). See `llmudf.magic`."""
        options, query = parse_line(line)
        if cell is not None:
            if query:
                raise UsageError(f"%%llm_sql takes only options on its first line, not {query!r}")
            query = cell.strip()
        self._reconnect(options)
        if not query:
            return None
        try:
            with using_namespace(self.shell.user_ns):
                if options.explain:
                    result = self.connection.explain_llm(query)
                else:
                    relation = self.connection.sql(query)
                    result = None if relation is None else relation.df()
        except Exception as exc:  # any failure of the query: one line, not IPython's frames
            raise UsageError(_error_line(exc)) from exc  # as `llmudf sql` prints it
        if options.out is not None:
            self.shell.user_ns[options.out] = result
        return result

    def _reconnect(self, options: MagicOptions) -> None:
        if options.model is None and options.database is None:
            return
        config = self._config or Config()
        if options.model is not None:
            config = config.with_options({"model": options.model})
        database = options.database or self._database
        if (config, database) != (self._config, self._database):
            self.configure(config, database)


def parse_line(line: str) -> tuple[MagicOptions, str]:
    """(the options at the start of `line`, the query after them).

    >>> parse_line("-o out --explain SELECT 'a b' AS x")
    (MagicOptions(out='out', explain=True, model=None, database=None), "SELECT 'a b' AS x")
    """
    options, rest = MagicOptions(), line.strip()
    while rest.startswith("-") and not re.match(r"--(\s|$)", rest):  # `-- ...`: SQL comment
        flag, _, rest = rest.partition(" ")
        flag, _, value = flag.partition("=")
        if flag not in _FLAGS:
            raise UsageError(f"unknown option {flag}; options: {_USAGE}")
        if flag == "--explain":
            options.explain = True
        else:
            if not value:
                value, rest = _next_token(rest)
            if not value:
                raise UsageError(f"{flag} needs a value; options: {_USAGE}")
            setattr(options, _FLAGS[flag], value)
        rest = rest.strip()
    if options.out is not None and not options.out.isidentifier():
        raise UsageError(f"-o needs a variable name, got {options.out!r}")
    return options, rest


# ---- private helpers -------------------------------------------------------------------

_FLAGS = {
    "-o": "out",
    "--out": "out",
    "--explain": "explain",
    "--model": "model",
    "--db": "database",
}
_USAGE = "-o NAME, --explain, --model PATH, --db FILE"
_TOKEN = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|\S+)")


def _next_token(text: str) -> tuple[str, str]:
    """(the first whitespace-separated or quoted token of `text`, unquoted; the rest)."""
    match = _TOKEN.match(text)
    if match is None:
        return "", text
    token = match.group(1)
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        token = token[1:-1]
    return token, text[match.end() :]


def _magics() -> LLMMagics:
    """The LLMMagics of the running IPython, loading the extension on first use."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("llmudf.magic needs a running IPython (a notebook or IPython shell)")
    if "LLMMagics" not in shell.magics_manager.registry:
        shell.extension_manager.load_extension("llmudf")
    return shell.magics_manager.registry["LLMMagics"]
