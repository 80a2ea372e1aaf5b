"""FedFew on Flower: a thin skin over the same runtime the in-process simulation uses.

=====================  ====================================================================
``server_app``          the ``ServerApp`` (``flwr run``): :class:`coordinator.Coordinator`
``client_app``          the ``ClientApp`` of every SuperNode: query / train / evaluate
``coordinator``         the round loop over a Flower ``Grid``, bounded waits, checkpoints
``node``                a SuperNode's ``--node-config``, its data, its ``SiteRuntime``
``codec``               tensors and configs <-> ArrayRecord / ConfigRecord / MetricRecord
``site_store``          a site's state on its own disk (safetensors snapshots)
``rundir``              the coordinator's run directory (the simulation's format)
``launch``              TLS certificates, SuperNode keys, and the Flower commands
``commands``            the ``fedfew-med flower ...`` subcommands (wired by ``fedfew_med.cli``)
``app/``                the Flower App definition (``pyproject.toml``) that ``flwr run`` bundles
=====================  ====================================================================

Only this package imports ``flwr``; ``import fedfew_med.flower`` itself imports nothing heavy.
See ``docs/deployment.md``.
"""
