"""A host simulator for scale work (like vSphere's vcsim): one process, many fake hosts.

Each simulated host listens on its own port on 127.0.0.1 and speaks the parts of the agent protocol
the server uses for its inventory, with the project's own models and TLS machinery: the bootstrap
certificate and the enrollment routes (``agent/tls_server.AgentTls``), ``/health``, ``/facts``,
``/vms`` and the host stream (``model/host_stream``). Its VMs are records, not QEMUs: they cannot be
created, moved or powered through the agent API. It therefore **never stands in for a real agent in
functional tests**; it exists so one machine can show what 96 hosts cost the server (docs/scale.md).
"""
