"""Write a VM's cloud-init NoCloud seed ISO (the files come from model/cloud_init.py).

An ISO 9660 image labelled ``cidata`` with Joliet and Rock Ridge names (cloud-init and the lab
guest read ``meta-data``, ``user-data`` and ``network-config`` by those names), made with pycdlib:
no external tool and no mount. Written beside the VM's disks and replaced whole (a temporary
file renamed), so a QEMU that has the old one open keeps reading a complete image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pycdlib

from vmshift.errors import ImageError
from vmshift.model.cloud_init import SEED_LABEL, seed_files
from vmshift.model.vm import SeedSpec


def _iso_name(name: str) -> str:
    """The 8.3 ISO 9660 level-1 name (the Joliet and Rock Ridge names keep the real one)."""
    return "/" + name.replace("-", "").upper()[:8] + ".;1"


def write_seed_iso(path: Path, seed: SeedSpec) -> None:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=SEED_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, text in sorted(seed_files(seed).items()):
            data = text.encode()
            iso.add_fp(io.BytesIO(data), len(data), _iso_name(name), rr_name=name, joliet_path=f"/{name}")
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as out:
            iso.write_fp(out)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as exc:
        raise ImageError(f"Could not write the cloud-init seed {path}: {exc}.",
                         hint="Check the datastore's free space and permissions.") from exc
    finally:
        iso.close()
