"""The server's long-lived parts, built at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from vmshift.client.agent import AgentCredentials, AgentPool
from vmshift.model.api import EventKind, TaskKind
from vmshift.server.db.change_feed import ChangeFeed
from vmshift.server.db.setup import make_engine, seed_defaults, upgrade_schema
from vmshift.server.drs.service import DrsService, DrsServiceSettings
from vmshift.server.events import record_event
from vmshift.server.heartbeat import Heartbeat
from vmshift.server.load_history import LoadHistorySettings, LoadSampler
from vmshift.server.migration_finalize import Finalizer
from vmshift.server.migrations import MigrationOrchestrator
from vmshift.server.moves.runner import DiskMoves
from vmshift.server.retention import Retention, RetentionPolicy
from vmshift.server.schedules import Scheduler
from vmshift.server.settings import ServerSettings
from vmshift.server.tasks import TaskEngine
from vmshift.server.vm_names import VmNamesByHost
from vmshift.server.vm_views import REFRESH_S, VmViews
from vmshift.tls.files import ServerTlsFiles, private_dir

log = logging.getLogger("vmshift.server")


@dataclass
class ServerCore:
    settings: ServerSettings
    engine: Engine
    sessions: sessionmaker[Session]
    agents: AgentPool
    tasks: TaskEngine
    heartbeat: Heartbeat
    migrations: MigrationOrchestrator
    finalizer: Finalizer
    moves: DiskMoves
    feed: ChangeFeed  # what this server's transactions changed (server/db/change_feed.py)
    vm_names: VmNamesByHost = field(init=False)  # each host's VM names for host lists
    vm_views: VmViews = field(init=False)  # each VM's API view, between the commits that change it
    schedules: Scheduler = field(init=False)  # scheduled migrations (server/schedules.py)
    retention: Retention = field(init=False)  # purge of old history (server/retention.py)
    load_sampler: LoadSampler = field(init=False)  # the hosts' load history (server/load_history.py)
    drs: DrsService = field(init=False)  # DRS passes and recommendations (server/drs/)
    _views_task: asyncio.Task[None] | None = field(default=None, init=False)
    _views_build: asyncio.Future[int] | None = field(default=None, init=False)  # the thread's work

    def __post_init__(self) -> None:
        self.vm_names = VmNamesByHost(self.feed)
        self.vm_views = VmViews(self.feed)
        self.schedules = Scheduler(self.sessions)
        self.retention = Retention(
            self.sessions, RetentionPolicy.from_settings(self.settings), self.settings.retention_interval_s
        )
        loads = LoadHistorySettings(step_s=self.settings.load_step_s, window_s=self.settings.load_window_s)
        self.load_sampler = LoadSampler(self.sessions, self.heartbeat.load_samples, loads)
        self.drs = DrsService(DrsServiceSettings(interval_s=self.settings.drs_interval_s), loads)

    @classmethod
    def open(cls, settings: ServerSettings) -> ServerCore:
        """Connect, upgrade the schema, seed defaults, fail over tasks of a dead server (no loop needed)."""
        private_dir(settings.state_dir)
        engine = make_engine(settings.database_url(), settings.db_pool_size)
        upgrade_schema(engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        seed_defaults(sessions)
        tasks = TaskEngine(sessions)
        failed = tasks.recover(keep={TaskKind.VM_MIGRATE})  # migrations are resumed in start()
        with sessions.begin() as s:
            record_event(
                s,
                EventKind.SERVER_STARTED,
                "server",
                f"Server started ({settings.database_kind().value} database"
                f"{f', {failed} interrupted task(s) marked failed' if failed else ''}).",
            )
        # mutual TLS towards the agents: the server's certificate from the cluster CA (tls/files.py)
        ServerTlsFiles.of(settings.state_dir).ensure([])
        agents = AgentPool(AgentCredentials.of_server(settings.state_dir), settings.agent_timeout_s)
        feed = ChangeFeed(sessions)
        heartbeat = Heartbeat(
            sessions, agents, tasks, feed, settings.heartbeat_interval_s, settings.missed_heartbeats
        )
        migrations = MigrationOrchestrator(sessions, agents, tasks, settings)
        finalizer = Finalizer(sessions, agents, tasks)
        moves = DiskMoves(sessions, agents, tasks, settings, migrations)
        return cls(settings, engine, sessions, agents, tasks, heartbeat, migrations, finalizer, moves, feed)

    def start(self) -> None:
        # Resume migrations first: the heartbeat then already sees their VMs as busy.
        self.migrations.resume_all()
        self.moves.resume_all()
        self.heartbeat.start()
        # the VMs' views are built in the background, so that a full listing does not pay for them
        self._views_task = asyncio.get_running_loop().create_task(self._keep_views())
        self.schedules.start(self)  # after the resumes: a run sees moves in flight
        self.retention.start()  # after the resumes: what they picked up is unfinished, never purged
        self.load_sampler.start()
        self.drs.start(self)  # after the resumes: a pass sees the moves in flight

    async def _keep_views(self) -> None:
        """All views at start, then those invalidated since, every ``REFRESH_S``."""
        loop = asyncio.get_running_loop()
        build: Callable[[sessionmaker[Session]], int] = self.vm_views.warm
        while True:
            self._views_build = loop.run_in_executor(None, build, self.sessions)
            try:
                await asyncio.shield(self._views_build)  # close() waits for the thread's chunk
            except (SQLAlchemyError, ValueError) as e:  # a listing builds what it lacks: nothing is lost
                log.warning("building the VMs' views in the background failed: %s", e)
            build = self.vm_views.refresh
            await asyncio.sleep(REFRESH_S)

    async def close(self) -> None:
        if self._views_task is not None:
            self._views_task.cancel()
            # the thread's work ends first: not while the engine goes away under it
            await asyncio.gather(self._views_task, *filter(None, [self._views_build]), return_exceptions=True)
        await self.drs.stop()
        await self.load_sampler.stop()
        await self.retention.stop()
        await self.schedules.stop()
        await self.heartbeat.stop()
        await self.tasks.shutdown()
        await self.agents.aclose()
        self.engine.dispose()

