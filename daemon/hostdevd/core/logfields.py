"""Stable MESSAGE_IDs and structured log fields.

Every action is logged through :func:`log_action` with journald-style fields
(``HOSTDEV_ADDRESS``, ``IOMMU_GROUP``, ``DOMAIN_UUID``, ``DOMAIN_NAME``,
``ACTION``, ``RESULT``, ``MESSAGE_ID``) carried in ``LogRecord.journal``; the
daemon's journald handler sends them as fields, plain handlers ignore them.
``systemd/hostdevd.catalog`` explains each id for ``journalctl -x``.
"""
from __future__ import annotations

import logging
from typing import Any

# Never change a value: operators filter on them (journalctl MESSAGE_ID=...).
MSG = {
    "claim": "4c5bc6d98714421c885f01f5214c904d",
    "bind": "3ed3dbad284a4a169e375538b43659fd",
    "restore": "b5d7b9a6fd30467f92e9ceb29a6951fe",
    "refused": "8b6082ff6126427faf9060fe551817bc",
    "rollback": "35965e21c8524f51a1648ae8377c8f8d",
    "release": "b3046671be7d454999ba52de805a4290",
    "step_failed": "402c5f9006564b8895307f593b993a8d",
    "reconcile": "49629bb3cb444a87a5ed49d224100b5b",
    "orphan": "4142d11f880840028ccd97369cc190a7",
    "adopt": "a38f0c5185fc4e10abcd236611e022c4",
    "reset": "7203aa3811cc4bda9e2b7dfa12043976",
    "drift": "645de6142fec48be9b983b04889f9db1",
    "daemon": "b8ee0db3ccc64f84810c1371a5134c93",
    "sriov": "369a8ff7b0fc4bfe95d375ece1dcce44",
    "host_action": "5e93657a6ccd45efa4816d8053a45e6f",
    "migrate": "bd3b467551724047901815096b5cf1b3",
    "hotplug": "0f9e724854284ed390b7acd0e6385044",
    "ledger_recovered": "32419ca978d040cfadcb3129768f9155",
    "ledger_read_only": "4af4e210cbb04f619ce80e59934268e3",
}


def log_action(logger: logging.Logger, level: int, kind: str, message: str, *args: Any,
               address: object = None, group: int | None = None, owner: Any = None,
               action: str | None = None, result: str | None = None) -> None:
    """One log line per step, naming the device, with journald fields attached."""
    fields = {"MESSAGE_ID": MSG[kind], "ACTION": action or kind}
    if address is not None:
        fields["HOSTDEV_ADDRESS"] = str(address)
    if group is not None:
        fields["IOMMU_GROUP"] = str(group)
    if owner is not None:
        fields["DOMAIN_NAME"] = owner.name
        if getattr(owner, "uuid", None):
            fields["DOMAIN_UUID"] = owner.uuid
    if result is not None:
        fields["RESULT"] = result
    logger.log(level, message, *args, extra={"journal": fields})
