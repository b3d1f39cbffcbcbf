"""Following watched aliases through the promotion gate: what each alias serves now, and
every move, start-up and threshold change judged before it applies.

`refresh(name, alias)` (called by the watcher at each poll) re-resolves the alias:

- nothing served yet (start-up): what the alias last served (`service.promotion.served`)
  decides; another version is judged against it, a first ever against its own reference set;
- unmoved: a change of its version's `threshold.*` tags is judged before it applies;
- moved: the new version is loaded, checked, validated and judged against what serves now,
  and only then swapped in (one reference assignment: a decision sees old or new).

A failure at any step leaves the serving version (and its thresholds) in place and is recorded
in `errors` (for `GetModel`), counted and logged at ERROR. This module is longer than most
(about 400 lines): the start-up paths (`_first_serve`, `_first_ever`, `_serve_recorded`,
`_fall_back`) and the live ones share the swap and its bookkeeping, and read best together.
"""

from __future__ import annotations

import logging

from service import metrics
from service.errors import ModelNotFound, NotReady
from service.promotion.gate import Against
from service.promotion.judgements import Judgements
from service.promotion.rules import (
    GATE_AGAINST,
    GATE_REASON,
    GATE_STATUS,
    GateResult,
    override_of,
    threshold_overrides,
    threshold_tags,
)
from service.promotion.served import SERVED_TAG_PREFIX, Served, ServedMemory
from service.repository.registry_access import RegistryAccess
from service.repository.version_cache import VersionCache
from service.repository.versions import LoadedModel, ModelSpec
from service.runtime.metadata import threshold_source
from service.settings import Settings

log = logging.getLogger("service.repository.model_repository")  # where these lines have always been logged


class AliasFollower:
    """What each watched alias serves, moved only through the promotion gate."""

    def __init__(self, settings: Settings, registry: RegistryAccess, versions: VersionCache,
                 judgements: Judgements, memory: ServedMemory) -> None:
        self.settings = settings
        self.registry = registry
        self.versions = versions
        self.judgements = judgements
        self.memory = memory
        self._current: dict[tuple[str, str], LoadedModel] = {}
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}  # the last failed move: (version, why)
        for name, alias in settings.watched():  # 0 until the alias serves (an alert watches this)
            metrics.ALIAS_SERVING.labels(name, alias).set(0)

    def current(self, name: str, alias: str) -> LoadedModel | None:
        """What a watched alias serves now (no registry call), or None if not watched/loaded."""
        return self._current.get((name, alias))

    def serving(self) -> dict[tuple[str, str], LoadedModel]:
        """What every watched alias serves now."""
        return dict(self._current)

    def refresh(self, name: str, alias: str) -> LoadedModel | None:
        """Re-resolve a watched alias and follow it, through the promotion gate.

        Nothing served yet (start-up): `_first_serve`, judged against what the alias last
        served (`service.promotion.served`). Unmoved: a change of its version's threshold tags is judged
        before it applies (`_follow_thresholds`). Moved: the new version is loaded, checked,
        validated and judged against what serves now, and only then swapped in (`_move`). A
        failure at any step leaves the serving version (and its thresholds) in place and is
        recorded in `errors` (and counted, and logged at ERROR).

        Returns:
            The newly swapped-in version, or None when nothing changed or the move failed.

        Raises:
            NotReady: the registry or artifact store cannot be reached (keep serving, retry
                later with backoff); recorded in `errors` too.
        """
        key = (name, alias)
        serving = self._current.get(key)
        still = f"still serving {serving.version if serving else 'nothing'}"
        try:
            mv = self.registry.model_version(ModelSpec(name, alias))
        except (ModelNotFound, NotReady) as exc:
            self.record_failure(key, "", exc.message, f"watched alias {name}@{alias}; {still}")
            if isinstance(exc, NotReady):
                raise
            return None
        version, tags = str(mv.version), dict(mv.tags or {})
        if serving is None:
            return self._first_serve(key, version, tags)
        if serving.version == version:
            self._follow_thresholds(key, serving, tags)
            return None
        return self._move(key, serving, version, tags)

    def _gated(self, key: tuple[str, str]) -> bool:
        """Whether the gate judges what `key` serves: on (`ANOMALY_GATE`), except for the shadow
        challenger's alias, whose decisions never answer a request (a challenger is there to be
        tried on live traffic, refused candidates included)."""
        return self.settings.gate and key != (self.settings.model_name, self.settings.shadow_alias)

    def _load_for(self, key: tuple[str, str], version: str, context: str) -> LoadedModel | None:
        """Load a version a watched alias needs; a failure is recorded (None), an outage raised."""
        failed = self.versions.failure(key[0], version)
        if failed is not None:  # already refused: keep saying why, do not load it again
            self.errors[key] = (version, failed.message)
            return None
        try:
            return self.versions.load(key[0], version)
        except NotReady as exc:
            self.record_failure(key, version, exc.message, context)
            raise
        except Exception as exc:  # ModelLoadError, ModelNotFound, or anything unforeseen
            self.record_failure(key, version, getattr(exc, "message", None) or repr(exc), context)
            return None

    def _move(self, key: tuple[str, str], serving: LoadedModel, version: str,
              tags: dict[str, str]) -> LoadedModel | None:
        """The alias names another version than the one serving: judge it, then swap."""
        name, alias = key
        still = f"still serving {serving.version}"
        against = Against(serving.version, serving.run_id, serving.model, serving.model.overrides)
        refused = self.judgements.refused(name, version, against, tags)
        if refused is not None:  # judged already: not scored again
            self.errors[key] = (version, refused.reason)
            return None
        loaded = self._load_for(key, version, f"alias {name}@{alias} moved to version {version}, which "
                                              f"failed to load; {still}")
        if loaded is None:
            return None
        moved = f"alias {name}@{alias} moved to version {version}; {still}"
        problem = self._shared(key, loaded, tags)
        if problem:
            self.note_failure(key, version, problem, moved)
            return None
        verdict, overrides = self._judge(alias, loaded, tags, against, f"version {version}")
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, moved)
            return None
        self._swap(key, loaded, overrides, tags)
        return loaded

    def _first_serve(self, key: tuple[str, str], version: str, tags: dict[str, str]) -> LoadedModel | None:
        """Start serving a watched alias (at start-up, or once its first load succeeds).

        With the gate on, the record of what the alias last served decides (`ServedMemory`,
        else the registry's `served.<alias>` tag): the same version serves with the threshold
        tags it was accepted with (a change since is then judged as a live one); another
        version is judged against it as a live move, and if refused the recorded version
        serves instead. With no record (a first start), the version is judged against its own
        reference set and the plant's parts (with no known parts at all it serves, as a first
        ever does); a version tagged `gate.status=refused` never serves at start-up unless it
        carries an override.
        """
        name, alias = key
        context = f"watched alias {name}@{alias} names version {version}, which failed to load"
        if not self._gated(key):
            loaded = self._load_for(key, version, context)
            if loaded is not None:
                try:
                    self._swap(key, loaded, threshold_overrides(tags, loaded.metadata), tags)
                except ValueError as exc:
                    self._swap(key, loaded, {}, {})
                    self.note_failure(key, version, f"version {version}: invalid threshold tag: {exc}; the "
                                                    "calibrated thresholds apply", context)
            return loaded
        remembered = self._record(name, alias)
        flagged = tags.get(GATE_STATUS) == "refused" and tags.get(GATE_AGAINST, "") != version and \
            override_of(tags)[0] is None
        if remembered is not None and remembered.version != version:
            return self._fall_back(key, version, tags, remembered, flagged)
        if remembered is None and flagged:
            self.record_failure(key, version, (
                f"version {version} is tagged {GATE_STATUS}=refused ({tags.get(GATE_REASON, 'no reason')}); "
                f"this server has no record of a version that served {name}@{alias} before (neither its "
                f"ANOMALY_CACHE_DIR nor the registry's {SERVED_TAG_PREFIX}{alias} tag), so nothing serves: "
                "move the alias to a version that passes, or override the gate (gate.override, "
                "gate.override.by, gate.override.reason)"), f"watched alias {name}@{alias} at start-up")
            return None
        loaded = self._load_for(key, version, context)
        if loaded is None:
            return None
        if remembered is None:
            return self._first_ever(key, loaded, tags)
        return self._serve_recorded(key, loaded, remembered.thresholds, tags)

    def _first_ever(self, key: tuple[str, str], loaded: LoadedModel,
                    tags: dict[str, str]) -> LoadedModel | None:
        """No record of what served the alias: judge the version, with its threshold tags, against
        its own reference set and the plant's parts; with no known parts at all it serves (a
        first ever has nothing to be compared with), and a refusal caused by its threshold tags
        leaves it serving with its calibrated thresholds."""
        name, alias = key
        version = loaded.version
        own = Against(version, loaded.run_id, loaded.model, {})
        try:
            verdict, overrides = self._judge(alias, loaded, tags, own, f"version {version} (first start)",
                                             allow_empty=True)
            if not verdict.allows and threshold_tags(tags):
                calibrated, _ = self._judge(alias, loaded, {}, own, f"version {version} with its calibrated "
                                            "thresholds (first start)", allow_empty=True)
                if calibrated.allows:
                    self._swap(key, loaded, {}, {})
                    context = f"watched alias {name}@{alias} at start-up; its calibrated thresholds serve"
                    self.record_failure(key, version, verdict.reason, context)
                    return loaded
        except NotReady:  # the known parts cannot be fetched now: judged at a later poll
            return None
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, f"watched alias {name}@{alias} at start-up; "
                                                              "nothing serves")
            return None
        if verdict.status == "skipped":
            log.warning("%s", verdict.reason)
        self._swap(key, loaded, overrides, tags)
        return loaded

    def _serve_recorded(self, key: tuple[str, str], loaded: LoadedModel, accepted: dict[str, str],
                        tags: dict[str, str]) -> LoadedModel | None:
        """Serve the recorded version with the thresholds it was accepted with, then judge its
        threshold tags if they changed since."""
        try:
            overrides = threshold_overrides(accepted, loaded.metadata)
        except ValueError:  # accepted once, refused now (the rules tightened): the calibrated ones
            overrides, accepted = {}, {}
        problem = self._shared(key, loaded, accepted)
        if problem:
            self.note_failure(key, loaded.version, problem, f"watched alias {key[0]}@{key[1]} at start-up")
            return None
        self._swap(key, loaded, overrides, accepted)
        try:
            self._follow_thresholds(key, loaded, tags)  # a change since: judged as a live one
        except NotReady:  # recorded; the change is judged at a later poll, the accepted ones serve
            pass
        return loaded

    def _record(self, name: str, alias: str) -> Served | None:
        """What the alias last served: this server's record, else the registry's
        `served.<alias>` tag (written by every server that swaps, for hosts with an empty
        cache). A record naming a version that does not exist is ignored (ERROR)."""
        remembered = self.memory.get(name, alias)
        source = f"the record in {self.memory.path(name, alias)}"
        if remembered is None:
            try:
                registered = self.registry.client.get_registered_model(name)
            except Exception as exc:  # an outage: start as a first start would (still judged)
                log.warning("could not read %s's %s%s tag: %s", name, SERVED_TAG_PREFIX, alias, exc)
                return None
            recorded = (registered.tags or {}).get(f"{SERVED_TAG_PREFIX}{alias}", "").strip()
            if not recorded:
                return None
            remembered = Served(name, alias, recorded, "")
            source = f"the registry's {SERVED_TAG_PREFIX}{alias} tag"
        if not remembered.version.isdigit():
            log.error("%s names version %r of %s, which is not a version number; ignored", source,
                      remembered.version, name)
            return None
        try:
            mv = self.registry.model_version(ModelSpec(name, version=int(remembered.version)))
        except ModelNotFound:
            log.error("%s names %s version %s, which the registry does not hold; ignored", source, name,
                      remembered.version)
            return None
        run_id = str(mv.run_id or "")
        if remembered.run_id and remembered.run_id != run_id:
            log.error("%s names %s version %s of run %s, but that version is of run %s now; ignored", source,
                      name, remembered.version, remembered.run_id, run_id)
            return None
        return Served(name, alias, remembered.version, run_id, remembered.thresholds, remembered.at)

    def _fall_back(self, key: tuple[str, str], version: str, tags: dict[str, str], remembered: Served,
                   flagged: bool) -> LoadedModel | None:
        """At start-up the alias names another version than the one it last served: judge it
        against that one; if refused (or tagged refused), serve the remembered one."""
        name, alias = key
        against = Against(remembered.version, remembered.run_id)
        moved = f"alias {name}@{alias} names version {version}, which did not serve it before"
        if flagged:
            why = tags.get(GATE_REASON, "no reason")
            reason = (f"version {version} is tagged {GATE_STATUS}=refused ({why}); a refused version is not "
                      "served at start-up (it is judged again after "
                      "ANOMALY_FAILED_RETRY_S, when its tags change, or with an override)")
            self.judgements.remember_refusal(name, version, against.version, tags, reason)
        else:
            try:
                candidate = self._load_for(key, version, f"{moved}, and failed to load")
                if candidate is not None:
                    problem = self._shared(key, candidate, tags)
                    if problem:
                        reason = problem
                    else:
                        subject = f"version {version}"
                        verdict, overrides = self._judge(alias, candidate, tags, against, subject)
                        if verdict.allows:
                            self._swap(key, candidate, overrides, tags)
                            return candidate
                        reason = verdict.reason
                else:
                    reason = self.errors.get(key, (version, "it failed to load"))[1]
            except NotReady as exc:  # judged at a later poll; meanwhile what served last serves
                reason = f"not judged yet: {exc.message}"
        last = self._load_for(key, remembered.version, f"{moved}; version {remembered.version}, which served "
                                                       "it last, failed to load too")
        if last is None:
            self.record_failure(key, version, f"{reason}; and version {remembered.version}, which served it "
                                              f"last, cannot be loaded: {self.errors[key][1]}", moved)
            return None
        try:
            last_mv = self.registry.model_version(ModelSpec(name, version=int(last.version)))
            last_tags = dict(last_mv.tags or {})
        except (ModelNotFound, NotReady):
            last_tags = remembered.thresholds
        if self._serve_recorded(key, last, remembered.thresholds, last_tags) is None:
            return None
        self.record_failure(key, version, reason,
                            f"{moved}; serving version {remembered.version}, the last that served it")
        return last

    def _shared(self, key: tuple[str, str], loaded: LoadedModel, tags: dict[str, str]) -> str:
        """Why the alias may not serve `loaded` with these threshold tags ("" when it may): the
        version serves another watched alias with other thresholds (that alias judged them;
        one loaded version decides with one set of thresholds)."""
        others = sorted(a for (n, a), m in self._current.items() if m is loaded and (n, a) != key)
        wanted = threshold_tags(tags)
        if not others or wanted == loaded.thresholds:
            return ""
        shown = lambda t: ", ".join(f"{k}={v}" for k, v in sorted(t.items())) or "calibrated"  # noqa: E731
        return (f"version {loaded.version} serves {key[0]}@{', '.join(others)} with thresholds "
                f"{shown(loaded.thresholds)}, not the {shown(wanted)} its tags ask for (a change that "
                f"alias has not accepted); {key[0]}@{key[1]} moves to it once they agree")

    def _swap(self, key: tuple[str, str], loaded: LoadedModel, overrides: dict[str, float],
              tags: dict[str, str]) -> None:
        """Make `loaded` (with these thresholds) what the alias serves, and remember it."""
        name, alias = key
        serving = self._current.get(key)
        loaded.model.overrides = overrides  # replaced whole: a decision sees old or new, never a mix
        loaded.thresholds = threshold_tags(tags)
        loaded.aliases.add(alias)
        self._current[key] = loaded  # the swap: one reference assignment
        self.errors.pop(key, None)
        if serving is not None and serving is not loaded:
            serving.aliases.discard(alias)
            metrics.SWAPS.labels(name, alias).inc()
        metrics.SERVED_VERSION.labels(name, alias).set(float(loaded.version))
        metrics.ALIAS_SERVING.labels(name, alias).set(1)
        if serving is not loaded:
            log.info("alias %s@%s now serves version %s (was %s)", name, alias, loaded.version,
                     serving.version if serving else "none")
        self.memory.put(Served(name, alias, loaded.version, loaded.run_id, loaded.thresholds))
        if self.settings.gate_write_tags and serving is not loaded:  # the record of hosts with no cache
            try:
                self.registry.client.set_registered_model_tag(name, f"{SERVED_TAG_PREFIX}{alias}",
                                                              loaded.version)
            except Exception as exc:  # a read-only registry, an outage: the local record stands
                log.warning("could not write %s%s=%s on %s: %s", SERVED_TAG_PREFIX, alias, loaded.version,
                            name, exc)

    # -- live thresholds ----------------------------------------------------------------------------
    def _follow_thresholds(self, key: tuple[str, str], serving: LoadedModel, tags: dict[str, str]) -> None:
        """A change of the serving version's `threshold.*` tags applies only once the gate
        passes it (against the version's own reference set and the plant's parts)."""
        name, alias = key
        wanted = threshold_tags(tags)
        if wanted == serving.thresholds:
            self.errors.pop(key, None)  # the alias names what serves, as it serves: nothing pending
            return
        version = serving.version
        context = f"threshold tags of {name}/{version} (served by {name}@{alias}) changed; thresholds kept"
        if not self._gated(key):
            try:
                overrides = threshold_overrides(tags, serving.metadata)
            except ValueError as exc:
                self.note_failure(key, version, f"version {version}: invalid threshold tag: {exc}; "
                                                "thresholds unchanged", context)
                return
            self._apply_thresholds(key, serving, overrides, wanted)
            return
        against = Against(version, serving.run_id, serving.model, serving.model.overrides)
        refused = self.judgements.refused(name, version, against, tags)
        if refused is not None:
            self.errors[key] = (version, refused.reason)
            return
        shown = ", ".join(f"{k}={v}" for k, v in sorted(wanted.items())) or "none"
        verdict, overrides = self._judge(alias, serving, tags, against,
                                         f"threshold tags of version {version} ({shown})")
        if not verdict.allows:
            self.record_failure(key, version, verdict.reason, context)
            return
        self._apply_thresholds(key, serving, overrides, wanted)

    def _apply_thresholds(self, key: tuple[str, str], serving: LoadedModel, overrides: dict[str, float],
                          wanted: dict[str, str]) -> None:
        serving.model.overrides = overrides  # replaced whole: a decision sees old or new, never a mix
        serving.thresholds = wanted
        self.errors.pop(key, None)
        shown = ", ".join(f"{threshold_source(c)}={t:.6g}" for c, t in sorted(overrides.items()))
        log.info("%s/%s thresholds now follow its tags: %s", serving.name, serving.version,
                 shown or "none (the calibrated thresholds)")
        self.memory.put(Served(key[0], key[1], serving.version, serving.run_id, wanted))

    def _judge(self, alias: str, loaded: LoadedModel, tags: dict[str, str], against: Against,
               subject: str, allow_empty: bool = False) -> tuple[GateResult, dict[str, float]]:
        """`Judgements.judge`, with a failure to fetch the known parts recorded.

        Raises:
            NotReady: the reference sets could not be fetched (judged at a later poll).
        """
        try:
            return self.judgements.judge(alias, loaded, tags, against, subject,
                                         self._gated((loaded.name, alias)), allow_empty)
        except NotReady as exc:
            self.record_failure((loaded.name, alias), loaded.version, exc.message,
                                f"{loaded.name} {subject}: the promotion gate cannot fetch the known parts")
            raise

    def record_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """Remember (for GetModel), count and log at ERROR a failed move of a watched alias."""
        self.errors[key] = (version, message)
        metrics.LOAD_FAILURES.labels(*key).inc()
        log.error("%s: %s", context, message)

    def note_failure(self, key: tuple[str, str], version: str, message: str, context: str) -> None:
        """`record_failure`, once per distinct message (a problem seen at every poll)."""
        if self.errors.get(key) != (version, message):
            self.record_failure(key, version, message, context)

    def not_serving_reason(self, name: str, alias: str) -> str:
        """Why a watched alias serves nothing (for the UNAVAILABLE answer)."""
        version, message = self.errors.get((name, alias), ("", "not loaded yet"))
        return f"version {version}: {message}" if version and not message.startswith("version") else message
