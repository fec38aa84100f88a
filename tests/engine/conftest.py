import pytest

from llmudf.engine.weights import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, ModelConfig, Tokenizer) of the tiny llama, loaded once per test module."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def start_server(tiny_model_dir):
    """start_server(**ServerConfig fields): an engine server on the tiny model, Flight and
    HTTP on free ports, ready; every server it started is shut down after the module."""
    from llmudf.engine.server import EngineServer, ServerConfig

    servers = []

    def start(**options) -> EngineServer:
        config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, **options)
        srv = EngineServer(config).start()
        servers.append(srv)
        assert srv.service.wait_ready(120), srv.service.load_error
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
