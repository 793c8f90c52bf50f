"""Keeps the served versions in step with the repository while the server runs.

Every ``--poll-seconds`` (and on SIGHUP) the manager reads the repository: each
model's complete versions and its version policy (``model.toml``). It loads and
warms a version the policy selects on a loader thread, off the event loop, and
switches it in (:meth:`InferenceCore.add_version`); only then does it switch out
the versions the policy no longer selects, let the requests admitted to them
finish, and release their memory. A version that fails to load (corrupt or missing
file, wrong shape, bad metadata) is marked failed with its reason and is skipped
until its files change; it never replaces a serving version, because versions are
selected among those that have not failed, and a model whose policy then selects no
version at all keeps the versions it serves.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from costserve.server.core import InferenceCore
from costserve.server.domain import ModelStatus, VersionState, VersionStatus
from costserve.server.memory import trim_c_heap
from costserve.server.metrics import ServiceMetrics
from costserve.server.repository.store import (
    Fp32Runtime,
    LoadedModel,
    ModelConfig,
    list_models,
    list_versions,
    load_model,
    stray_entries,
)
from costserve.server.settings import Settings

log = logging.getLogger(__name__)


#: How long an unloaded version's admitted requests may take to finish before it is stopped, in seconds.
UNLOAD_WAIT_S = 30.0


@dataclass(frozen=True)
class _Wanted:
    """What the repository asks of one model: its directory, the versions to serve, or why none can be chosen."""

    directory: Path
    versions: dict[str, Path]
    problem: str = ""
    #: The complete versions on disk, chosen or not; None when the directory could not be read.
    on_disk: frozenset[str] | None = None


def _signature(version_dir: Path) -> tuple[int, int, int]:
    """Changes when any file of a version is rewritten, added or removed: a failed version is tried again then."""
    try:
        stats = [path.stat() for path in version_dir.rglob("*") if path.is_file()]
    except OSError:
        return (0, 0, 0)
    return (max((stat.st_mtime_ns for stat in stats), default=0), sum(stat.st_size for stat in stats), len(stats))


class RepositoryManager:
    """Loads, reloads and unloads model versions for ``core``; ``await start()`` then runs until ``stop()``.

    With ``settings.model_dir`` set it manages that one model directory; otherwise every
    model of ``settings.model_repository``. ``preloaded`` versions (tests load one model
    once for many servers) are served without loading and are never closed here.
    """

    def __init__(
        self,
        core: InferenceCore,
        settings: Settings,
        metrics: ServiceMetrics,
        preloaded: list[LoadedModel] | None = None,
        load: Callable[[Path, int, int, Fp32Runtime], LoadedModel] = load_model,
    ) -> None:
        self.core = core
        self.settings = settings
        self.metrics = metrics
        self._load = load
        self._preloaded = {(model.name, model.version): model for model in preloaded or []}
        #: The state of every version the manager knows, by model then version.
        self.states: dict[str, dict[str, VersionStatus]] = {}
        #: Seconds each version took to load, warm and switch in, by (model, version).
        self.load_seconds: dict[tuple[str, str], float] = {}
        #: Repository scans begun so far; a version published before scan n begins is found by scan n.
        self.scans = 0
        #: The scan that first found each version loaded, by (model, version).
        self.found_in_scan: dict[tuple[str, str], int] = {}
        #: Stray entries of model directories already warned about.
        self._warned: set[tuple[str, str]] = set()
        #: Failed versions and the metadata signature they failed with.
        self._failed: dict[tuple[str, str], tuple[int, int, int]] = {}
        #: The problem last logged per model, so that a lasting one is logged once.
        self._problems: dict[str, str] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._poll_now = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reconciling = asyncio.Lock()
        core.model_statuses = self.statuses

    # -- reading the repository ---------------------------------------------------------------

    def _model_dirs(self) -> dict[str, Path]:
        if self.settings.model_dir is not None:
            return {self.settings.model_dir.name: self.settings.model_dir}
        return {path.name: path for path in list_models(self.settings.model_repository)}

    def _wanted(self) -> dict[str, _Wanted]:
        """Per model, the versions its policy selects among the complete ones that have not failed."""
        wanted: dict[str, _Wanted] = {}
        for name, directory in self._model_dirs().items():
            try:
                config = ModelConfig.read(directory)
                strays = stray_entries(directory)
                complete = list_versions(directory)
            except (OSError, ValueError) as error:  # unreadable, or removed while being read
                wanted[name] = _Wanted(directory, {}, str(error))
                continue
            for stray in strays:
                if (name, stray) not in self._warned:
                    self._warned.add((name, stray))
                    log.warning("model %s: %s is not a version (a positive integer) and is ignored", name, stray)
            # A failed version is a candidate again once its files change; the others are not read.
            candidates = {
                path.name: path
                for path in complete
                if (name, path.name) not in self._failed or self._failed[(name, path.name)] != _signature(path)
            }
            chosen = config.select(sorted(int(version) for version in candidates))
            versions = {str(version): candidates[str(version)] for version in chosen}
            problem = ""
            if complete and not versions:
                problem = (
                    f"its version policy selects none of the versions that can be loaded "
                    f"({', '.join(path.name for path in complete)} on disk)"
                )
            wanted[name] = _Wanted(directory, versions, problem, frozenset(path.name for path in complete))
        return wanted

    # -- the life of versions -----------------------------------------------------------------

    def _set_state(self, name: str, version: str, state: VersionState, reason: str = "") -> None:
        self.states.setdefault(name, {})[version] = VersionStatus(version, state, reason)
        self._update_gauges()

    def _forget(self, name: str, version: str) -> None:
        versions = self.states.get(name, {})
        versions.pop(version, None)
        if not versions:
            # A model gone from the repository leaves no counts behind (an alert on failed ones clears).
            self.states.pop(name, None)
            for state in VersionState:
                try:
                    self.metrics.model_versions.remove(name, state.value)
                except KeyError:
                    pass
        self._update_gauges()

    def _update_gauges(self) -> None:
        for name, versions in self.states.items():
            for state in VersionState:
                count = sum(1 for status in versions.values() if status.state is state)
                self.metrics.model_versions.labels(name, state.value).set(count)

    def statuses(self) -> list[ModelStatus]:
        """Every model and version the manager knows, with its state, by name and version."""
        default = self.core.default_model_name()
        return [
            ModelStatus(
                name,
                name == default,
                tuple(versions[key] for key in sorted(versions, key=int)),
            )
            for name, versions in sorted(self.states.items())
        ]

    async def _load_version(self, name: str, version: str, version_dir: Path) -> bool:
        """Load, warm and switch in one version; False (marked failed) when it cannot be loaded."""
        self._set_state(name, version, VersionState.LOADING)
        preloaded = self._preloaded.get((name, version))
        started = time.monotonic()
        model: LoadedModel | None = None
        try:
            if preloaded is not None:
                model = preloaded
            else:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(
                    self._loader,
                    self._load,
                    version_dir,
                    self.settings.max_batch_size,
                    self.settings.inference_threads,
                    self.settings.fp32_runtime,
                )
            await self.core.add_version(model)
        except Exception as error:  # noqa: BLE001 - any failure to load is the version's, reported as such
            if model is not None and preloaded is None:
                model.close()  # loaded but not switched in (its warm-up failed): release it now
            reason = f"{type(error).__name__}: {error}".strip()
            self._failed[(name, version)] = _signature(version_dir)
            self._set_state(name, version, VersionState.FAILED, reason)
            self.metrics.model_load_failures.labels(name).inc()
            log.error("model %s version %s failed to load and is not served: %s", name, version, reason)
            return False
        self._set_state(name, version, VersionState.AVAILABLE)
        self.load_seconds[(name, version)] = time.monotonic() - started
        log.info(
            "model %s version %s serving after %.1f s (%s)",
            name,
            version,
            self.load_seconds[(name, version)],
            ", ".join(
                f"{precision.value} from {model.variant(precision).path}, accuracy "
                + ("unknown" if accuracy is None else f"{accuracy:.4f}")
                for precision, accuracy in model.accuracy().items()
            ),
        )
        return True

    async def _unload_version(self, name: str, version: str) -> None:
        """Switch a version out, let its requests finish, and release its memory."""
        self._set_state(name, version, VersionState.UNLOADING)
        model = await self.core.remove_version(name, version, UNLOAD_WAIT_S)
        if model is not None and (name, version) not in self._preloaded:
            model.close()
        del model
        self._forget(name, version)
        log.info("model %s version %s unloaded", name, version)

    async def reconcile(self) -> bool:
        """Bring the served versions in step with the repository; True when anything changed."""
        async with self._reconciling:
            loop = asyncio.get_running_loop()
            changed = False
            while True:
                self.scans += 1
                scan = self.scans
                wanted = await loop.run_in_executor(self._loader, self._wanted)
                failed_now = False
                for name, want in wanted.items():
                    if want.problem:
                        if self._problems.get(name) != want.problem:
                            self._problems[name] = want.problem
                            log.error("model %s: %s; its served versions are left as they are", name, want.problem)
                        continue
                    self._problems.pop(name, None)
                    served = self.core.models.get(name, {})
                    for version, version_dir in want.versions.items():
                        if version not in served:
                            changed = True
                            self.found_in_scan.setdefault((name, version), scan)
                            if not await self._load_version(name, version, version_dir):
                                failed_now = True
                if not failed_now:
                    break  # else choose again: an older version may now be the one to serve
            unloaded = False
            for name, served in list(self.core.models.items()):
                wanted_here = wanted.get(name)
                if wanted_here is not None and wanted_here.problem:
                    continue
                for version in list(served):
                    if wanted_here is None or version not in wanted_here.versions:
                        await self._unload_version(name, version)
                        unloaded = changed = True
            # Failed versions gone from disk are forgotten (read by _wanted, off the loop).
            for name, versions in list(self.states.items()):
                on_disk = wanted[name].on_disk if name in wanted else frozenset()
                for version, status in list(versions.items()):
                    if status.state is VersionState.FAILED and on_disk is not None and version not in on_disk:
                        self._failed.pop((name, version), None)
                        self._forget(name, version)
            if unloaded:
                self._release_memory()
            return changed

    def _release_memory(self) -> None:
        """Collect what unloaded versions left behind, then freeze the survivors again (see the core's start).

        The C heap's free pages go back to the system too (see :mod:`costserve.server.memory`).
        """
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        trim_c_heap()

    async def start(self) -> None:
        """Load what the repository selects now; raise when no model at all could be loaded."""
        await self.reconcile()
        if not self.core.models:
            reasons = [
                f"{name} {status.version}: {status.reason}"
                for name, versions in self.states.items()
                for status in versions.values()
                if status.state is VersionState.FAILED
            ]
            where = self.settings.model_dir or self.settings.model_repository
            raise RuntimeError(
                f"no model version in {where} could be served"
                + (f" ({'; '.join(reasons)})" if reasons else " (no complete version found)")
            )
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="repository-poll")

    def poll_now(self) -> None:
        """Check the repository at once (SIGHUP)."""
        self._poll_now.set()

    async def _poll_forever(self) -> None:
        interval = self.settings.poll_seconds
        while True:
            try:
                await asyncio.wait_for(self._poll_now.wait(), timeout=interval if interval > 0 else None)
            except asyncio.TimeoutError:
                pass
            self._poll_now.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("checking the model repository failed; serving as before")

    async def stop(self) -> None:
        """Stop polling (the core stops the batchers)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._loader.shutdown(wait=False, cancel_futures=True)
