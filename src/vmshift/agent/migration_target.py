"""Target role of a live migration: receive the VM, activate it after the stream, or roll back.

The VM's folder lives on shared storage and already holds the VM (same uuid): the target adopts it
(registration + run dir) and never creates, moves or deletes disks. A relocate (shared-nothing, the
request's ``relocate``) is the exception: the spec names a datastore only this host may see, and the
target creates the VM's disks there, exports them over NBD for the source's mirrors
(agent/relocate_target.py), stops the exports before ``cont`` and removes what it created on a rollback.
The receiving QEMU starts paused (``-S``, ``late-block-activate``) and stays paused after the stream
loaded: it runs only on ``activate``, which the source sends once its own QEMU reported
``completed`` (libvirt's confirm phase). While it only receives, the VM carries an "incoming" mark;
``activate`` removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time

from vmshift.agent import migration_tls, relocate_target
from vmshift.agent.migration_store import MigrationRole, MigrationStore, StoredMigration, TargetState
from vmshift.agent.supervisor import Supervisor
from vmshift.errors import (
    ConflictError,
    IncomingFailedError,
    InvalidInputError,
    NotFoundError,
    QemuError,
    StreamCompletedError,
    VmshiftError,
)
from vmshift.migration.samples import QemuMigrationStatus
from vmshift.migration.uri import tcp_uri
from vmshift.model.agent_migration import Incoming, IncomingRequest, IncomingState, PeerGrant
from vmshift.model.enums import QemuRunState as RunState
from vmshift.model.vm import VmRuntime
from vmshift.qemu import migration_qmp as mq
from vmshift.qemu.qmp import QmpSession
from vmshift.tls.files import HostTlsFiles

log = logging.getLogger(__name__)
ACTIVATE_TIMEOUT_S = 30.0
#: Incoming stream statuses in which the source has handed the VM over: the whole stream loaded,
#: or post-copy began (the source stopped for good; the rest of the memory follows on demand).
HANDED_OVER = frozenset({QemuMigrationStatus.COMPLETED.value, QemuMigrationStatus.POSTCOPY_ACTIVE.value})
ANNOUNCE_INITIAL_MS = 1
#: After the target rolled an incoming migration back, its source may still call for this long
#: (its own rollback, a repeated one); then the grant is gone (agent/access.py).
ENDED_GRACE_S = 30.0


class IncomingMigrations:
    def __init__(self, supervisor: Supervisor, store: MigrationStore, migration_address: str) -> None:
        self.supervisor = supervisor
        self.store = store
        self.address = migration_address
        self._lock = asyncio.Lock()
        self._grants: dict[int, PeerGrant] = {}  # live grants by migration id (agent/access.py)

    def live_grants(self) -> dict[int, PeerGrant]:
        return self._grants

    def _keep_grant(self, rec: StoredMigration, grant: PeerGrant | None) -> None:
        if grant is not None:
            rec.grant = grant
            self._grants[rec.migration_id] = grant

    def revoke_grant(self, migration_id: int) -> bool:
        """The server says the migration ended: its source may call no more (idempotent)."""
        self._grants.pop(migration_id, None)
        rec = self.store.load(migration_id)
        if rec is None or rec.role is not MigrationRole.TARGET or rec.grant is None:
            return False
        rec.grant = None
        self.store.save(rec)
        return True

    def _end_grant(self, rec: StoredMigration) -> None:
        if rec.grant is not None:
            end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ENDED_GRACE_S)
            rec.grant = rec.grant.model_copy(update={"expires_at": min(rec.grant.expires_at, end)})
            self._grants[rec.migration_id] = rec.grant

    def _record(self, migration_id: int) -> StoredMigration:
        rec = self.store.load(migration_id)
        if rec is None or rec.role is not MigrationRole.TARGET:
            raise NotFoundError(f"This host receives no migration {migration_id}.",
                                hint="Prepare it first with POST /api/v1/migrations/incoming.")
        return rec

    async def prepare(self, req: IncomingRequest) -> Incoming:
        """Adopt the VM, start QEMU with ``-incoming defer`` and listen on the migration address."""
        if not self.address:
            raise InvalidInputError("This host has no migration address, so it cannot receive a VM.",
                                    hint="Set 'migration_address' in the agent config.")
        spec = req.spec
        tls_files = HostTlsFiles.of(self.supervisor.config.state_dir)
        if req.tls is not None:
            migration_tls.require_enrolled(tls_files)
        async with self._lock:
            old = self.store.load(req.migration_id)
            if (old is not None and old.role is MigrationRole.TARGET and old.uri
                    and old.target_state is TargetState.LISTENING and self.supervisor.is_alive(spec.name)):
                if old.nonce != req.nonce:
                    mid = req.migration_id
                    raise ConflictError(f"Migration {mid} of another server or an older database still "
                                        f"waits for VM {old.vm!r} on this host.",
                                        hint=f"Roll it back first (DELETE /api/v1/migrations/{mid}).")
                self._keep_grant(old, req.grant)
                self.store.save(old)
                # the same request again: idempotent
                return Incoming(port=int(old.uri.rsplit(":", 1)[1]), uri=old.uri, nbd=old.exports)
            files = self.supervisor.files
            if spec.name in files.registered_names() and not files.is_incoming(spec.name):
                raise ConflictError(f"VM {spec.name!r} is already defined on this host.",
                                    hint="Migrate it to a host that does not run it.")
            created = relocate_target.paths_to_create(files, spec) if req.relocate else []
            files.paths(spec)  # NotFoundError: a datastore this host does not see
            missing = [str(p) for p in files.missing_disks(spec)]
            if missing and not req.relocate:
                raise NotFoundError(f"The disks of VM {spec.name!r} are not visible on this host: "
                                    f"{', '.join(missing)}.",
                                    hint="Live migration needs the VM's datastores shared with this host.")
            rec = StoredMigration(role=MigrationRole.TARGET, migration_id=req.migration_id, vm=spec.name,
                                  spec=spec, target_state=TargetState.LISTENING, nonce=req.nonce,
                                  relocate=req.relocate, created_paths=created)
            self._keep_grant(rec, req.grant)
            self.store.save(rec)  # before anything is created: a rollback after a crash finds the list
            try:
                await self.supervisor.files.define(spec, self.supervisor.config.networks)
                files.mark_incoming(spec.name, req.migration_id)
                runtime = await self.supervisor.start(spec.name, incoming="defer")
                qmp = self.supervisor.qmp_session(spec.name)
                assert runtime.pid is not None
                if req.tls is not None:  # before the NBD server of a relocate: it serves TLS too
                    await migration_tls.setup_target(qmp, tls_files, runtime.pid, req.tls)
                if req.relocate:
                    rec.exports = await relocate_target.export_disks(qmp, runtime.pid, self.address, spec,
                                                                     req.migration_id,
                                                                     tls=req.tls is not None)
                    self.store.save(rec)
                caps = await mq.query_capabilities(qmp)
                # postcopy-ram must be set on both sides before the stream starts; harmless if unused.
                # late-block-activate: with -S, take no write lock on the disks until `cont`.
                wanted = {"events": True, "postcopy-ram": True, "late-block-activate": True}
                await mq.set_capabilities(qmp, {k: v for k, v in wanted.items() if k in caps})
                # QEMU's own RARP is due this long after the stream loaded (default 50 ms); QEMU
                # holds it while the VM is stopped, so it goes out the moment `cont` runs the VM
                # instead of up to 50 ms later (bench/README.md "Where the blackout goes")
                await mq.set_parameters(qmp, {"announce-initial": ANNOUNCE_INITIAL_MS})
                await mq.migrate_incoming(qmp, f"tcp:{self.address}:0")
                port = await mq.listening_port(qmp)
                uri = tcp_uri(self.address, port)
            except BaseException:
                await self._cleanup(rec)
                raise
            rec.uri = uri
            self.store.save(rec)
            log.info("migration %d: VM %s waits for its stream on %s", rec.migration_id, spec.name, rec.uri)
            return Incoming(port=port, uri=rec.uri, nbd=rec.exports)

    async def state(self, migration_id: int) -> IncomingState:
        """The target's proof, read from its QEMU: has the whole stream arrived, has the VM run here?"""
        rec = self._record(migration_id)
        alive = self.supervisor.is_alive(rec.vm)
        run_state: str | None = None
        stream: str | None = None
        encrypted: bool | None = None
        if alive:
            with contextlib.suppress(VmshiftError):
                qmp = self.supervisor.qmp_session(rec.vm)
                # The stream first: QEMU sets the loaded VM's run state (paused under -S) before it
                # marks the incoming migration completed, so a completed stream is never reported
                # beside the "inmigrate" it had left a moment before (read the other way round, a
                # stream completing between the two reads showed exactly that).
                stream = str((await mq.query_migrate(qmp)).get("status", "none"))
                run_state = (await qmp.query_status()).status
                if rec.target_state is TargetState.LISTENING:  # afterwards its parameters are reset
                    encrypted = await migration_tls.encrypted(qmp)
        assert rec.target_state is not None
        return IncomingState(migration_id=migration_id, vm=rec.vm, state=rec.target_state.value,
                             qemu_alive=alive, qemu_status=run_state, stream=stream,
                             timeline=rec.timeline, encrypted=encrypted)

    async def activate(self, migration_id: int) -> VmRuntime:
        """The source confirmed its stream completed: run the received VM (``cont``) and announce it.

        QEMU's own state decides, not the record: the VM runs only once QEMU reports the incoming
        stream ``completed`` (it waits paused, ``-S``). If the stream provably did not load here
        (QEMU reports it failed, or is still ``inmigrate`` at the deadline), the VM never ran on
        this host: clean up and raise ``IncomingFailedError`` so the source may resume its copy.
        A vanished QEMU proves nothing.
        """
        rec = self._record(migration_id)
        if rec.target_state is TargetState.ACTIVATED:
            return await self.supervisor.runtime(rec.vm)  # a repeated confirm
        if rec.target_state is TargetState.LOAD_FAILED:
            raise self._never_ran(rec, "its incoming migration failed earlier")
        if rec.target_state is TargetState.ROLLED_BACK:
            raise ConflictError(f"Migration {migration_id} was rolled back on this host.",
                                hint="Start the migration again.")
        deadline = time.monotonic() + ACTIVATE_TIMEOUT_S
        if rec.relocate and self.supervisor.is_alive(rec.vm):
            # the source completed its mirrors before the device state left it: close the disks'
            # NBD exports before the guest runs, so only the guest writes to them from now on
            await relocate_target.stop_exports(self.supervisor.qmp_session(rec.vm), migration_id)
        if await self._cont_on_event(rec):
            deadline = 0.0  # ran: the loop below only confirms it
        while True:
            if not self.supervisor.is_alive(rec.vm):
                raise QemuError(f"The receiving QEMU of VM {rec.vm!r} is gone; the stream did not arrive.",
                                hint="Roll the migration back; the VM still exists on the source.")
            qmp = self.supervisor.qmp_session(rec.vm)
            seen = qmp.last_seq
            status = await qmp.query_status()
            if status.running:
                break  # activated before (a repeated request)
            stream = QemuMigrationStatus.parse(str((await mq.query_migrate(qmp)).get("status", "none")))
            if stream.value in HANDED_OVER and status.state is RunState.PAUSED:
                await qmp.cont()
                self._mark_cont(rec, qmp)
                break
            if stream is QemuMigrationStatus.FAILED:
                await self._load_failed(rec)
                raise self._never_ran(rec, "QEMU could not load its state")
            if time.monotonic() > deadline:
                if status.state is RunState.INMIGRATE:
                    await self._load_failed(rec)
                    raise self._never_ran(rec, f"its state did not arrive within {ACTIVATE_TIMEOUT_S:g} s")
                raise QemuError(f"VM {rec.vm!r} did not start running here within {ACTIVATE_TIMEOUT_S:g} s "
                                f"(QEMU status {status.status!r}, stream {stream.value!r}).",
                                hint="Check that the source reports the migration completed.")
            # still loading: the MIGRATION event says when it is done
            await qmp.wait_event("MIGRATION", timeout_s=0.5, after_seq=seen)
        try:
            await mq.announce_self(qmp)
        except QemuError as exc:  # the VM runs; a missed announcement only delays the switches
            log.warning("migration %d: announce-self failed: %s", migration_id, exc)
        await migration_tls.teardown(qmp, migration_id)  # its next migration may be plain
        self.supervisor.files.clear_incoming(rec.vm)
        rec.target_state = TargetState.ACTIVATED
        self.store.save(rec)
        log.info("migration %d: VM %s is active on this host", migration_id, rec.vm)
        return await self.supervisor.runtime(rec.vm)

    async def _cont_on_event(self, rec: StoredMigration) -> bool:
        """The fast path of the confirm: this QEMU (started for this one migration) already told us
        by its MIGRATION event that the whole stream loaded, so `cont` at once, without first asking
        query-status and query-migrate (each a monitor round trip while the client waits)."""
        if not self.supervisor.is_alive(rec.vm):
            return False
        qmp = self.supervisor.qmp_session(rec.vm)
        loaded = any(e.data.get("status") in HANDED_OVER for e in qmp.events_named("MIGRATION"))
        if not loaded or qmp.events_named("RESUME"):
            return False
        try:
            await qmp.cont()
        except QemuError as exc:  # not paused after all: the careful path decides
            log.info("migration %d: cont on the load event failed (%s); checking QEMU", rec.migration_id, exc)
            return False
        self._mark_cont(rec, qmp)
        return True

    def _mark_cont(self, rec: StoredMigration, qmp: QmpSession) -> None:
        """Timeline: when the stream loaded here, when the vCPUs ran, when QEMU's own RARP went out."""
        timeline = rec.timeline
        loaded = [e for e in qmp.events_named("MIGRATION") if e.data.get("status") == "completed"]
        if loaded:
            timeline.target_loaded = loaded[-1].time
        resumed = qmp.events_named("RESUME")
        timeline.target_cont = resumed[-1].time if resumed else time.time()
        # QEMU holds its own RARP while the VM is stopped and sends it at `cont` (measured:
        # 0.03-0.19 ms after RESUME, bench/README.md "Where the blackout goes")
        timeline.first_announce = timeline.target_cont

    async def rollback(self, migration_id: int) -> None:
        """Kill the receiving QEMU and forget the VM here (idempotent; never touches shared files).

        Refused once QEMU has received the whole stream or runs the VM, whatever the record says:
        then this host may hold the only current copy of the VM.
        """
        rec = self.store.load(migration_id)
        if rec is None or rec.role is not MigrationRole.TARGET:
            return
        if rec.target_state in (TargetState.LOAD_FAILED, TargetState.ROLLED_BACK):
            return  # already cleaned up; keep the proof that the VM never ran here
        async with self._lock:
            if rec.target_state is TargetState.ACTIVATED:
                raise StreamCompletedError(
                    f"Migration {migration_id} is complete: VM {rec.vm!r} runs on this host now.",
                    hint="Migrate it back instead of rolling back.")
            if self.supervisor.is_alive(rec.vm):
                qmp = self.supervisor.qmp_session(rec.vm)
                status = await qmp.query_status()
                stream = str((await mq.query_migrate(qmp)).get("status", "none"))
                if status.running:
                    raise StreamCompletedError(
                        f"VM {rec.vm!r} runs on this host (migration {migration_id}).",
                        hint="Migrate it back instead of rolling back.")
                if stream in HANDED_OVER:
                    raise StreamCompletedError(
                        f"The receiving QEMU of VM {rec.vm!r} holds the whole VM (its stream completed), "
                        "so it is not discarded.",
                        hint=f"Finish the move with 'vmshift migration finalize {migration_id}'.")
            await self._cleanup(rec)

    async def _load_failed(self, rec: StoredMigration) -> None:
        async with self._lock:
            await self._cleanup(rec, TargetState.LOAD_FAILED)

    @staticmethod
    def _never_ran(rec: StoredMigration, why: str) -> IncomingFailedError:
        return IncomingFailedError(f"VM {rec.vm!r} never ran on the target host: {why}; "
                                   "the target removed its receiving QEMU.",
                                   hint="Resume the VM on the source host, which still holds all of it.")

    async def _cleanup(self, rec: StoredMigration, state: TargetState = TargetState.ROLLED_BACK) -> None:
        try:
            files = self.supervisor.files
            if files.is_incoming(rec.vm) or rec.vm not in files.registered_names():
                await self.supervisor.stop_and_unregister(rec.vm)
        except VmshiftError as exc:
            log.warning("migration %d: cleaning up VM %s failed: %s", rec.migration_id, rec.vm, exc)
        if rec.created_paths and not self.supervisor.is_alive(rec.vm):
            relocate_target.remove_created(rec.created_paths)  # a relocate's new disks and folder only
            log.info("migration %d: removed %s", rec.migration_id, ", ".join(rec.created_paths))
            rec.created_paths = []
        rec.target_state = state
        self._end_grant(rec)
        self.store.save(rec)
        log.info("migration %d: incoming VM %s rolled back (%s)", rec.migration_id, rec.vm, state.value)

    async def resume_all(self) -> None:
        """At agent start: an incoming QEMU that died while the agent was down is cleaned up."""
        for rec in self.store.all():
            if rec.role is MigrationRole.TARGET and rec.grant is not None:
                self._grants[rec.migration_id] = rec.grant
            if (rec.role is MigrationRole.TARGET and rec.target_state is TargetState.LISTENING
                    and not self.supervisor.is_alive(rec.vm)):
                log.warning("migration %d: the receiving QEMU of %s is gone; rolling back",
                            rec.migration_id, rec.vm)
                await self._cleanup(rec)
