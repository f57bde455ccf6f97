"""Importing a disk image onto a datastore (``vmshift image import``): requests, progress, and the
pure reading of ``qemu-img info``/``check`` output that decides whether a file is imported."""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from vmshift.errors import InvalidInputError
from vmshift.model.base import RequestModel
from vmshift.model.inputs import MAX_NICS, DatastoreName, HostName, ImageName, NetworkName, VmName

MIB = 1 << 20
#: Where an imported (or built) image lives on a datastore: ``DATASTORE/images/NAME/``, its disk
#: ``disk.qcow2`` and its ``image.json`` (the one record of the image, agent/datastores.py).
IMAGE_DISK_FILE = "disk.qcow2"
MAX_PATH = 4096
TEXT_ONLY = r"^[^\x00-\x1f\x7f]+$"
MAX_DESCRIPTOR = 4 << 20  # an OVF descriptor is a few KiB; more is not a descriptor
#: A file name inside an OVA (the OVF's References/File/@href): no folders, no control characters.
TAR_MEMBER_PATTERN = r"^[^/\x00-\x1f\x7f]+$"


def is_ova(path: str) -> bool:
    """An OVA is told by its name (DSP0243 says ``.ova``); its tar holds the OVF descriptor and disks."""
    return path.lower().endswith(".ova")


class ImportFormat(StrEnum):
    """The disk formats ``vmshift image import`` reads (qemu-img's names)."""

    QCOW2 = "qcow2"
    RAW = "raw"
    VMDK = "vmdk"
    VHDX = "vhdx"
    VDI = "vdi"


class ImportState(StrEnum):
    CONVERTING = "converting"
    DONE = "done"
    FAILED = "failed"


class ImageImportRequest(RequestModel):
    """``POST /api/v1/images/import`` on the server: import ``file`` (a path on the importing host)."""

    file: str = Field(min_length=1, max_length=MAX_PATH, pattern=r"^/[^\x00-\x1f\x7f]*$",
                      description="absolute path of the image file on the host that imports it")
    name: ImageName
    datastore: DatastoreName
    host: HostName | None = Field(default=None, description="the host that reads the file and converts it; "
                                  "None = the first connected host that sees the datastore")
    format: ImportFormat | None = Field(default=None, description="the file's format; None = as qemu-img "
                                        "detects it (a raw file must be named raw)")


class VmImportSource(StrEnum):
    OVA = "ova"  # an OVA file on the host: its OVF descriptor and VMDK disks
    LIBVIRT = "libvirt"  # a libvirt domain's XML, its disks files on the host


MAX_DOMAIN_XML = 1 << 20


ForeignNetwork = Annotated[str, Field(min_length=1, max_length=256, pattern=TEXT_ONLY)]


class VmImportRequest(RequestModel):
    """``POST /api/v1/vm-imports``: make the VM an OVA or a libvirt domain describes on ``host``, its
    disks imported as images ``NAME-diskN`` on ``datastore`` (the VM's disks are overlays of them)."""

    source: VmImportSource
    host: HostName
    datastore: DatastoreName
    file: str | None = Field(default=None, min_length=1, max_length=MAX_PATH, pattern=r"^/[^\x00-\x1f\x7f]*$",
                             description="ova: the OVA's absolute path on the host")
    domain_xml: str | None = Field(default=None, min_length=1, max_length=MAX_DOMAIN_XML,
                                   description="libvirt: the domain XML (its disks are paths on the host)")
    name: VmName | None = Field(default=None, description="the VM's name; None = the descriptor's")
    network_map: dict[ForeignNetwork, NetworkName] = Field(
        default_factory=dict, max_length=MAX_NICS,
        description="the descriptor's network (or bridge) -> a vmshift network; a network of the same name "
                    "needs no entry")
    start: bool = False

    @model_validator(mode="after")
    def _source_given(self) -> VmImportRequest:
        if self.source is VmImportSource.OVA and (self.file is None or self.domain_xml is not None):
            raise ValueError("an OVA import gives 'file' (and no 'domain_xml')")
        if self.source is VmImportSource.LIBVIRT and (self.domain_xml is None or self.file is not None):
            raise ValueError("a libvirt import gives 'domain_xml' (and no 'file')")
        return self


class AgentImageImport(RequestModel):
    """``POST /api/v1/images/import`` on an agent."""

    file: str = Field(min_length=1, max_length=MAX_PATH, pattern=r"^/[^\x00-\x1f\x7f]*$")
    name: ImageName
    datastore: DatastoreName
    format: ImportFormat | None = None
    member: str | None = Field(default=None, min_length=1, max_length=MAX_PATH, pattern=TAR_MEMBER_PATTERN,
                               description="a disk inside ``file``, an OVA: the tar member to convert")


class OvaRequest(RequestModel):
    """``POST /api/v1/images/ova`` on an agent: read an OVA's descriptor."""

    file: str = Field(min_length=1, max_length=MAX_PATH, pattern=r"^/[^\x00-\x1f\x7f]*$")


class OvaContents(BaseModel):
    descriptor: str = Field(description="the OVF descriptor's text")
    descriptor_name: str
    files: list[str] = Field(description="the regular files of the archive")


class ImportProgress(BaseModel):
    name: str
    datastore: str
    source: str
    format: ImportFormat
    virtual_size_mib: int
    state: ImportState = ImportState.CONVERTING
    share: float = Field(default=0.0, description="0.0-1.0, from qemu-img convert -p")
    error: str | None = None
    hint: str | None = None


def import_format(info: dict[str, Any], declared: ImportFormat | None, what: str) -> ImportFormat:
    """The format to read ``what`` as, from ``qemu-img info --output=json`` (probed, no ``-f``).

    A file qemu-img takes for raw may be any file at all, so raw is imported only when declared; a
    declared format must be what qemu-img sees (a qcow2 declared raw would import its metadata as
    the guest's disk). An image with a backing file is refused: it is half of a disk.
    """
    found = str(info.get("format", ""))
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidInputError(f"{what} is an overlay of {info.get('backing-filename')!r}, not a whole "
                                "disk.",
                                hint="Flatten it first: qemu-img convert -O qcow2 FILE WHOLE.qcow2.")
    if declared is ImportFormat.RAW and found == "raw":
        return ImportFormat.RAW
    if declared is not None and found != declared.value:
        raise InvalidInputError(f"{what} is {found or 'of no known format'}, not {declared.value}.",
                                hint=f"Leave --format out to import it as {found}." if found else
                                "Check the file.")
    if found == "raw":
        raise InvalidInputError(f"qemu-img sees no disk format in {what}, so it would be taken as raw.",
                                hint="If it is a raw disk, say --format raw; otherwise check the file.")
    try:
        return ImportFormat(found)
    except ValueError:
        raise InvalidInputError(f"{what} is {found}, which vmshift does not import.",
                                hint="Import qcow2, raw, vmdk, vhdx or vdi.") from None


def virtual_size_mib(info: dict[str, Any], what: str) -> int:
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise InvalidInputError(f"{what} reports no disk size.", hint="Check the file; it may be damaged.")
    return math.ceil(size / MIB)


#: ``qemu-img check`` exit codes: 0 consistent, 1 the check could not finish (unreadable: a truncated
#: file), 2 corruptions found, 3 only leaked clusters (harmless: space, not data), 63 no check for
#: this format.
CHECK_OK = (0, 3, 63)


def check_verdict(code: int, report: str, err: str, what: str) -> None:
    """Refuse a file ``qemu-img check --output=json`` found damaged (``report`` its JSON, ``err`` its
    stderr's last line)."""
    try:
        found = json.loads(report) if report.strip() else {}
    except ValueError:
        found = {}
    corruptions, errors = int(found.get("corruptions", 0) or 0), int(found.get("check-errors", 0) or 0)
    if code in CHECK_OK and not corruptions and not errors:
        return
    if corruptions:
        why = f"is corrupt ({corruptions} damaged clusters; a truncated file reads so)"
    else:
        why = f"cannot be checked to the end (truncated or damaged: {err or 'qemu-img check failed'})"
    raise InvalidInputError(f"{what} {why}.",
                            hint="Copy or download the file again; 'qemu-img check FILE' shows the damage.")
