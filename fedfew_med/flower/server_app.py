"""The Flower ``ServerApp``: the coordinator's round loop, started by ``flwr run``.

Its run config (``[tool.flwr.app.config]`` of ``fedfew_med/flower/app/pyproject.toml``,
overridden with ``flwr run --run-config``) names the federation config and the
run directory on the SuperLink's machine; see
:class:`~fedfew_med.flower.coordinator.ServerSettings` for every key.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfew_med.config import load_federation
from fedfew_med.flower.coordinator import Coordinator, ServerSettings
from fedfew_med.flower.logs import forward_logs

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation named by the run config."""
    with forward_logs():
        settings = ServerSettings.from_run_config(context.run_config)
        config = load_federation(settings.federation_config, list(settings.overrides))
        Coordinator(grid, config, settings).run()
