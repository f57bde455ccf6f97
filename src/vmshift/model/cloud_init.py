"""The files of a cloud-init NoCloud seed, made from a VM's :class:`SeedSpec`. Pure: no I/O.

cloud-init finds the seed on a filesystem labelled ``cidata`` holding ``meta-data``,
``user-data`` and ``network-config`` (its NoCloud data source). The files are YAML; every string
is written double-quoted with JSON's escapes, which YAML reads the same way, so no value (an SSH
key's comment, a hostname) can break the document. The lines are kept plain (one key a line) so
the lab-disk guest's shell can read its address back without a YAML parser.
"""

from __future__ import annotations

import json

from vmshift.model.vm import SeedSpec

SEED_LABEL = "cidata"
META_DATA = "meta-data"
USER_DATA = "user-data"
NETWORK_CONFIG = "network-config"
#: The guest's name for the seeded NIC (cloud-init renames the NIC with that MAC to it).
SEED_NIC = "eth0"


def _q(value: str) -> str:
    return json.dumps(value)


def meta_data(seed: SeedSpec) -> str:
    return f"instance-id: {_q(seed.instance_id)}\nlocal-hostname: {_q(seed.hostname)}\n"


def user_data(seed: SeedSpec) -> str:
    lines = ["#cloud-config", f"hostname: {_q(seed.hostname)}"]
    if seed.ssh_keys:
        lines.append("ssh_authorized_keys:")
        lines += [f"  - {_q(key)}" for key in seed.ssh_keys]
    return "\n".join(lines) + "\n"


def network_config(seed: SeedSpec) -> str:
    """Network config version 2: the allocated address as static config on the NIC with that MAC
    (DHCP on it when the server allocated no address)."""
    lines = ["version: 2", "ethernets:", f"  {SEED_NIC}:"]
    if seed.mac:
        lines += ["    match:", f"      macaddress: {_q(seed.mac)}", f"    set-name: {_q(SEED_NIC)}"]
    if seed.address:
        lines += ["    dhcp4: false", "    addresses:", f"      - {_q(seed.address)}"]
    else:
        lines.append("    dhcp4: true")
    return "\n".join(lines) + "\n"


def seed_files(seed: SeedSpec) -> dict[str, str]:
    """File name -> content of the seed's three files."""
    return {META_DATA: meta_data(seed), USER_DATA: user_data(seed), NETWORK_CONFIG: network_config(seed)}
