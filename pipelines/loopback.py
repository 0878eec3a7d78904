"""On a local master, Horovod's services listen on 127.0.0.1 only.

Horovod's driver service, its task services (inside the executors' Python workers) and its Gloo rendezvous server
bind every interface: `horovod.runner.util.network.find_port` binds ('', port), with no option to choose. When
every worker runs on this machine nothing outside it needs them, so the driver and the executors' Python daemon
(`pipelines.executor_daemon`) bind them to the loopback address instead. Masters of a real cluster keep Horovod's
own behaviour: their workers connect from other machines."""
from __future__ import annotations

import os

LOOPBACK_VAR = "SPARKVISION_HOROVOD_LOOPBACK"  # "1": bind Horovod's services to 127.0.0.1 (set for local masters)
LOOPBACK = "127.0.0.1"


def bind_horovod_to_loopback() -> None:
    """Make Horovod's port finder bind 127.0.0.1 in this process (and the processes it forks)."""
    import horovod.runner.common.util.network as common_network
    import horovod.runner.http.http_server as http_server
    import horovod.runner.util.network as network

    original = getattr(network.find_port, "sparkvision_original", network.find_port)

    def find_port(server_factory):
        return original(lambda addr: server_factory((LOOPBACK, addr[1])))

    find_port.sparkvision_original = original
    for module in (network, common_network, http_server):  # the last two imported it by name
        module.find_port = find_port


def bind_if_asked() -> None:
    """In an executor's Python daemon: bind Horovod's services to the loopback address when the driver said so."""
    if os.environ.get(LOOPBACK_VAR) == "1":
        bind_horovod_to_loopback()
