"""Typed Python SDK of the vmshift server's REST API (used by the CLI and the tests).

HTTP failures are mapped to the vmshift error tree here, at the edge: an error body from the
server becomes ``ApiError`` with its status, code, message and hint; a connection failure becomes
``HostUnreachableError`` naming the server address; a server certificate that does not verify
becomes ``UntrustedPeerError`` saying how to trust the cluster CA (``client/trust.py``).

List methods page transparently: they follow the server's ``X-Next-Cursor`` until the last page
(``limit`` is the page size, ``max_items`` stops early), so they return every matching item.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from vmshift.client import trust
from vmshift.errors import ApiError, HostUnreachableError, VmshiftError
from vmshift.model.enums import PowerAction, TaskState

Json = dict[str, Any]

NEXT_CURSOR_HEADER = "X-Next-Cursor"  # the server's name for it: server/api/paging.py


def _filters(**given: Any) -> Json:
    """The query parameters that were given (None: not filtered); enums and times as the API spells them."""
    out: Json = {}
    for key, value in given.items():
        if value is None:
            continue
        out[key] = value.isoformat() if isinstance(value, datetime) else str(value)
    return out


class FingerprintUnconfirmedError(ApiError):
    """``POST /hosts`` without the agent's confirmed fingerprint: ``fingerprint`` is the agent's."""

    def __init__(self, error: ApiError, fingerprint: str) -> None:
        super().__init__(error.message, status=error.status, code=error.code, hint=error.hint)
        self.fingerprint = fingerprint


def _error_from_response(resp: httpx.Response) -> ApiError:
    text = resp.text.strip()[:200] or resp.reason_phrase
    error = ApiError.from_response(resp, f"The server answered {resp.status_code}: {text}")
    try:
        body = resp.json()
    except ValueError:
        return error
    fingerprint = body.get("fingerprint") if isinstance(body, dict) else None
    return FingerprintUnconfirmedError(error, fingerprint) if isinstance(fingerprint, str) else error


class VmshiftClient:
    """Synchronous client of one vmshift server at an ``https://`` URL, verified against ``ca_file``
    (default ``$VMSHIFT_CA_FILE``, else the system's trusted CAs)."""

    def __init__(self, server: str, token: str, *, ca_file: str | Path | None = None,
                 timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        trust.check_url(self.server)
        self.ca_file = Path(ca_file).expanduser() if ca_file is not None else trust.ca_file_from_env()
        self._http = httpx.Client(
            base_url=self.server + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=trust.server_trust(self.ca_file),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VmshiftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json: Any = None, params: Json | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        if not resp.content:
            return None
        return resp.json()

    def pages(
        self, path: str, params: Json | None = None, *, limit: int | None = None
    ) -> Iterator[list[Json]]:
        """Each page of a list route, following the cursor until the server sends none."""
        query: Json = dict(params or {})
        if limit is not None:
            query["limit"] = limit
        while True:
            try:
                resp = self._http.get(path, params=query)
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code >= 400:
                raise _error_from_response(resp)
            yield list(resp.json())
            cursor = resp.headers.get(NEXT_CURSOR_HEADER)
            if not cursor:
                return
            query["cursor"] = cursor

    def list_all(self, path: str, params: Json | None = None, *, limit: int | None = None,
                 max_items: int | None = None) -> list[Json]:
        """Every item of a list route (at most ``max_items``), page by page."""
        items: list[Json] = []
        for page in self.pages(path, params, limit=limit):
            items.extend(page)
            if max_items is not None and len(items) >= max_items:
                return items[:max_items]
        return items

    def _unreachable(self, exc: httpx.TransportError) -> VmshiftError:
        failed = trust.verify_failure(exc)
        if failed is not None:
            return trust.untrusted(self.server, self.ca_file, failed)
        return HostUnreachableError(
            f"Cannot reach the vmshift server at {self.server} ({exc.__class__.__name__}: {exc}).",
            hint="Check --server / VMSHIFT_SERVER, or bring a lab up with 'vmshift lab up'.",
        )

    @staticmethod
    def _q(name: str | int) -> str:
        return quote(str(name), safe="")

    # -- inventory --------------------------------------------------------------------------
    def about(self) -> Json:
        return dict(self.request("GET", "/about"))

    def list_hosts(self, *, cluster: str | None = None, connection_state: str | None = None,
                   name_prefix: str | None = None, limit: int | None = None) -> list[Json]:
        """Every host (by name), filtered by cluster, connection state and name prefix when given."""
        return self.list_all("/hosts", _filters(cluster=cluster, connection_state=connection_state,
                                                name_prefix=name_prefix), limit=limit)

    def get_host(self, name: str) -> Json:
        return dict(self.request("GET", f"/hosts/{self._q(name)}"))

    def add_host(self, address: str, cluster: str | None = None, fingerprint: str | None = None) -> Json:
        """Raises FingerprintUnconfirmedError (with the agent's fingerprint) unless ``fingerprint``
        is the agent's certificate fingerprint."""
        body = {"address": address, "cluster": cluster, "fingerprint": fingerprint}
        return dict(self.request("POST", "/hosts", json=body))

    def rotate_host_cert(self, name: str) -> Json:
        return dict(self.request("POST", f"/hosts/{self._q(name)}/rotate-cert"))

    def remove_host(self, name: str) -> None:
        self.request("DELETE", f"/hosts/{self._q(name)}")

    def maintenance_plan(self, name: str) -> Json:
        """GET /hosts/NAME/maintenance/plan: where each VM would go; ``refused`` says why it cannot."""
        return dict(self.request("GET", f"/hosts/{self._q(name)}/maintenance/plan"))

    def enter_maintenance(self, name: str) -> Json:
        """POST /hosts/NAME/maintenance/enter: the parent task that evacuates the host, then marks it."""
        return dict(self.request("POST", f"/hosts/{self._q(name)}/maintenance/enter"))

    def exit_maintenance(self, name: str, *, return_vms: bool = False) -> Json:
        return dict(self.request("POST", f"/hosts/{self._q(name)}/maintenance/exit",
                                 json={"return_vms": return_vms}))

    def set_maintenance(self, name: str, enter: bool) -> Json:
        return dict(self.request("POST", f"/hosts/{self._q(name)}/maintenance", json={"enter": enter}))

    def list_datastores(self, *, limit: int | None = None) -> list[Json]:
        return self.list_all("/datastores", limit=limit)

    def add_iscsi_datastore(self, name: str, *, portal: str, target: str, storage_role: str, token: str,
                            hosts: list[str] | None = None) -> Json:
        """POST /datastores: an existing iSCSI target (and its storage role) as a datastore on hosts."""
        body: Json = {"name": name, "portal": portal, "target": target, "storage_role": storage_role,
                      "token": token, "hosts": hosts or []}
        return dict(self.request("POST", "/datastores", json=body))

    def remove_datastore(self, name: str) -> None:
        """DELETE /datastores/NAME: unregister a datastore `datastore add` registered, on every host."""
        self.request("DELETE", f"/datastores/{self._q(name)}")

    def list_networks(self, *, limit: int | None = None) -> list[Json]:
        return self.list_all("/networks", limit=limit)

    def set_ip_pool(self, network: str, cidr: str, first: str, last: str) -> Json:
        body = {"cidr": cidr, "first": first, "last": last}
        return dict(self.request("PUT", f"/networks/{self._q(network)}/ip-pool", json=body))

    # -- VMs --------------------------------------------------------------------------------
    def list_vms(self, *, host: str | None = None, cluster: str | None = None, power_state: str | None = None,
                 name_prefix: str | None = None, limit: int | None = None) -> list[Json]:
        """Every VM (by name), filtered by host, cluster, power state and name prefix when given."""
        return self.list_all("/vms", _filters(host=host, cluster=cluster, power_state=power_state,
                                              name_prefix=name_prefix), limit=limit)

    def get_vm(self, name: str) -> Json:
        return dict(self.request("GET", f"/vms/{self._q(name)}"))

    def create_vm(self, spec: Json) -> Json:
        return dict(self.request("POST", "/vms", json=spec))

    def import_image(self, body: Json) -> Json:
        """Start an image.import task (docs/images.md); a bad file is refused at once."""
        return dict(self.request("POST", "/images/import", json=body))

    def import_vm(self, body: Json) -> Json:
        """Start a vm.import task from an OVA or a libvirt domain (docs/images.md); what cannot be
        mapped is refused at once, all of it listed."""
        return dict(self.request("POST", "/vm-imports", json=body))

    def power_vm(self, name: str, action: PowerAction) -> Json:
        return dict(self.request("POST", f"/vms/{self._q(name)}/power", json={"action": action.value}))

    def suspend_vm(self, name: str) -> Json:
        """Start a vm.suspend task (docs/suspend.md); resume with ``resume_vm`` or ``power_vm(START)``."""
        return dict(self.request("POST", f"/vms/{self._q(name)}/suspend"))

    def delete_vm(self, name: str) -> Json:
        return dict(self.request("DELETE", f"/vms/{self._q(name)}"))

    # -- live migration ---------------------------------------------------------------------
    def migrate_vm(
        self,
        name: str,
        host: str | None = None,
        *,
        datastore: str | None = None,
        disk_format: str | None = None,
        check_only: bool = False,
        dry_run: bool = False,
        max_downtime_ms: int | None = None,
        allow_postcopy: bool | None = None,
        postcopy_after_s: float | None = None,
        bandwidth_limit_bps: float | None = None,
        encryption: str | None = None,
    ) -> Json:
        """POST /vms/{name}/migrate: a CheckReport (check_only), a preview (dry_run), or the task (202).

        A host moves the VM there, a datastore moves its files there, both do both; the kind of move
        (live, storage, cold, suspended) follows from the VM's power state. Failed checks raise
        ApiError (409/422) with the first error's message and hint.
        """
        body: Json = {"check_only": check_only, "dry_run": dry_run}
        for key, value in (
            ("host", host),
            ("datastore", datastore),
            ("disk_format", disk_format),
            ("max_downtime_ms", max_downtime_ms),
            ("allow_postcopy", allow_postcopy),
            ("postcopy_after_s", postcopy_after_s),
            ("bandwidth_limit_bps", bandwidth_limit_bps),
            ("encryption", encryption),
        ):
            if value is not None:
                body[key] = value
        return dict(self.request("POST", f"/vms/{self._q(name)}/migrate", json=body))

    def list_migrations(self, max_items: int | None = None, vm: str | None = None, *,
                        since: int | None = None, limit: int | None = None) -> list[Json]:
        """Migrations newest first (at most ``max_items``): of one VM, newer than id ``since``."""
        return self.list_all("/migrations", _filters(vm=vm, since=since), limit=limit, max_items=max_items)

    def get_migration(self, migration_id: str | int) -> Json:
        return dict(self.request("GET", f"/migrations/{self._q(migration_id)}"))

    def finalize_migration(self, migration_id: str | int) -> Json:
        """POST /migrations/{id}/finalize: a task that ends a migration waiting paused on both hosts."""
        return dict(self.request("POST", f"/migrations/{self._q(migration_id)}/finalize"))

    def resume_vm(self, name: str, *, force: bool = False) -> Json:
        """POST /vms/{name}/resume: a task (for a VM left paused by a migration, only if the target
        provably never ran it, or with ``force``)."""
        return dict(self.request("POST", f"/vms/{self._q(name)}/resume", json={"force": force}))

    def set_vm_migration_settings(self, name: str, **settings: Any) -> Json:
        """PATCH max_downtime_ms / allow_postcopy / encryption of a VM."""
        return dict(self.request("PATCH", f"/vms/{self._q(name)}/migration-settings", json=settings))

    def set_host_migration_settings(self, name: str, **settings: Any) -> Json:
        """PATCH bandwidth_limit_bps / link_rate_bps / migration_limit / encryption of a host (None clears
        a rate)."""
        return dict(self.request("PATCH", f"/hosts/{self._q(name)}/migration-settings", json=settings))

    # ----- DRS (docs/drs.md) ------------------------------------------------------------------
    def set_cluster_drs(self, cluster: str, *, automation: str | None = None,
                        threshold: int | None = None) -> Json:
        """PATCH a cluster's DRS automation level and threshold (only those given change)."""
        body = {k: v for k, v in (("automation", automation), ("threshold", threshold)) if v is not None}
        return dict(self.request("PATCH", f"/clusters/{self._q(cluster)}/drs", json=body))

    def get_cluster_drs(self, cluster: str) -> Json:
        return dict(self.request("GET", f"/clusters/{self._q(cluster)}/drs"))

    def set_vm_drs(self, vm: str, drs: str) -> Json:
        return dict(self.request("PATCH", f"/vms/{self._q(vm)}/drs", json={"drs": drs}))

    def run_drs(self, cluster: str) -> Json:
        """POST: one DRS pass now, a task whose result is the pass (what was recommended, and why)."""
        return dict(self.request("POST", f"/clusters/{self._q(cluster)}/drs/run"))

    def drs_recommendations(self, cluster: str | None = None, states: list[str] | None = None) -> list[Json]:
        params: Json = {}
        if cluster is not None:
            params["cluster"] = cluster
        if states:
            params["state"] = states
        return list(self.request("GET", "/drs/recommendations", params=params))

    def apply_recommendation(self, rid: int) -> Json:
        return dict(self.request("POST", f"/drs/recommendations/{rid}/apply"))

    def dismiss_recommendation(self, rid: int) -> Json:
        return dict(self.request("POST", f"/drs/recommendations/{rid}/dismiss"))

    def simulate_drs(self, cluster: str, *, remove_host: str | None = None,
                     add_vm: str | None = None) -> Json:
        body = {k: v for k, v in (("remove_host", remove_host), ("add_vm", add_vm)) if v is not None}
        return dict(self.request("POST", f"/clusters/{self._q(cluster)}/drs/simulate", json=body))

    def metrics_text(self) -> str:
        """The Prometheus text of GET /metrics (same token as the API)."""
        try:
            resp = self._http.get(self.server + "/metrics")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        return resp.text

    # -- scheduled migrations ---------------------------------------------------------------
    def add_schedule(
        self,
        vm: str,
        migrate: Json,
        *,
        at: str | None = None,
        cron: str | None = None,
        timezone: str = "UTC",
        name: str | None = None,
    ) -> Json:
        """POST /schedules: once ``at`` (ISO 8601 with a zone) or at every time of ``cron``; ``migrate`` is
        the body of a migrate request (model.migration.MigrationCreate)."""
        body: Json = {"vm": vm, "migrate": migrate, "timezone": timezone}
        for key, value in (("at", at), ("cron", cron), ("name", name)):
            if value is not None:
                body[key] = value
        return dict(self.request("POST", "/schedules", json=body))

    def list_schedules(self, vm: str | None = None, *, limit: int | None = None) -> list[Json]:
        return self.list_all("/schedules", _filters(vm=vm), limit=limit)

    def get_schedule(self, name: str) -> Json:
        """One schedule with its runs, newest first."""
        return dict(self.request("GET", f"/schedules/{self._q(name)}"))

    def delete_schedule(self, name: str) -> Json:
        return dict(self.request("DELETE", f"/schedules/{self._q(name)}"))

    # -- affinity rules ----------------------------------------------------------------------
    def add_rule(self, name: str, cluster: str, kind: str, vms: list[str], *, strength: str = "must",
                 hosts: list[str] | None = None) -> Json:
        """POST /rules: ``kind`` and ``strength`` as model.placement spells them."""
        body: Json = {"name": name, "cluster": cluster, "kind": kind, "strength": strength, "vms": vms,
                      "hosts": hosts or []}
        return dict(self.request("POST", "/rules", json=body))

    def list_rules(self, cluster: str | None = None) -> list[Json]:
        return list(self.request("GET", "/rules", params=_filters(cluster=cluster)))

    def delete_rule(self, name: str, cluster: str | None = None) -> Json:
        return dict(self.request("DELETE", f"/rules/{self._q(name)}", params=_filters(cluster=cluster)))

    # -- tasks and events -------------------------------------------------------------------
    def list_tasks(self, max_items: int | None = None, *, target: str | None = None, state: str | None = None,
                   since: int | None = None, after: datetime | str | None = None,
                   before: datetime | str | None = None, limit: int | None = None) -> list[Json]:
        """Tasks newest first (at most ``max_items``); ``since`` an id, ``after``/``before`` the creation."""
        params = _filters(target=target, state=state, since=since, after=after, before=before)
        return self.list_all("/tasks", params, limit=limit, max_items=max_items)

    def get_task(self, task_id: str | int) -> Json:
        return dict(self.request("GET", f"/tasks/{self._q(task_id)}"))

    def cancel_task(self, task_id: str | int) -> Json:
        return dict(self.request("POST", f"/tasks/{self._q(task_id)}/cancel"))

    def list_events(self, max_items: int | None = None, target: str | None = None, *,
                    since: int | None = None, after: datetime | str | None = None,
                    before: datetime | str | None = None, limit: int | None = None) -> list[Json]:
        """Events newest first (at most ``max_items``); ``since`` an event id, ``after``/``before`` times."""
        params = _filters(target=target, since=since, after=after, before=before)
        return self.list_all("/events", params, limit=limit, max_items=max_items)

    def wait_task(
        self,
        task_id: str | int,
        *,
        timeout: float = 600.0,
        interval: float = 0.25,
        on_update: Callable[[Json], None] | None = None,
    ) -> Json:
        """Poll a task until it finishes; return its final record (raise on timeout only)."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.get_task(task_id)
            if on_update:
                on_update(task)
            if TaskState(task["state"]).finished:
                return task
            if time.monotonic() > deadline:
                raise VmshiftError(
                    f"Task {task_id} did not finish within {timeout:.0f} s.",
                    hint=f"Follow it with 'vmshift task watch {task_id}'.",
                )
            time.sleep(interval)
