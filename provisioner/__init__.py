"""Getting and losing machines: SkyPilot in the cloud, virtual nodes on this machine.

- ``base``: the interface the controller calls (``Provisioner``: acquire, release, nodes, watch, wait_ready,
  replace, close), ``NodeRequest`` and ``Offer``;
- ``budget``: the hourly budget ledger in Redis (``BudgetLedger``, ``BudgetExceeded``);
- ``fallback``: when spot has failed often enough to use on-demand (``SpotFallbackPolicy``);
- ``events``: ``NodeEvent`` and the in-process fan-out behind ``watch()``;
- ``local``: ``LocalProvisioner``, virtual nodes as process groups (``process_group``), types from ``catalog``;
- ``chaos``: ``RandomPreemptor``, seeded random preemptions;
- ``skypilot``: ``SkyPilotProvisioner``, with the task in ``skypilot_task`` and prices/feasibility in
  ``sky_catalog`` (``sky`` is imported only inside their functions);
- ``config``: the ``provisioner:`` section of a deployment config.

Importing this package (or any module in it) imports neither ``sky`` nor ``torch``.
"""
